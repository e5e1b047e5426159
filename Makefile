# `make demo` and `make test` create .venv when it is missing, install the project into it (a no-op once
# installed), then run. TORCH_SPEC picks the torch build: the default is the CPU wheel this machine carries;
# on a GPU box use e.g. `make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
MLFLOW_PORT ?= 5000
PREFECT_PORT ?= 4200

export PATH := $(BIN):$(PATH)
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1

.PHONY: install demo test test-fast ui serve stop live lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/streamavatar pipeline
	@echo
	@echo "Outputs:"
	@echo "  data/raw/synthetic/            the demo corpus: videos/*.mp4, merged_anno/*.json, gt/*.json, corpus.parquet"
	@echo "  data/reports/corpus/           contact_sheet.png (speaking / listening / head turn / blink frames), metrics.json"
	@echo "  data/curated/                  normalised clips/*.mp4 and per-frame speaking masks masks/*.npy"
	@echo "  data/manifests/curated.parquet one row per clip: status, reason, listen ratio, category, pose, split"
	@echo "  data/reports/curate/           histograms.png, asd_frames.png (frames called speaking / listening), clips.csv, metrics.json"
	@echo "  data/latents/                  training windows: VAE latents + talking/listening audio tokens per clip"
	@echo "  data/ode_pairs/                the teacher's ODE states at the student's noise levels + final x0"
	@echo "  data/checkpoints/<stage>/      step_*.pt (resume) and final.pt: teacher, distill (student), refine (refined student)"
	@echo "  data/reports/<stage>/          metrics.json + sample.mp4 (with its audio) for teacher, ode_pairs, distill, refine"
	@echo "  data/reports/benchmark.json    real-time speed: DiT / VAE RTF and first-frame delay, sequential vs pipelined"
	@echo "  data/reports/metrics.json      ground truth vs teacher vs student on held-out clips; table in data/reports/evaluate/"
	@echo "  mlflow.db + mlruns/            the MLflow run of this pipeline run, a nested run per stage, and the refined"
	@echo "                                 student registered as model streamavatar-student (alias candidate)"
	@echo "Look at them:"
	@echo "  make ui                        MLflow UI on http://127.0.0.1:$(MLFLOW_PORT) (experiment 'streamavatar')"
	@echo "  .venv/bin/dvc status           DVC agrees the outputs match params.yaml and the code"
	@echo "  .venv/bin/dvc repro            re-runs only what changed (nothing, right after make demo)"
	@echo "  make serve                     the same as Prefect deployments on a server + worker, with an MLflow server"

test: install
	$(BIN)/python -m pytest -q --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlruns \
		--host 127.0.0.1 --port $(MLFLOW_PORT)

# the pipeline as a service on 127.0.0.1: Prefect server (UI on PREFECT_PORT) + process worker + MLflow server
# (MLFLOW_PORT; mlflow.db, artifacts in mlruns/), the work pool and prefect.yaml's deployments. Processes, their
# logs and a shell env file are in .serve/; `make stop` stops exactly those processes.
live: install
	$(BIN)/streamavatar live

serve: install
	$(BIN)/streamavatar serve --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

stop:
	@if [ -x $(BIN)/streamavatar ]; then $(BIN)/streamavatar stop; else echo "nothing to stop (no $(VENV))"; fi

lint: install
	$(BIN)/ruff check flows tasks model tests live

clean: stop
	rm -rf data/raw data/reports .prefect mlflow.db mlruns dvc.lock .dvc/cache .dvc/tmp .serve
	@# the folders' tracked .gitignore files (which keep the stages' metrics.json out of git) come back
	@git checkout -- data/raw data/reports 2>/dev/null || true
