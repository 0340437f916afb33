# Quick start: `make demo` (synthetic data -> full two-stage RSNA pipeline -> OOF score + submission)
# and `make test`. Both create .venv from the requirement files when it is missing or stale.
# The repository is used from its root (python train.py, python -m utils.<tool>): nothing to install.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-hipmri demo-fracatlas demo-multitask test test-slow check-full bench lint kaggle-bundle

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

# Three multi-task nnU-Net trainers on synthetic pancreas CT: table of DSC, macro-F1, s/case (timing: docs/benchmarks.md).
demo-multitask: $(VENV)/.installed
	PROFILE=demo PYTHON=$(PY) sh train.sh pancreas

# Kaggle submission (docs/kaggle.md): output/kaggle/{code,wheels,kernel}/ from the runs in output/rsna.
# KAGGLE_PYTHON: the Kaggle image's Python the wheels are downloaded for; KAGGLE_OWNER: your Kaggle
# user (default: the owner in kaggle/kernel-metadata.json); PROFILE: the profile the runs were trained with.
KAGGLE_PYTHON ?= 3.11
PROFILE ?= demo
kaggle-bundle: $(VENV)/.installed
	$(PY) -m utils.rsna.kaggle_bundle all --out output/kaggle --python $(KAGGLE_PYTHON) \
		$(if $(KAGGLE_OWNER),--owner $(KAGGLE_OWNER)) profile=$(PROFILE)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not slow" -q

test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -m slow -q

# Every full profile end to end on a few real-size synthetic cases, one epoch and a few iterations per
# stage: seconds and peak memory per train.sh step; an error past 40 min or 8 GB (bench/check_full.py,
# docs/benchmarks.md). DEVICE: device= of every step (auto, cpu, cuda).
DEVICE ?= auto
check-full: $(VENV)/.installed
	$(PY) -m bench.check_full --device $(DEVICE)

# Every benchmark but the seed runs (hours: python -m bench.bench_seeds --pipeline P, docs/benchmarks.md).
bench: $(VENV)/.installed-dev
	for b in $(filter-out bench/bench_seeds.py,$(wildcard bench/bench_*.py)); do \
		echo "== $$b"; $(PY) -m bench.$$(basename $$b .py) || exit 1; done

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
