#!/usr/bin/env bash
# All three experiments: the five arms (the baseline once), then each experiment's table.
# On 2 cores: JOBS=2 bash experiments/all.sh (three rounds of ~15 minutes at STEPS=1150).
source "$(dirname "$0")/common.sh"
dense_config
baseline
arm exp-bal-auxloss --preset tiny --bias-gamma 0 --balance-alpha 1e-3
arm exp-bal-none --preset tiny --bias-gamma 0 --balance-alpha 0
arm exp-dense --config runs/exp-dense-config.json
arm exp-mtp-off --preset tiny --mtp-lambda 0 --mtp-lambda-late 0
wait
for exp in balancing moe_vs_dense mtp; do
  echo "## $exp"
  bash "$(dirname "$0")/$exp.sh"
done
