#!/usr/bin/env bash
# MTP on vs off, equal compute (same steps and tokens; MTP adds its module's forward/backward).
set -euo pipefail
STEPS=${STEPS:-300}
COMMON=(--preset tiny --seq-len 256 --batch-size 16 --max-steps "$STEPS" --lr 4e-3 --warmup-steps 30
        --eval-every "$STEPS" --eval-problems 100 --save-every 0 --dtype float32 --seed 0 --no-progress)
.venv/bin/dsv3 train --overwrite --out runs/exp-mtp-on  "${COMMON[@]}" --mtp-lambda 0.3 --mtp-lambda-late 0.1
.venv/bin/dsv3 train --overwrite --out runs/exp-mtp-off "${COMMON[@]}" --mtp-lambda 0 --mtp-lambda-late 0
.venv/bin/python experiments/summarize.py runs/exp-mtp-on runs/exp-mtp-off
