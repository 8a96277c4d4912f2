# wit-pipeline developer and user entry points. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

# make build-dataset variables (empty INPUT runs the built-in demo).
INPUT ?=
QUERIES ?=
OUTPUT ?= out/demo
RUNNER ?= FnApiRunner
CONFIG ?=

.PHONY: help install test test-fast lint format build-dataset queries benchmarks clean

help:
	@echo "make install        create $(VENV)/ and install wit-pipeline with pinned dependencies"
	@echo "make test           run the test suite (installs first when $(VENV)/ is missing)"
	@echo "make lint           ruff check + format check"
	@echo "make build-dataset  build a dataset (the built-in demo by default; INPUT= QUERIES= OUTPUT= RUNNER= CONFIG=)"
	@echo "make queries        rebuild the shipped query list in queries/"
	@echo "make benchmarks     run the benchmarks in benchmarks/"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE \
	  $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

build-dataset: install
	$(PY) -m wit_pipeline demo run --output $(OUTPUT) --runner $(RUNNER) \
	  $(if $(INPUT),--input $(INPUT)) $(if $(QUERIES),--queries $(QUERIES)) \
	  $(if $(CONFIG),--config $(CONFIG))

queries: install
	$(PY) -m wit_pipeline queries build-default --output queries/

benchmarks: install
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf out/ .pytest_cache/ build/ *.egg-info
