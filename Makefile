# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := data/demo

.PHONY: setup test demo clean

setup: $(VENV)/.installed

# CPU-only machines get the CPU build of torch first (a plain `torch` requirement pulls a multi-GB CUDA
# build); with a GPU the normal build comes in with the project's dependencies.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q --no-index torch==2.13.0 2>/dev/null || \
	  $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DATA)
