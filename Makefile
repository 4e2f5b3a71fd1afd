# Two entry points: `make repro` (run the pipeline) and `make test` (run the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= constraints-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: repro beyond test install clean-venv mlflow-ui

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc config --local core.analytics false
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

# Beyond the paper (noise-scale sweep, drift over time, other MoE families, report); run after
# `make repro`. About 60 minutes on 2 cores (numerical pins on), most of it training the three other families
# (~15 min each); the sweep and drift stages add ~30 minutes when they are not up to date.
beyond: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro beyond/dvc.yaml

test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --workers 1

clean-venv:
	rm -rf $(VENV)
