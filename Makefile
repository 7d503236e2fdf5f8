# Two commands a newcomer needs: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch is pinned here, not in pyproject.toml: an open range would pull a multi-GB CUDA build.
# GPU users: install your CUDA torch into .venv first; pip then keeps it (it satisfies the project's range).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,tune]"
	touch $(STAMP)

install: $(STAMP)

# Prepare the embedded synthetic data, sweep, train the best config, serve it and query it over HTTP.
demo: $(STAMP)
	$(PY) -m ncf_ray.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

lint: $(STAMP)
	$(VENV)/bin/ruff check ncf_ray jobs tests

bench: $(STAMP)
	$(VENV)/bin/ncf-ray bench all

clean:
	rm -rf $(VENV) demo .pytest_cache
