# hptransfer: `make demo` and `make test` work from a fresh clone (see README).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export CUDA_HOME ?= $(shell [ -d /usr/local/cuda ] && echo /usr/local/cuda)
# TORCH_CUDA_ARCH_LIST: setup.py defaults it to 8.0;9.0+PTX (PTX: newer GPUs JIT); set it to override.
# CUDA: the major version of the torch/DALI builds (13: PyPI's, the default; 12: torch from PyTorch's index).
CUDA ?= 13
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cu128
ifeq ($(CUDA),13)
CUDA_PIP_ARGS :=
else ifeq ($(CUDA),12)
CUDA_PIP_ARGS := --extra-index-url $(TORCH_INDEX_URL)
else
$(error CUDA=$(CUDA): expected 13 (the default, PyPI's builds) or 12 (torch from TORCH_INDEX_URL))
endif
# On a machine without a GPU, Triton kernels run in the (exact, slow) interpreter in tests.
NO_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || echo 1)
DEMO_DIR ?= runs/synth_demo
DEMO_DATA ?= data/synth_demo

.PHONY: setup setup-test demo demo-garment test dist ext clean help
help:
	@echo "make setup  - create $(VENV), install the pinned training stack and hptransfer (builds hptransfer._C)"
	@echo "              CUDA=12 for CUDA 12 builds of torch/DALI (torch from TORCH_INDEX_URL)"
	@echo "make demo   - setup, synthesize data, train synth_demo on the CPU, evaluate, export"
	@echo "make test   - setup, the test tools and MediaPipe, run the whole test suite"
	@echo "make dist   - sdist and wheel into dist/ (python -m build, against the venv's torch)"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

# torch first: DeepSpeed's setup imports it (hence --no-build-isolation, and no ops built at install)
$(VENV)/.deps: requirements.txt requirements-cuda$(CUDA).txt | $(VENV)/bin/python
	$(PIP) install $(CUDA_PIP_ARGS) -r requirements-cuda$(CUDA).txt
	DS_BUILD_OPS=0 $(PIP) install --no-build-isolation -r requirements.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PY) -c "import hptransfer, hptransfer.kernels; from hptransfer.ops import backend_status; print(backend_status())"
	touch $@

setup: $(VENV)/.installed

# The test tools, and MediaPipe with --no-deps (requirements-mediapipe.txt says why): test-only, so the
# training environment of `make setup` holds neither.
$(VENV)/.test-deps: requirements-test.txt requirements-mediapipe.txt | $(VENV)/.installed
	$(PIP) install -r requirements-test.txt
	$(PIP) install --no-deps -r requirements-mediapipe.txt
	touch $@

# The GPU machine runs Triton 3.6: tests/test_kernels_compile.py compiles the kernels with it too,
# from this side directory (on PYTHONPATH in that test's subprocess only).
OLD_TRITON := $(VENV)/triton-3.6
$(OLD_TRITON)/.installed: | $(VENV)/bin/python
	$(PIP) install --no-deps --target $(OLD_TRITON) triton==3.6.0
	touch $@

setup-test: setup $(VENV)/.test-deps $(OLD_TRITON)/.installed

ext: setup

test: setup-test
	$(if $(NO_GPU),TRITON_INTERPRET=1 ,)$(PY) -m pytest tests -q --timeout=1500

demo: setup
	$(VENV)/bin/hptransfer demo --data $(DEMO_DATA) --out $(DEMO_DIR)

# garment transfer (paper 4.5): reuses $(DEMO_DIR)/export when `make demo` ran, else trains a small stand-in
demo-garment: setup
	$(VENV)/bin/hptransfer demo --garment --data $(DEMO_DATA) --out $(DEMO_DIR) --garment-out runs/garment_demo

# sdist + wheel; the wheel's extension is compiled against the venv's torch (no isolation)
dist: setup
	$(PY) -m build --no-isolation --outdir dist .

clean:
	rm -rf build dist *.egg-info hptransfer/_C*.so $(VENV)
