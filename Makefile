# `make train` and `make test` set everything up on first use: a virtual environment in .venv with the project.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision pinned to the builds our machines carry, from the configured package index (CUDA builds:
# a .venv of about 6.3 GB); override e.g. TORCH="torch torchvision".
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
TORCH ?= torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION)
# TORCH=cpu: their CPU-only builds (+cpu, no CUDA libraries: about 1.9 GB), from the configured index where it
# serves them, else from PyTorch's CPU wheel index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ifeq ($(TORCH),cpu)
override TORCH := --extra-index-url $(TORCH_CPU_INDEX) torch==$(TORCH_VERSION)+cpu torchvision==$(TORCHVISION_VERSION)+cpu
endif
ARGS ?=

.PHONY: install train test test-fast lint gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m step_lightning.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# On one H100/H200: the gpu-marked tests and the GPU speed table under one folder (scripts/gpu_check.sh).
GPU_CHECK_DIR ?= outputs/gpu-check/$(shell date +%Y%m%d-%H%M%S)
gpu-check: $(STAMP)
	PY=$(PY) scripts/gpu_check.sh $(GPU_CHECK_DIR)

lint: $(STAMP)
	$(PY) -m ruff check step_lightning tests scripts
	$(VENV)/bin/lint-imports

clean:
	rm -rf outputs multirun .pytest_cache
