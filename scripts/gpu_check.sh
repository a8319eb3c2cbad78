#!/usr/bin/env bash
# The GPU check, in one call on a machine with one CUDA GPU whose python3 already has torch,
# torchvision, timm, triton and pytest (no package registry needed): install actlab without
# dependencies, run the GPU tests, 200-step bf16 training runs (actlab's trainer against a bare loop), then
# the whole-model GPU speed benchmark; the tables come last.
# Logs and JSON go to $OUT (default /tmp/actlab-gpu-check). Budget: about 9 minutes.
# STAGES picks a subset (default "tests train profile speed"); SPEED_ARGS adds options to the speed
# benchmark, e.g. STAGES="tests speed" SPEED_ARGS="--compile eager" for a short re-check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/actlab-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
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
STAGES="${STAGES:-tests train profile speed}"
SPEED_ARGS="${SPEED_ARGS:-}"
stage() { [[ " $STAGES " == *" $1 "* ]]; }
tests_rc=0 train_rc=0 speed_rc=0
if stage tests; then
echo "== pytest -m gpu ($(elapsed) s)"
timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests 2>&1 | tee "$OUT/pytest.log" | tail -25
tests_rc=${PIPESTATUS[0]}
fi
if stage train; then
echo "== 200-step training runs ($(elapsed) s)"
for run in "resnet26 iieu_b" "vit_tiny dpa"; do
  set -- $run
  timeout 120 python3 -m actlab.bench.overhead --device cuda --amp bf16 --model "$1" --act "$2" --dataset synthetic \
    --epochs 25 --batch-size 64 --repeats 2 --workers 4 >"$OUT/train_$1_$2.log" 2>&1 || train_rc=1
  grep -E "^\|" "$OUT/train_$1_$2.log" | grep -v -- "---" || tail -5 "$OUT/train_$1_$2.log"
done
fi
if stage profile; then
echo "== profile ($(elapsed) s)"
timeout 60 python3 -m actlab.bench.model_speed --suite gpu --profile resnet26:iieu_b,resnet50:dpa >"$OUT/profile.log" 2>&1
fi
if stage speed; then
echo "== speed benchmark ($(elapsed) s)"
left=$(( ${SPEED_END:-540} - $(elapsed) ))  # SPEED_END: seconds after the start by which the benchmark stops
timeout $(( left > 60 ? left : 60 )) python3 -m actlab.bench.model_speed --suite gpu --repeats 10 --warmup 2 \
  --budget-s $(( left > 90 ? left - 30 : 60 )) --json "$OUT/speed.json" $SPEED_ARGS >"$OUT/speed.log" 2>&1
speed_rc=$?
fi
echo "== done in $(elapsed) s: pytest rc=$tests_rc, training rc=$train_rc, speed rc=$speed_rc"
[ -f "$OUT/pytest.log" ] && grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
[ -f "$OUT/speed.log" ] && tail -n 40 "$OUT/speed.log"
exit $(( tests_rc != 0 || train_rc != 0 || speed_rc != 0 ))
