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

.PHONY: stack smoke
SMOKE_URL ?= http://127.0.0.1:8080

## Redis + Triton + the gateway as local processes (what docker-compose.yml runs), until Ctrl-C.
## Serves the demo checkpoint if there is one, else a tiny random one; choose with
## STACK_ARGS="--checkpoint runs/x/best.pt --port 8080".
stack: $(STAMP)
	$(BIN)/python scripts/stack.py $(STACK_ARGS)

## Smoke-test a running gateway end to end (default: the one `make stack` runs).
smoke: $(STAMP)
	$(BIN)/python scripts/smoke.py --url $(SMOKE_URL)
