# The two commands of the README: `make demo` and `make test`.
# Both create .venv, install the project and what it needs, and run.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch 2.13.0 is the CPU build; installing it first keeps pip from pulling a CUDA build.
TORCH   := torch==2.13.0

.PHONY: demo test venv venv-test model browser clean

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

# Headless Chromium renders the `dynamics diagnose` report in a test; installed with Debian's
# package when missing and possible (root + apt-get), else that one test is skipped. Never fails.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } || \
	echo "chromium is not installed: the browser test of the diagnose report will be skipped"

test: venv-test model browser
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
