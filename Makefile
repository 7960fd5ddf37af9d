# vtkit chores. The two that matter: `make all` (the main job) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
VTKIT := $(PY) -m vtkit
DEMO_DIR ?= demo
OUTPUT_DIR ?= pruning_results
# Empty MODEL_PATH / SCIENCEQA_DIR: run on the embedded demo (tiny model + synthetic ScienceQA).
MODEL_PATH ?=
SCIENCEQA_DIR ?=
SWEEP_FLAGS ?= --min 20 --max 576 --step 10
# `make demo-model`: where the trained model goes, and the training flags (see docs/demo.md):
# the recipe of the shipped model (about 7 minutes on one H200).
DEMO_MODEL_DIR ?= demo-model
TRAIN_FLAGS ?= --device auto --steps 5600 --batch-size 128 --lr 1e-3 --n-eval 600

.PHONY: install all test lint bench docs demo demo-model clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

ifeq ($(strip $(MODEL_PATH)),)
RUN_ARGS = --model-path $(DEMO_DIR)/llava-tiny-hf --base-dir $(DEMO_DIR)/scienceqa
RUN_DEPS = demo
else
RUN_ARGS = --model-path $(MODEL_PATH) $(if $(strip $(SCIENCEQA_DIR)),--base-dir $(SCIENCEQA_DIR),)
RUN_DEPS =
endif

demo: install
	$(VTKIT) demo --output $(DEMO_DIR)

# Train the demo model (minutes on a GPU, hours on a CPU) and install it as the one vtkit ships.
demo-model: install
	$(VTKIT) demo --train --output $(DEMO_MODEL_DIR) $(TRAIN_FLAGS)
	rm -rf vtkit/assets/demo-model
	cp -r $(DEMO_MODEL_DIR)/llava-tiny-hf vtkit/assets/demo-model

all: install $(RUN_DEPS)
	$(VTKIT) extract $(RUN_ARGS) --output-dir $(OUTPUT_DIR)
	$(VTKIT) sweep $(RUN_ARGS) --output-dir $(OUTPUT_DIR) $(SWEEP_FLAGS)
	$(VTKIT) rank --output-dir $(OUTPUT_DIR)
	$(VTKIT) plot --output-dir $(OUTPUT_DIR)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check vtkit tests

bench: install
	$(VTKIT) bench --shape tiny

docs: install
	$(PY) -m pytest tests/test_docs.py

clean:
	rm -rf $(OUTPUT_DIR) $(DEMO_DIR)
