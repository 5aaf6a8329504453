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

.PHONY: setup browser test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The report's test opens the page in a real headless Chromium (tests/test_report.py): install Debian's package
# when it is absent (CI runs as root; elsewhere through sudo). Idempotent: nothing happens once it is there.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null || { echo "installing chromium (apt) for the report's browser test"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends chromium >/dev/null; }

test: setup browser
	$(VENV)/bin/ruff check invcache tests benchmarks pipelines
	$(PY) -m pytest -q

# The main job on the embedded default (pipelines/demo.py, built on the public API): synthetic COCO-format
# data, detr-tiny with the embedded default weights (--weights demo), caches → inverse modules → every analysis → report. Rerunning resumes.
demo: setup
	$(PY) pipelines/demo.py --root $(DEMO_ROOT)

clean:
	rm -rf $(VENV) invcache-runs
