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

# The main job on the embedded default: synthetic COCO-format data, detr-tiny with random weights.
DEMO := $(VENV)/bin/invcache
DEMO_MODEL := --model detr-tiny --weights random:0 --size 128x160 --shard-size 32 --root $(DEMO_ROOT)
DEMO_TRAIN := --root $(DEMO_ROOT) --batch-size 32 --resume

demo: setup
	$(DEMO) extract --source synthetic --split train2017 --layers all --synthetic-images 256 $(DEMO_MODEL)
	$(DEMO) extract --source synthetic --split val2017 --layers all --synthetic-images 16 $(DEMO_MODEL)
	$(DEMO) train backbone-inv --width small --epochs 40 $(DEMO_TRAIN)
	$(DEMO) train encoder-inv --epochs 10 $(DEMO_TRAIN)
	$(DEMO) train decoder-inv --epochs 10 $(DEMO_TRAIN)
	$(DEMO) train head-inv --epochs 10 $(DEMO_TRAIN)
	$(DEMO) reconstruct --stage all --n 8 --root $(DEMO_ROOT)
	@echo "caches: $(DEMO_ROOT)/cache  modules: $(DEMO_ROOT)/modules  reconstructions: $(DEMO_ROOT)/analysis/reconstruct/grid.png"

clean:
	rm -rf $(VENV) invcache-runs
