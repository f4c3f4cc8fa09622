# fersynth: every target creates .venv from requirements.lock when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP) ## create .venv with the pinned dependencies (done by every target)

# The experiment: params.yaml is a link to the active profile (profiles/*.yaml); dvc.lock is the
# active profile's lock, and every other profile's lock waits in profiles/<name>.lock, so each
# profile keeps the record of its own last run. `make run` runs the demo;
# `make run PARAMS=profiles/fer2013.yaml` switches link and locks first.
PARAMS ?= profiles/demo.yaml
LOCK = $(PARAMS:.yaml=.lock)
EXPERIMENT = $$($(BIN)/fersynth params experiment.name)

# make run tracks into a local MLflow store under runs/mlflow (ignored by git); set
# MLFLOW_TRACKING_URI to a team server instead (see mlflow/README.md).
MLFLOW_LOCAL := $(CURDIR)/runs/mlflow
MLFLOW_TRACKING_URI ?= sqlite:///$(MLFLOW_LOCAL)/mlflow.db
FERSYNTH_ARTIFACT_LOCATION ?= $(MLFLOW_LOCAL)/artifacts
MLFLOW_UI_PORT ?= 5000

profile: $(STAMP) ## make PARAMS (default profiles/demo.yaml) the active profile: params.yaml and dvc.lock
	@case "$(PARAMS)" in profiles/*/*|*..*) echo "make: PARAMS=$(PARAMS): must be profiles/<name>.yaml"; exit 2;; \
	  profiles/*.yaml) ;; *) echo "make: PARAMS=$(PARAMS): must be profiles/<name>.yaml"; exit 2;; esac
	@test -f "$(PARAMS)" || { echo "make: PARAMS=$(PARAMS): no such profile (see profiles/)"; exit 2; }
	@if [ -e params.yaml ] && [ ! -L params.yaml ]; then \
	  echo "make: params.yaml is a file, not a link to a profile: move your edits into profiles/ first"; exit 2; fi
	@$(BIN)/fersynth --params "$(PARAMS)" params experiment.name >/dev/null
	@current="$$(readlink params.yaml || true)"; \
	if [ "$$current" != "$(PARAMS)" ]; then \
	  if [ -n "$$current" ] && [ -f dvc.lock ]; then mv dvc.lock "$${current%.yaml}.lock"; fi; \
	  if [ -f "$(LOCK)" ]; then mv "$(LOCK)" dvc.lock; fi; \
	  ln -sfn "$(PARAMS)" params.yaml; \
	  echo "profile: $(PARAMS) (params.yaml -> $(PARAMS); dvc.lock is its lock, $${current:-the previous profile}'s waits in profiles/)"; \
	else echo "profile: $(PARAMS) (params.yaml -> $(PARAMS))"; fi

run: profile ## the main job on a profile (PARAMS=profiles/<name>.yaml, default the demo): `dvc repro`, MLflow in runs/mlflow, the results page
	@mkdir -p $(MLFLOW_LOCAL)
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI="$(MLFLOW_TRACKING_URI)" \
	  FERSYNTH_ARTIFACT_LOCATION="$(FERSYNTH_ARTIFACT_LOCATION)" $(BIN)/dvc repro
	@echo; cat docs/results/$(EXPERIMENT).md
	@echo; echo "results: docs/results/$(EXPERIMENT).md; report with pictures: runs/$(EXPERIMENT)/report/report.md (also in MLflow: make mlflow-ui)"
	@echo "registry: $$(cat runs/$(EXPERIMENT)/register.json | tr -d '\n' | tr -s ' ')"

mlflow-ui: $(STAMP) ## browse the MLflow store of make run (http://127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri "sqlite:///$(MLFLOW_LOCAL)/mlflow.db" --port $(MLFLOW_UI_PORT)

mlflow-server: $(STAMP) ## a tracking server for a team (settings: mlflow/README.md)
	bash mlflow/start-server.sh

test: lint ## lint, then the whole test suite, slow tests on ../shared included (what CI runs)
	$(BIN)/python -m pytest

test-fast: $(STAMP) ## the test suite without the slow tests (under 5 minutes)
	$(BIN)/python -m pytest -m "not slow and not image"

TIER ?= unit
test-tier: $(STAMP) ## one tier of tests/ (TIER=unit, data, model, pipeline or e2e), slow tests included
	$(BIN)/python -m pytest -m "$(TIER)"

lint: $(STAMP) ## ruff check and format check; hadolint on docker/
	$(BIN)/ruff check src tests benchmarks components pipelines
	$(BIN)/ruff format --check src tests benchmarks components pipelines
	$(BIN)/hadolint --config docker/.hadolint.yaml docker/Dockerfile

# Images and the compiled pipeline carry the same tag: the git commit (never `latest`).
# docker/image-check.sh builds them (and proves them), installing Docker where it is missing.

image: $(STAMP) ## build the CPU and CUDA images (docker/), tagged with the git commit (CA_BUNDLE=FILE for pip behind a TLS proxy)
	bash docker/image-check.sh --build-only

image-check: $(STAMP) ## build both images and prove them: the CPU image's stages offline as uid 10001, no build CA inside, the pipeline under kfp.local's DockerRunner
	bash docker/image-check.sh

pipeline: $(STAMP) ## compile the active profile's KFP pipeline to pipelines/compiled/<profile>.yaml (commit it)
	$(BIN)/python -m pipelines compile

k8s: $(STAMP) ## render and validate every kustomize overlay (k8s/)
	@for overlay in k8s/overlays/*/; do \
	  echo "$$overlay"; $(BIN)/kubectl kustomize "$$overlay" > /tmp/fersynth-k8s.yaml && \
	  $(BIN)/kubernetes-validate --strict --quiet /tmp/fersynth-k8s.yaml || exit 1; done

lock: ## re-resolve requirements.lock from the pins in pyproject.toml (needs the network)
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	{ echo "# Exact versions of every package, resolved once with pip on Python 3.11 / x86_64."; \
	  echo "# Regenerate with: make lock (after editing the top-level pins in pyproject.toml)."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -vE '^(pip|wheel)=='; } > requirements.lock
	rm -rf .lock-venv

clean: ## remove outputs of make run for the active profile (keeps .venv and the DVC cache)
	@name=$(EXPERIMENT); test -n "$$name" || { echo "make clean: the active profile does not resolve"; exit 2; }; \
	  echo "rm -rf data/$$name runs/$$name"; rm -rf "data/$$name" "runs/$$name"

.PHONY: help venv profile run mlflow-ui mlflow-server test test-fast lint image image-check pipeline k8s lock clean
