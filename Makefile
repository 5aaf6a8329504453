# Both targets set themselves up: a virtual environment in $(VENV) with the project installed.
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# The pinned torch builds are the ones this project is tested with (x86_64: CUDA build; aarch64: CPU build).
ifeq ($(ARCH),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif
DEMO_ROOT ?= invcache-runs/demo

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(VENV)/bin/ruff check invcache tests benchmarks pipelines
	$(PY) -m pytest -q

# The main job on the embedded default (pipelines/demo.py, built on the public API): synthetic COCO-format
# data, detr-tiny with random weights, caches → inverse modules → reconstructions. Rerunning resumes.
demo: setup
	$(PY) pipelines/demo.py --root $(DEMO_ROOT)

clean:
	rm -rf $(VENV) invcache-runs
