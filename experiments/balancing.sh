#!/usr/bin/env bash
# Auxiliary-loss-free balancing vs auxiliary-loss-only vs none, equal compute.
set -euo pipefail
STEPS=${STEPS:-300}
COMMON=(--preset tiny --seq-len 256 --batch-size 16 --max-steps "$STEPS" --lr 4e-3 --warmup-steps 30
        --eval-every "$STEPS" --eval-problems 100 --save-every 0 --dtype float32 --seed 0 --no-progress)
.venv/bin/dsv3 train --overwrite --out runs/exp-bal-lossfree "${COMMON[@]}" --bias-gamma 1e-3 --balance-alpha 1e-4
.venv/bin/dsv3 train --overwrite --out runs/exp-bal-auxloss  "${COMMON[@]}" --bias-gamma 0 --balance-alpha 1e-3
.venv/bin/dsv3 train --overwrite --out runs/exp-bal-none     "${COMMON[@]}" --bias-gamma 0 --balance-alpha 0
.venv/bin/python experiments/summarize.py runs/exp-bal-lossfree runs/exp-bal-auxloss runs/exp-bal-none
