# wit-pipeline developer and user entry points. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

# make build-dataset variables (empty INPUT runs the built-in demo; ARGS: more flags, e.g. Beam's).
INPUT ?=
QUERIES ?=
OUTPUT ?= out/demo
RUNNER ?= FnApiRunner
CONFIG ?=
ARGS ?=

.PHONY: help install test test-fast lint format build-dataset queries benchmarks clean

help:
	@echo "make help           this list"
	@echo "make install        create $(VENV)/ and install wit-pipeline with pinned dependencies"
	@echo "make test           run the test suite (installs first when $(VENV)/ is missing;"
	@echo "                    PYTEST_ARGS= passes more pytest arguments, e.g. tests/test_cli.py)"
	@echo "make test-fast      the test suite without the tests marked slow (the demo runs)"
	@echo "make lint           ruff check + format check"
	@echo "make format         ruff: fix what it can and format"
	@echo "make build-dataset  the built-in demo (web -> shards -> report -> wit-tiny), or with INPUT= a"
	@echo "                    'wit build' of your crawl (QUERIES= OUTPUT= RUNNER= CONFIG= ARGS=)"
	@echo "make queries        rebuild the shipped query list in queries/"
	@echo "make benchmarks     run the benchmarks in benchmarks/"
	@echo "make clean          remove out/, pytest caches and build leftovers"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE

test: install
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(TEST_ENV) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Without INPUT: the built-in demo (docs/demo.md). With INPUT: `wit build` on your files.
build-dataset: install
ifeq ($(strip $(INPUT)),)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m wit_pipeline demo run --output $(OUTPUT) \
	  --runner $(RUNNER) $(if $(QUERIES),--queries $(QUERIES)) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)
else
	$(PY) -m wit_pipeline build --input $(INPUT) --output $(OUTPUT) --runner $(RUNNER) \
	  $(if $(QUERIES),--queries $(QUERIES)) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)
endif

queries: install
	$(PY) -m wit_pipeline queries build-default --output queries/

benchmarks: install
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf out/ .pytest_cache/ build/ *.egg-info
