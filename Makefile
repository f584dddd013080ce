# Two set-up-free entry points: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install what they need, idempotently.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.eenet-installed

.PHONY: demo test test-fast test-numerics venv dataset clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# The CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

dataset:
	@bash scripts/ensure_dataset.sh

demo: $(STAMP) dataset
	$(VENV)/bin/eenet quickstart

test: $(STAMP)
	$(PY) -m pytest -q

# The tests whose floats depend on the CPU's kernels, again under the portable ones:
# a test that holds only for one machine's float trajectory fails here.
test-numerics: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m numerics

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
