#!/usr/bin/env bash
# The GPU check, in one call of at most 8 minutes on one GPU; whenever a GPU is lent, run this first:
#
#   bash bench/device_check.sh [KIT]     KIT: a folder with the competition zip and test_labels.csv
#                                        (default: ../shared/data/real-kaggle-4k)
#
# 1. the GPU, torch, and whether an ONNX Runtime session really gets the CUDA provider;
# 2. bench/train_bench.py and bench/infer_bench.py on CUDA (torch fp32/bf16; ORT CUDA fp32/fp16: int8 does not run
#    on ORT's CUDA provider);
# 3. bench/ddp_check.py: train under torchrun with NCCL (1 process, and each GPU's process where there are several)
#    against the 1-process run (one GPU: a world of 1, where NCCL and DDP start but nothing crosses ranks);
# 4. make offline on the kit on CUDA, timed per stage, scored on its test labels (bench/scale.py, in a clone);
# 5. the service's load test on CUDA on that run's model: batched vs unbatched, vs raw ONNX Runtime.
# Each step runs under a time limit (520 s in all); results go to bench/results/ (device_check_<device>.json lists every step, its
# exit status and seconds; each bench writes its own file), the log to device_check_<device>.log. Needs the project
# installed (make install; make offline's extra for step 4). DEVICE=cpu QUICK=1 runs steps 1 and 3 small on CPU:
# tests/test_bench.py checks the script that way where no GPU is lent.
set -uo pipefail
KIT=$(realpath -m "${1:-$(dirname "$0")/../../shared/data/real-kaggle-4k}")  # before the cd: relative to the caller
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3)}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
LOG="$OUT/device_check_$DEVICE.log"
: >"$LOG"
STEPS=()

summary() {  # device_check_<device>.json: the environment and every step so far (written after each step)
  "$PY" - "$OUT/device_check_$DEVICE.json" "${STEPS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, steps = Path(sys.argv[1]), [s.split() for s in sys.argv[2:]]
env = json.loads(out.with_name(out.stem + "_env.json").read_text())
out.write_text(json.dumps({**env, "steps": {n: {"exit": rc, "seconds": int(sec)} for n, rc, sec in steps}}, indent=2))
EOF
}

step() {  # step NAME SECONDS COMMAND...: run it under a limit, its output in the log; record its status and time
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name: $*" >>"$LOG"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  STEPS+=("$name $rc $(($(date +%s) - start))")
  echo "device_check: $name exit $rc in $(($(date +%s) - start))s"
  summary
}

if ! "$PY" - "$DEVICE" >"$OUT/device_check_${DEVICE}_env.json" 2>>"$LOG" <<'EOF'; then
import json, sys
import torch
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("device_check: PyTorch sees no CUDA device: run it where a GPU is, or DEVICE=cpu QUICK=1")
info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
try:
    import onnxruntime as ort
    info["ort"] = ort.__version__
    info["ort_available_providers"] = ort.get_available_providers()
except ImportError as e:
    info["ort"] = f"not installed: {e}"
print(json.dumps(info, indent=2))
EOF
  tail -1 "$LOG" >&2
  exit 2
fi
cat "$OUT/device_check_${DEVICE}_env.json"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")

if [ "$QUICK" = 1 ]; then
  step ddp 300 "$PY" bench/ddp_check.py --device "$DEVICE" --nproc 1 --torchrun --out "$OUT"
else
  step train_bench 110 "$PY" bench/train_bench.py --device "$DEVICE" --seconds 5 --out "$OUT"
  step infer_bench 100 "$PY" bench/infer_bench.py --device "$DEVICE" --out "$OUT"
  NPROC=(1)
  [ "$GPUS" -gt 1 ] && NPROC+=("$GPUS")
  step ddp 80 "$PY" bench/ddp_check.py --device "$DEVICE" --nproc "${NPROC[@]}" --torchrun --per-class 200 \
    --image-size 128 --batch-size 32 --out "$OUT"
  WORK=$(mktemp -d)
  step make_offline 150 "$PY" bench/scale.py --kit "$KIT" --sizes 4000 --keep --work "$WORK" \
    --out "$OUT/scale_$DEVICE.json"
  CLONE=$(find "$WORK" -maxdepth 2 -name dvc.yaml -printf '%h\n' | head -1)
  if [ -n "$CLONE" ] && [ -d "$CLONE/models/onnx" ]; then
    step load_test 80 "$PY" bench/load_test.py --onnx "$CLONE/models/onnx" --metrics "$CLONE/metrics/members" \
      --blend "$CLONE/metrics/blend.json" --params "$CLONE/params.yaml" --seconds 20 --warmup 5 --made-up-paths 0 \
      --idle-connections 0 --out "$OUT/load_$DEVICE.json"
  else
    STEPS+=("load_test not_run 0")
    summary
    echo "device_check: load_test not run: make offline left no exported model in $WORK" | tee -a "$LOG"
  fi
  rm -rf "$WORK"
fi

echo "wrote $OUT/device_check_$DEVICE.json"
for s in "${STEPS[@]}"; do [ "$(echo "$s" | cut -d' ' -f2)" = 0 ] || exit 1; done
