#!/usr/bin/env bash
# The GPU check on a machine with one CUDA GPU whose python3 already has torch, torchvision, timm, triton
# and pytest (no package registry needed): install actlab without dependencies (skipped when this tree's
# actlab is already installed), then the stages:
#   tests       pytest -m gpu (kernels against float64 references, gradcheck, DPA memories, bf16, fp16 and
#               compiled training, checkpoints, no host syncs), on 4 processes
#   eager       the whole-model GPU suite, bf16 eager: times, peak memory, targets, and the cost model's
#               prediction of every counted step beside its measured time
#   train       200-step bf16 training runs, actlab's trainer against a bare loop (ResNet-26 + IIEU-B,
#               ViT-Tiny/4 + DPA)
#   profile     the PyTorch profiler's kernel table of eager steps (where a prediction is off)
#   compiled    the suite under torch.compile, and under torch.compile with CUDA graphs
#               (mode="reduce-overhead"), model by model: ResNet-26, ViT-Tiny/4, then ResNet-50
# Logs and JSON go to $OUT (default /tmp/actlab-gpu-check), the speed and training tables also to
# $OUT/figures/<gpu>.md (copy its sections to docs/figures); a speed JSON is rewritten after each case,
# so a stage cut short keeps its finished rows. Inductor's and Triton's caches stay on the machine, so a
# second call on the same machine compiles nothing twice.
# STAGES picks the stages (default "tests eager train profile", about 9 minutes), END the seconds after
# the start by which the last stage stops (default 540). The compiled table in a second call:
#   STAGES=compiled bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/actlab-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/actlab-inductor-cache}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/actlab-triton-cache}"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

if python3 -c "import actlab, os, sys; sys.exit(0 if actlab.__file__.startswith(os.getcwd()) else 1)" 2>/dev/null; then
  echo "actlab already installed from this tree"
else
  python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { tail -20 "$OUT/install.log"; echo "install failed"; exit 1; }
fi
DRIVER="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
export DRIVER="${DRIVER:-unknown}"
python3 - <<'PY' | tee "$OUT/environment.txt"
import os, platform, torch, triton
from actlab.perf.timing import copy_bandwidth
print(f"{torch.cuda.get_device_name()}; driver {os.environ['DRIVER']}; torch {torch.__version__} (CUDA "
      f"{torch.version.cuda}); triton {triton.__version__}; Python {platform.python_version()}; device-to-device "
      f"copy {copy_bandwidth(torch.device('cuda')) / 1e12:.2f} TB/s (bytes read + written)")
PY
STAGES="${STAGES:-tests eager train profile}"
END="${END:-540}"
stage() { [[ " $STAGES " == *" $1 "* ]]; }
left() { local l=$(( END - $(elapsed) )); echo $(( l < $1 ? l : $1 )); }
ran() { echo "== $1 ($(elapsed) s)"; }
failed=""
speed() {  # speed NAME LIMIT ARGS...: the whole-model benchmark, its log in $OUT/speed_NAME.log
  local name=$1 limit; limit=$(left "$2"); shift 2
  if (( limit < 30 )); then echo "skipped: $name (time)"; return 0; fi
  timeout "$limit" python3 -m actlab.perf.model_speed --suite gpu --repeats 10 --warmup 2 --budget-s $(( limit * 2 / 3 )) \
    --json "$OUT/speed_$name.json" --figures "$OUT/figures" "$@" >"$OUT/speed_$name.log" 2>&1
  local rc=$?
  grep -E "^\| |^Cost model|skipped" "$OUT/speed_$name.log" | grep -v -- "---"
  (( rc == 0 )) || { failed+=" $name"; tail -5 "$OUT/speed_$name.log"; }
}
if stage tests; then
  ran "pytest -m gpu"
  timeout "$(left 170)" python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -n 4 --dist load tests \
    2>&1 | tee "$OUT/pytest.log" | tail -25
  (( PIPESTATUS[0] == 0 )) || failed+=" tests"
fi
if stage eager; then ran "speed, eager"; speed eager 170 --compile eager; fi
if stage train; then
  ran "200-step training runs"
  for run in "vit_tiny dpa" "resnet26 iieu_b"; do
    set -- $run
    limit=$(left 110)
    if (( limit < 30 )); then echo "skipped: training $1 $2 (time)"; continue; fi
    timeout "$limit" python3 -m actlab.perf.overhead --device cuda --amp bf16 --model "$1" --act "$2" \
      --dataset synthetic --epochs 25 --batch-size 64 --repeats 2 --workers 4 --figures "$OUT/figures" \
      >"$OUT/train_$1_$2.log" 2>&1 || failed+=" train:$1:$2"
    grep -E "^\||^run " "$OUT/train_$1_$2.log" | grep -v -- "---" || tail -3 "$OUT/train_$1_$2.log"
  done
fi
if stage profile; then
  ran profile
  timeout "$(left 60)" python3 -m actlab.perf.model_speed --suite gpu --profile resnet26:relu,resnet26:iieu_b,vit_tiny:dpa \
    >"$OUT/profile.log" 2>&1 || failed+=" profile"
fi
if stage compiled; then
  ran "speed, compiled and CUDA graphs"
  speed compiled 520 --compile compiled,cudagraphs --models resnet26,vit_tiny,resnet50
fi
echo "== done in $(elapsed) s; failed:${failed:- none}"
[ -f "$OUT/pytest.log" ] && grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
[ -z "$failed" ]
