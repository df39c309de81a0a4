# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv with Python 3.12 (pyenv resolves `python3.12` through .python-version)
# and install lca with its pinned dependencies.
PYTHON ?= python3.12
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test gpu-test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plots]'
	touch $@

# Trains a byte-level LM with full attention and with ModernBERT-style local/global
# attention on CPU, prints a side-by-side table, writes results/demo/.
demo: $(VENV)/.installed
	$(PY) -m experiments.demo

# The CPU test suite (Pallas kernels run in interpret mode). CI runs this.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache
