# Two commands a newcomer needs: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned here, not in pyproject.toml (any torch >= 2.3 works there). On Linux PyPI's torch wheel is the
# multi-GB CUDA build, so the CPU build is taken from TORCH_INDEX, PyTorch's CPU wheel index: it is passed as an
# *extra* index for the torch step only, and pip prefers its `2.13.0+cpu` to PyPI's `2.13.0` (a local version sorts
# above the plain one). When TORCH_INDEX cannot be reached (offline, a proxy) the step says so and installs from
# your configured indexes alone: a local wheel if pip's config has one, else PyPI's build (CUDA on Linux).
#   GPU users: `make install TORCH_INDEX=https://download.pytorch.org/whl/cu126` (or TORCH_INDEX= for PyPI's
#   default), or install your CUDA torch into .venv first: pip keeps an installed torch that matches TORCH.
TORCH       ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP       := $(VENV)/.installed
# -qq: pip prints errors only (its warnings here are a build backend's notices and a machine's index config).
PIP_QUIET   := $(PY) -m pip install -qq --disable-pip-version-check

.PHONY: install demo test test-unit test-integration lint bench clean

# One line per step; pip prints only errors.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || { echo "install: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "install: upgrading pip"
	@$(PIP_QUIET) --upgrade pip
	@if [ -n "$(TORCH_INDEX)" ] && $(PY) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$(TORCH_INDEX)" 2>/dev/null; then \
	    echo "install: $(TORCH) (CPU build preferred, from $(TORCH_INDEX))"; \
	    $(PIP_QUIET) "$(TORCH)" --extra-index-url "$(TORCH_INDEX)"; \
	else \
	    echo "install: $(TORCH) from pip's configured indexes$(if $(TORCH_INDEX), ($(TORCH_INDEX) unreachable),)"; \
	    $(PIP_QUIET) "$(TORCH)"; \
	fi
	@echo "install: ncf_ray[dev,tune] (editable) and its dependencies"
	@$(PIP_QUIET) -e ".[dev,tune]"
	@$(PY) -c "import sys, torch; print(f'install: done (torch {torch.__version__} in {sys.prefix})')"
	@touch $(STAMP)

install: $(STAMP)

# Prepare the embedded synthetic data, sweep every family, train and refit the best by valid, serve it, query it.
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
