# quantbench: two set-up commands for a fresh clone.
#   make demo   create .venv if missing, install, run the main job on the embedded default (digits)
#   make test   create .venv if missing, install with dev extras, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean

$(PY):
	python3 -m venv $(VENV)

# torch is installed once per fresh venv (about 80 s from local disk), then the package itself
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/quantbench demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/calibration.py

clean:
	rm -rf quantbench-out .pytest_cache .ruff_cache
