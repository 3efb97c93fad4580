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
	$(BIN)/python -m pytest -x

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# The tiny preset on the built-in math corpus, inside a 10-minute budget on 2 CPU cores.
DEMO_DIR ?= runs/demo
DEMO_MINUTES ?= 9
demo: $(STAMP)
	$(BIN)/dsv3 train --out $(DEMO_DIR) --overwrite --preset tiny --seq-len 256 --batch-size 8 --max-steps 1600 \
		--max-minutes $(DEMO_MINUTES) --fit-budget --lr 2.5e-3 --warmup-steps 100 --weight-decay 0.01 --eval-every 500 --eval-problems 100 \
		--save-every 500 --dtype auto --step-weights 0.7 0.2 0.07 0.03
	$(BIN)/dsv3 eval --checkpoint $(DEMO_DIR) --n 1000 --show 3
	$(BIN)/dsv3 plot $(DEMO_DIR)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
