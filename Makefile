# Quick start: `make demo` (synthetic data -> full two-stage RSNA pipeline -> OOF score + submission)
# and `make test`. Both create .venv from the requirement files when it is missing or stale.
# The repository is used from its root (python train.py, python -m utils.<tool>): nothing to install.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-hipmri demo-fracatlas test test-slow bench lint

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	PROFILE=demo PYTHON=$(PY) sh train.sh

demo-hipmri: $(VENV)/.installed
	PROFILE=demo PYTHON=$(PY) sh train.sh hipmri

demo-fracatlas: $(VENV)/.installed
	PROFILE=demo PYTHON=$(PY) sh train.sh fracatlas

test: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not slow" -q

test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -m slow -q

bench: $(VENV)/.installed-dev
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) -m bench.$$(basename $$b .py) || exit 1; done

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
