# fourm: `make demo` runs the main job end to end, `make test` runs the suite.
# Both create .venv at the repo root if it is missing and install into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# e.g. VENV_FLAGS=--system-site-packages to reuse a cluster image's own CUDA torch
VENV_FLAGS ?=
# what to install when the venv has no torch yet; empty = CPU build 2.13.0 without CUDA, latest with
TORCH_SPEC ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fourm-installed
OUT ?= runs/demo
MINUTES ?= 30
PYTEST_ARGS ?=

.PHONY: install test demo clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@if $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		spec="$(TORCH_SPEC)"; \
		if [ -z "$$spec" ]; then \
			if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then spec=torch; else spec=torch==2.13.0; fi; \
		fi; \
		echo "installing $$spec"; \
		$(PY) -m pip install -q "$$spec"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) launch/demo.py --out $(OUT) --minutes $(MINUTES)

clean-venv:
	rm -rf $(VENV)
