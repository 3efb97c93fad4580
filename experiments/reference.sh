#!/usr/bin/env bash
# The longer reference run: 30 minutes on 2 CPU cores (the issue allows 60; or a few minutes on a GPU), then
# held-out accuracy. --fit-budget ends the LR decay with the budget whatever the machine's speed.
set -euo pipefail
OUT=${OUT:-runs/reference}
.venv/bin/dsv3 train --overwrite --out "$OUT" --preset tiny --seq-len 256 --batch-size 8 --max-steps 4000 \
    --max-minutes "${MINUTES:-30}" --fit-budget --lr 2e-3 --warmup-steps 50 --eval-every 500 --eval-problems 200 \
    --save-every 500 --dtype float32 --step-weights 0.4 0.3 0.2 0.1
.venv/bin/dsv3 eval --checkpoint "$OUT" --n 1000
.venv/bin/dsv3 plot "$OUT"
