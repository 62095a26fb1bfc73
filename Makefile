# hptransfer: `make demo` and `make test` work from a fresh clone (see README).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export CUDA_HOME ?= $(shell [ -d /usr/local/cuda ] && echo /usr/local/cuda)
# TORCH_CUDA_ARCH_LIST: setup.py defaults it to 8.0;9.0+PTX (PTX: newer GPUs JIT); set it to override.
# On a machine without a GPU, Triton kernels run in the (exact, slow) interpreter in tests.
NO_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || echo 1)
DEMO_DIR ?= runs/synth_demo
DEMO_DATA ?= data/synth_demo

.PHONY: setup demo demo-garment test ext clean help
help:
	@echo "make setup  - create $(VENV), install the pinned stack and hptransfer (builds hptransfer._C)"
	@echo "make demo   - setup, synthesize data, train synth_demo on the CPU, evaluate, export"
	@echo "make test   - setup, run the whole test suite"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

$(VENV)/.deps: requirements.txt requirements-test.txt requirements-mediapipe.txt | $(VENV)/bin/python
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	DS_BUILD_OPS=0 $(PIP) install --no-build-isolation -r requirements.txt -r requirements-test.txt
	$(PIP) install --no-deps -r requirements-mediapipe.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PY) -c "import hptransfer, hptransfer.kernels; from hptransfer.ops import backend_status; print(backend_status())"
	touch $@

# The GPU machine runs Triton 3.6: tests/test_kernels_compile.py compiles the kernels with it too,
# from this side directory (on PYTHONPATH in that test's subprocess only).
OLD_TRITON := $(VENV)/triton-3.6
$(OLD_TRITON)/.installed: | $(VENV)/bin/python
	$(PIP) install --no-deps --target $(OLD_TRITON) triton==3.6.0
	touch $@

setup: $(VENV)/.installed $(OLD_TRITON)/.installed

ext: setup

test: setup
	$(if $(NO_GPU),TRITON_INTERPRET=1 ,)$(PY) -m pytest tests -q --timeout=1500

demo: setup
	$(VENV)/bin/hptransfer demo --data $(DEMO_DATA) --out $(DEMO_DIR)

# garment transfer (paper 4.5): reuses $(DEMO_DIR)/export when `make demo` ran, else trains a small stand-in
demo-garment: setup
	$(VENV)/bin/hptransfer demo --garment --data $(DEMO_DATA) --out $(DEMO_DIR) --garment-out runs/garment_demo

clean:
	rm -rf build *.egg-info hptransfer/_C*.so $(VENV)
