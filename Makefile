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
# when `make` started (before install): the demo's budget counts from here
STARTED := $(shell date +%s)
PYTEST_ARGS ?=
PORT ?= 7860
# BROWSER=0: do not try to install Debian's chromium for the playground's browser test
BROWSER ?= 1

.PHONY: install test demo playground browser clean-venv

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
	@$(MAKE) --no-print-directory browser
	@touch $(STAMP)

# Chromium for the playground's browser test: Debian's package where apt-get can be used as root;
# elsewhere one line says how, and that test is skipped with the reason.
browser:
	@if [ "$(BROWSER)" = 0 ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser test (BROWSER=0 skips this)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } \
		|| echo "could not install chromium: the playground's browser test will be skipped"; \
	else \
		echo "no chromium: the playground's browser test will be skipped (sudo apt-get install chromium, or set FOURM_CHROMIUM)"; \
	fi

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) launch/demo.py --out $(OUT) --minutes $(MINUTES) --started-at $(STARTED)

# the browser playground on the demo's model (after `make demo`)
playground: install
	$(PY) launch/playground.py --model $(OUT)/model --port $(PORT)

clean-venv:
	rm -rf $(VENV)
