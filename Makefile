# The README's two commands: `make run` (main job) and `make test` (test suite).
# Both create the virtual environment on first use; nothing else needs installing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test test-all bench bench-e2e clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a looser request can pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m multitower demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/train_step.py

# The whole train job against its step (~15 min on a 2-core CPU; data/cifar10 if imported).
bench-e2e: $(VENV)/.installed
	$(PY) benchmarks/train_e2e.py

clean:
	rm -rf runs/demo
