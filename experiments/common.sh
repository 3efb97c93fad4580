# Sourced by the experiment scripts: session 5's `make demo` recipe (lr 2e-3, 30 warm-up steps, weight decay 0.1;
# the README's experiment table was measured with it) as a fixed number of steps (equal compute per arm)
# and `arm NAME ARGS...`, which trains one arm into runs/NAME and evaluates it on held-out problems.
#   STEPS=1150   optimizer steps per arm (the demo's budget on this 2-core machine: ~1300 steps in 9 minutes)
#   JOBS=2       train arms two at a time, one thread each, pinned to cores 0 and 1 (faster on 2 cores than
#                one 2-thread run after another); JOBS=1 (default) runs them one after another
#   EVAL_N=1000  held-out problems for the final `dsv3 eval` (about 210 of each number of steps)
#   SEED=0       training seed; another seed trains into runs/exp-*-seedN (the same arms, for the spread)
# An arm whose run directory already holds its final evaluation is not trained again, so the scripts share
# the baseline arm (exp-baseline: the tiny MoE, loss-free balancing, MTP on).
set -euo pipefail
STEPS=${STEPS:-1150}
JOBS=${JOBS:-1}
EVAL_N=${EVAL_N:-1000}
SEED=${SEED:-0}
SFX=$([ "$SEED" = 0 ] || echo "-seed$SEED")
COMMON=(--seq-len 256 --batch-size 8 --max-steps "$STEPS" --lr 2e-3 --warmup-steps 30 --save-every 0
        --eval-every "$STEPS" --eval-problems 0 --dtype float32 --seed "$SEED" --step-weights 0.7 0.2 0.07 0.03 --no-progress)
mkdir -p runs
_slot=0

arm() {
  local name=$1$SFX
  shift
  if [ -f "runs/$name/eval.json" ]; then
    echo "runs/$name: already evaluated"
    return
  fi
  local cmd=(.venv/bin/dsv3 train --overwrite --out "runs/$name" "${COMMON[@]}" "$@")
  local ev=(.venv/bin/dsv3 eval --checkpoint "runs/$name" --n "$EVAL_N" --json)
  if [ "$JOBS" -gt 1 ]; then
    local core=$((_slot % 2))
    _slot=$((_slot + 1))
    echo "runs/$name: training on core $core (log runs/$name.log)"
    (OMP_NUM_THREADS=1 taskset -c "$core" "${cmd[@]}" > "runs/$name.log" 2>&1 &&
     OMP_NUM_THREADS=1 taskset -c "$core" "${ev[@]}" > "runs/$name.eval.tmp" &&
     mv "runs/$name.eval.tmp" "runs/$name/eval.json") &
    if [ $((_slot % JOBS)) -eq 0 ]; then wait; fi
  else
    echo "runs/$name: training"
    "${cmd[@]}"
    "${ev[@]}" > "runs/$name.eval.tmp" && mv "runs/$name.eval.tmp" "runs/$name/eval.json"
  fi
}

baseline() {
  arm exp-baseline --preset tiny
}

# the dense twin of `tiny`: the same activated FFN width (see moe_vs_dense.sh)
dense_config() {
  .venv/bin/python -c 'from dsv3 import ModelConfig
ModelConfig.preset("tiny").replace(n_routed_experts=None, intermediate_size=416).to_json("runs/exp-dense-config.json")'
}
