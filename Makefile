# Two commands for a newcomer: `make demo` renders the bundled clip, `make test` runs the tests.
# Both create .venv and install everything they need on their own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU machines get torch 2.13.0 (a CPU build where one is on the index); set TORCH_SPEC to override
# (GPU nodes: the same version from a CUDA index, see deploy/). torch is not in constraints.txt.
TORCH_SPEC ?= torch==2.13.0
# Every other package at the exact version in constraints.txt, so the driver and every Ray node agree.
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean constraints

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c $(CONSTRAINTS) "$(TORCH_SPEC)"
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	$(PIP) install --quiet -c $(CONSTRAINTS) --no-deps "gfpgan==1.3.8"
	@if $(PY) -c "import torchvision" 2>/dev/null; then echo "warning: torchvision is installed; see DESIGN.md"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cluster.render +task=test models=tiny

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Rewrite constraints.txt from this venv (after changing a dependency in pyproject.toml and testing it).
constraints: $(STAMP)
	$(PY) deploy/freeze_constraints.py > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) outputs multirun models/tiny
