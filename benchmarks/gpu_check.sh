#!/usr/bin/env bash
# The GPU check: a few minutes on one CUDA GPU.
#   1. the tests that need CUDA (tests/test_cuda.py: CUDA step = CPU step, bf16 AMP and
#      fp16 and channels_last against fp32, pinned-memory loader, augmentation on the GPU equal
#      to the host's, sync on NCCL, train + eval CLI);
#   2. the train-step benchmark on CUDA for cifar10-tf (fp32, channels_last, bf16, both,
#      fp16 with loss scaling, torch.compile and CUDA graphs on bf16 channels_last);
#   3. the fast recipe's time to 93% with airbench94's widths, bf16 AMP and channels_last
#      (data/cifar10 when present, else GENERATED data, which says nothing about CIFAR-10
#      accuracy); its log shows images/sec.
# It uses the python that has a CUDA build of torch ($PYTHON, default python3) and runs
# the package from src/ without installing it (the repo pins the CPU wheel for CI).
# Results go to $OUT (default bench-results/gpu): JSON files and the printed logs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')"
"$PY" -m multitower devices 2>&1 | tee "$OUT/devices.txt"

echo "== 1. CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt"

echo "== 2. train step, cifar10-tf, batch 128"
"$PY" benchmarks/train_step.py --device cuda --steps 50 --reps 5 \
    --candidates default,fp32-cl,bf16,bf16-cl,fp16-cl,bf16-cl-compile,bf16-cl-graphs --out "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.txt"

echo "== 3. fast recipe: time to 93% (at most ${TTA_MINUTES:-4} minutes of training)"
DATA=data/cifar10
if [ ! -f "$DATA/multitower.json" ]; then
    DATA=/tmp/gpu-check-synthetic
    [ -f "$DATA/multitower.json" ] || "$PY" -m multitower data synth --out "$DATA"
    echo "gpu_check: no data/cifar10 here: the fast recipe runs on GENERATED data"
fi
"$PY" benchmarks/time_to_accuracy.py --recipe fast --data "$DATA" --device cuda --widths 64,256,256 \
    --batch-size 1024 --precision bf16 --channels-last --max-minutes "${TTA_MINUTES:-4}" \
    --run-dir "$OUT/tta-fast" --out "$OUT/time_to_accuracy-fast.json" 2>&1 | tee "$OUT/time_to_accuracy.txt"
echo "gpu_check: done; results in $OUT"
