#!/usr/bin/env bash
# MTP on (lambda 0.3 -> 0.1, the baseline) vs off, equal compute (same steps and tokens; MTP adds its
# module's forward/backward).
source "$(dirname "$0")/common.sh"
baseline
arm exp-mtp-off --preset tiny --mtp-lambda 0 --mtp-lambda-late 0
wait
.venv/bin/python experiments/summarize.py runs/exp-baseline$SFX runs/exp-mtp-off$SFX
