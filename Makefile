# Set-up and test on a fresh machine with nothing but Python 3.10+ and pip.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch, installed before anything else so no dependency pulls a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"

test: setup
	$(BIN)/python -m pytest -q

# The built-in demo: a small Llama learns a long-range recall task with SeCO on CPU (about two minutes).
demo: setup
	$(BIN)/chunkwise train --output runs/demo --overwrite

clean:
	rm -rf $(VENV) build *.egg-info
