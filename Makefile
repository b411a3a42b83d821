# Two entry points for a fresh machine with nothing but Python 3.10+: `make demo` and `make test`.
# Both create (or reuse) the virtual environment in .venv and install the pinned packages first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint format venv clean

venv: $(STAMP)

# torch goes in alone first: `torch==2.13.0` takes the local CPU build, while letting the resolver pick torch
# as a dependency of monai could pull the registry's CUDA build (several GB).
$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tools demo --out $(DEMO_DIR) $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m black --check tools tests bundles benchmarks
	$(PY) -m isort --check-only tools tests bundles benchmarks
	$(PY) -m flake8 tools tests bundles benchmarks

format: $(STAMP)
	$(PY) -m black tools tests bundles benchmarks
	$(PY) -m isort tools tests bundles benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
