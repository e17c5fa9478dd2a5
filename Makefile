# Two commands do the whole set-up on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torch==2.13.0 must be installed first: on CPU machines it is the CPU build that lies on
# disk, while any other torch request (or torch pulled in by sae-lens) downloads CUDA wheels.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]" -c constraints.txt
	touch $@

demo: setup
	$(VENV)/bin/sae-lens-t5gemma demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/bench_hooks.py
	$(PY) benchmarks/bench_multi_hook_training.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
