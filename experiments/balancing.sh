#!/usr/bin/env bash
# Auxiliary-loss-free balancing (bias, gamma 1e-3, plus the tiny sequence-wise loss alpha 1e-4, as in the
# paper) vs auxiliary-loss-only (alpha 1e-3, no bias) vs none, equal compute.
source "$(dirname "$0")/common.sh"
baseline
arm exp-bal-auxloss --preset tiny --bias-gamma 0 --balance-alpha 1e-3
arm exp-bal-none --preset tiny --bias-gamma 0 --balance-alpha 0
wait
.venv/bin/python experiments/summarize.py runs/exp-baseline$SFX runs/exp-bal-auxloss$SFX runs/exp-bal-none$SFX
