# fersynth: every target creates .venv from requirements.lock when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PARAMS ?= params.yaml

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP) ## create .venv with the pinned dependencies (done by every target)

# Demo-scale training: ResNet-18 at 48 px for a few hundred steps on two CPU cores. The thesis
# defaults in params.yaml (Swin-T, 100k steps) are for GPUs.
DEMO_TRAIN := -S train.arch=resnet18 -S train.image_size=48 -S train.steps=300 \
	-S train.warmup_steps=30 -S train.eval_every=100 -S train.checkpoint_every=100 \
	-S train.log_every=50 -S train.workers=1 -S evaluate.workers=1
# Demo-scale generation: 30 seed images per class, K=5, with the self-trained prior.
DEMO_GENERATE := -S prior.steps=400 -S generate.max_seeds_per_class=30
FERSYNTH := $(BIN)/fersynth --params $(PARAMS)
DEMO_RUNS := runs/demo
MODELS := $(DEMO_RUNS)/models
# The thesis grid (name, data, method) plus the cheapest competitor, class-balanced sampling.
GRID_ORIGINAL := original_sl original_sl_balanced original_mek
GRID_SYNTHETIC := expanded_sl synthetic_mek expanded_mek

run: $(STAMP) ## the main job on the demo data: every stage, the training grid, the comparison table
	$(FERSYNTH) demo-data --force
	$(FERSYNTH) ingest --force
	$(FERSYNTH) quality --force
	$(FERSYNTH) guard --force
	$(FERSYNTH) $(DEMO_TRAIN) train --method sl --output $(MODELS)/original_sl --force
	$(FERSYNTH) $(DEMO_TRAIN) -S train.balanced_sampler=true train --method sl \
		--output $(MODELS)/original_sl_balanced --force
	$(FERSYNTH) $(DEMO_TRAIN) train --method mek --output $(MODELS)/original_mek --force
	$(FERSYNTH) $(DEMO_GENERATE) train-prior --force
	rm -rf data/demo/generated
	$(FERSYNTH) $(DEMO_GENERATE) generate
	$(FERSYNTH) merge --force
	$(FERSYNTH) verify --force
	$(FERSYNTH) augment --variant rho --output data/demo/augmented/rho --force
	$(FERSYNTH) augment --variant synthetic --output data/demo/augmented/synthetic --force
	$(FERSYNTH) $(DEMO_TRAIN) train --method sl --data data/demo/augmented/rho \
		--output $(MODELS)/expanded_sl --force
	$(FERSYNTH) $(DEMO_TRAIN) train --method mek --data data/demo/augmented/synthetic \
		--output $(MODELS)/synthetic_mek --force
	$(FERSYNTH) $(DEMO_TRAIN) train --method mek --data data/demo/augmented/rho \
		--output $(MODELS)/expanded_mek --force
	for run in $(GRID_ORIGINAL) $(GRID_SYNTHETIC); do \
		$(FERSYNTH) $(DEMO_TRAIN) evaluate --model $(MODELS)/$$run \
			--output $(DEMO_RUNS)/eval/$$run || exit 1; done
	$(FERSYNTH) compare Original_SL=$(DEMO_RUNS)/eval/original_sl \
		Original_SL_balanced=$(DEMO_RUNS)/eval/original_sl_balanced \
		Expanded_SL=$(DEMO_RUNS)/eval/expanded_sl \
		Original_MEK=$(DEMO_RUNS)/eval/original_mek \
		Synthetic_MEK=$(DEMO_RUNS)/eval/synthetic_mek \
		Expanded_MEK=$(DEMO_RUNS)/eval/expanded_mek --output $(DEMO_RUNS)/compare

test: lint ## lint, then the whole test suite, slow tests on ../shared included (what CI runs)
	$(BIN)/python -m pytest

test-fast: $(STAMP) ## the test suite without the slow tests
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

lock: ## re-resolve requirements.lock from the pins in pyproject.toml (needs the network)
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	{ echo "# Exact versions of every package, resolved once with pip on Python 3.11 / x86_64."; \
	  echo "# Regenerate with: make lock (after editing the top-level pins in pyproject.toml)."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -vE '^(pip|wheel)=='; } > requirements.lock
	rm -rf .lock-venv

clean: ## remove outputs of make run (keeps .venv)
	rm -rf data/demo runs/demo

.PHONY: help venv run test test-fast lint lock clean
