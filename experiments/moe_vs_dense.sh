#!/usr/bin/env bash
# The tiny MoE vs a dense model with the same activated FFN width, equal compute.
# MoE tiny: layer 0 dense (FFN 512) + 3 MoE layers with 1 shared + 2 of 8 routed experts of width 128
# (384 active), i.e. 512 + 3 x 384 = 1664 activated FFN units; dense: 4 layers of FFN 416 = 1664.
source "$(dirname "$0")/common.sh"
dense_config
baseline
arm exp-dense --config runs/exp-dense-config.json
wait
.venv/bin/dsv3 info --preset tiny --json | grep -E "activated|params_main"
.venv/bin/dsv3 info --config runs/exp-dense-config.json --json | grep -E "activated|params_main"
.venv/bin/python experiments/summarize.py runs/exp-baseline$SFX runs/exp-dense$SFX
