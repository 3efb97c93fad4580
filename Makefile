PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	# torch first, pinned, so no dependency pulls a different (CUDA) build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]' torch==2.13.0
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -x -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
