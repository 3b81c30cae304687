# `make run`: set up and run the pipeline on the embedded default (digits, local DVC cache).
# `make test`: set up and run the test suite (what CI runs).
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: setup run test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

run: setup
	shrinkflow check
	dvc repro
	@cat reports/comparison.md

test: setup
	pytest

bench: setup
	python bench/mnist.py
