# fsar: two commands for a newcomer — `make demo` and `make test`.
# Both create the virtual environment in .venv on first use (re-run when pyproject changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pins torch/torchvision to the versions our build machines install from local files;
# set CONSTRAINTS= (empty) to resolve freely elsewhere.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINT_ARGS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.fsar-installed

.PHONY: setup demo test test-all serve clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_CONSTRAINT_ARGS) -e ".[all]"
	touch $@

setup: $(STAMP)

## The main job: offline demo (synthetic data, tiny model, embedded backend, curl examples).
demo: $(STAMP)
	$(BIN)/fsar demo

## The default test suite (real videos, real Redis, real Triton server on CPU).
test: $(STAMP)
	$(BIN)/python -m pytest

## Everything, including tests marked slow.
test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

clean:
	rm -rf $(VENV) .cache .pytest_cache
