#!/usr/bin/env bash
# The tiny MoE vs a dense model with the same activated FFN width, equal compute.
# MoE tiny: layer 0 dense (FFN 512) + 3 MoE layers with 1 shared + 2 of 8 routed experts of width 128
# (384 active), i.e. 512 + 3 x 384 = 1664 activated FFN units; dense: 4 layers of FFN 416 = 1664.
set -euo pipefail
STEPS=${STEPS:-300}
mkdir -p runs
.venv/bin/python - <<'PY'
from dsv3 import ModelConfig
ModelConfig.preset("tiny").replace(n_routed_experts=None, intermediate_size=416).to_json("runs/exp-dense-config.json")
PY
COMMON=(--seq-len 256 --batch-size 16 --max-steps "$STEPS" --lr 4e-3 --warmup-steps 30
        --eval-every "$STEPS" --eval-problems 100 --save-every 0 --dtype float32 --seed 0 --no-progress)
.venv/bin/dsv3 train --overwrite --out runs/exp-moe   --preset tiny "${COMMON[@]}"
.venv/bin/dsv3 train --overwrite --out runs/exp-dense --config runs/exp-dense-config.json "${COMMON[@]}"
.venv/bin/dsv3 info --preset tiny --json | grep -E "activated|params_main"
.venv/bin/dsv3 info --config runs/exp-dense-config.json --json | grep -E "activated|params_main"
.venv/bin/python experiments/summarize.py runs/exp-moe runs/exp-dense
