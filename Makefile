# The two commands of the README: `make demo` and `make test`.
# Both create .venv, install the project and what it needs, and run.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch 2.13.0 is the CPU build; installing it first keeps pip from pulling a CUDA build.
TORCH   := torch==2.13.0

.PHONY: demo test venv venv-test model clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)

venv: $(BIN)/python
	$(BIN)/pip install -q -e .

venv-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

model: venv
	$(BIN)/dynamics fetch-model smollm2-135m

demo: venv model
	$(BIN)/dynamics demo --out runs/demo --overwrite

test: venv-test model
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
