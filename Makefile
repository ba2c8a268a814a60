# Set-up is part of every target: `make demo` and `make test` work on a fresh machine.
# The CPU build of torch is installed first and pinned, so that nothing else pulls a CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-all bench bench-models clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]' $(TORCH)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m titans demo

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

bench: setup
	$(PY) -m pip install --quiet titans-pytorch $(TORCH)
	$(PY) benchmarks/memory_throughput.py

bench-models: setup
	$(PY) -m pip install --quiet titans-pytorch $(TORCH)
	$(PY) benchmarks/model_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
