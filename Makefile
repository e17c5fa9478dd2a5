# Two commands do the whole set-up on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test lint bench clean browser gpu-check

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

# The tests marked auto_branch follow dtype="auto" (bfloat16 where the CPU or GPU runs it natively).
# They run first with the *other* branch forced (SAE_LENS_T5GEMMA_FAST_BF16), then the whole suite
# on this machine's own branch: both branches are tested whatever the CPU.
OTHER_BRANCH = $(shell grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo 0 || echo 1)

test: setup browser
	SAE_LENS_T5GEMMA_FAST_BF16=$(OTHER_BRANCH) $(PY) -m pytest -q -m auto_branch
	$(PY) -m pytest -q

# On a CUDA machine: demo, device-sensitive tests and benchmarks in bf16 (under 10 minutes);
# results in benchmarks/results/gpu_check.json. `make gpu-check ARGS=--dry-run` checks it on a CPU.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py $(ARGS)

# Headless Chromium for the dashboard's browser test (tests/dashboard/test_dashboard.py). Debian's
# package; if it cannot be installed (no root, no apt) the test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	    ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium) \
	    || echo "make browser: could not install chromium; the browser test will be skipped"; }

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/bench_hooks.py
	$(PY) benchmarks/bench_multi_hook_training.py
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_precision.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_cli.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
