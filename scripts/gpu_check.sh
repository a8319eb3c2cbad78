#!/usr/bin/env bash
# The GPU check, in one call on a machine with one CUDA GPU whose python3 already has torch,
# torchvision, timm, triton and pytest (no package registry needed): install actlab without
# dependencies, run the GPU tests, the whole-model GPU speed benchmark (eager, then compiled), a profile,
# and 200-step bf16 training runs (actlab's trainer against a bare loop).
# Logs and JSON go to $OUT (default /tmp/actlab-gpu-check), the speed tables also to $OUT/figures/<gpu>.md
# (copy it to docs/figures); the speed JSON is rewritten after each case, so a
# stage cut short keeps its finished rows. Budget: about 9 minutes.
# STAGES picks a subset (default "tests eager compiled profile train"), END the seconds after the start
# by which the last stage stops (default 560), e.g. STAGES="tests eager" END=200 for a short re-check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/actlab-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# compiled kernels kept between calls on the same machine (a re-check of the compiled stage compiles nothing)
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/actlab-inductor-cache}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/actlab-triton-cache}"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { tail -20 "$OUT/install.log"; echo "install failed"; exit 1; }
DRIVER="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
export DRIVER="${DRIVER:-unknown}"
python3 - <<'PY' | tee "$OUT/environment.txt"
import os, platform, torch, triton
print(f"{torch.cuda.get_device_name()}; driver {os.environ['DRIVER']}; torch {torch.__version__} (CUDA "
      f"{torch.version.cuda}); triton {triton.__version__}; Python {platform.python_version()}")
PY
# Stages run in this order, most needed first; each gets at most its own limit and what is left of END.
STAGES="${STAGES:-tests eager compiled profile train}"
END="${END:-560}"
stage() { [[ " $STAGES " == *" $1 "* ]]; }
left() { local l=$(( END - $(elapsed) )); echo $(( l < $1 ? l : $1 )); }
ran() { echo "== $1 ($(elapsed) s)"; }
tests_rc=0 eager_rc=0 compiled_rc=0 train_rc=0
speed() {  # speed NAME LIMIT ARGS...: the whole-model benchmark, table to $OUT/speed_NAME.log
  local name=$1 limit; limit=$(left "$2"); shift 2
  if (( limit < 30 )); then echo "skipped: $name (time)"; return 0; fi
  timeout "$limit" python3 -m actlab.perf.model_speed --suite gpu --repeats 10 --warmup 2 --budget-s $(( limit * 2 / 3 )) \
    --json "$OUT/speed_$name.json" --figures "$OUT/figures" "$@" >"$OUT/speed_$name.log" 2>&1
  local rc=$?
  grep -E "^\| |skipped" "$OUT/speed_$name.log" | grep -v -- "---"
  return $rc
}
if stage tests; then
  ran "pytest -m gpu"
  timeout "$(left 200)" python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests 2>&1 | tee "$OUT/pytest.log" | tail -25
  tests_rc=${PIPESTATUS[0]}
fi
if stage eager; then ran "speed, eager"; speed eager 150 --compile eager; eager_rc=$?; fi
if stage compiled; then ran "speed, compiled"; speed compiled 240 --compile compiled --models resnet26,vit_tiny; compiled_rc=$?; fi
if stage profile; then
  ran profile
  timeout "$(left 50)" python3 -m actlab.perf.model_speed --suite gpu --profile resnet26:iieu_b,resnet50:dpa >"$OUT/profile.log" 2>&1
fi
if stage train; then
  ran "200-step training runs"
  for run in "resnet26 iieu_b" "vit_tiny dpa"; do
    set -- $run
    limit=$(left 100)
    if (( limit < 30 )); then echo "skipped: training $1 $2 (time)"; continue; fi
    timeout "$limit" python3 -m actlab.perf.overhead --device cuda --amp bf16 --model "$1" --act "$2" \
      --dataset synthetic --epochs 25 --batch-size 64 --repeats 2 --workers 4 >"$OUT/train_$1_$2.log" 2>&1 || train_rc=1
    grep -E "^\|" "$OUT/train_$1_$2.log" | grep -v -- "---" || tail -3 "$OUT/train_$1_$2.log"
  done
fi
echo "== done in $(elapsed) s: pytest rc=$tests_rc, eager rc=$eager_rc, compiled rc=$compiled_rc, training rc=$train_rc"
[ -f "$OUT/pytest.log" ] && grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
exit $(( tests_rc != 0 || eager_rc != 0 || compiled_rc != 0 || train_rc != 0 ))
