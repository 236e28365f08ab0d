#!/usr/bin/env bash
# The GPU check: a few minutes on one CUDA GPU.
#   1. the tests that need CUDA (tests/test_cuda.py: CUDA step = CPU step, bf16 AMP and
#      fp16 and channels_last against fp32, pinned-memory loader, augmentation on the GPU equal
#      to the host's, sync on NCCL, train + eval CLI);
#   2. the train-step benchmark of cifar10-tf on CUDA at batch 128 against a plain eager fp32
#      step (fp32, channels_last, bf16, both, fp16 with loss scaling), and of the fast
#      recipe's airbench network (fp32 and bf16, both layouts);
#   3. the fast recipe's time to 93% with airbench94's widths and batch, bf16 AMP and
#      channels_last, once per seed in TTA_SEEDS (default 0);
#   4. the cifar10-tf step with torch.compile and with CUDA graphs (compiling takes a while,
#      so it comes after the rest);
#   5. (only when PARTS names it) the tutorial recipe's time to accuracy, TUTORIAL_MINUTES
#      (default 2) of training.
#   6. the whole `train` job against its own step (benchmarks/train_e2e.py, issue 20): the
#      tutorial recipe with its summaries, logs and checkpoints (1,050 steps: the checkpoint
#      of step 1000 inside the timed window); the same job with --compile reduce-overhead;
#      the fast recipe at airbench94's widths, batch and bf16 for 10 epochs (440 steps);
#      loop efficiency = job / step, peak RSS and max_memory_allocated in the JSON.
#   7. two ranks on the one GPU over gloo (--workers 2) against one rank, the whole job
#      (workers beyond the GPUs wrap around to cuda:0, and their group is gloo: NCCL
#      refuses two ranks on one device). Not yet run on a GPU.
#   8. airbench94's own script as a control for part 6's fast recipe, when AIRBENCH94
#      names its airbench94.py (run as it is, in its own directory; it prints its times).
# PARTS picks the parts (default "1 2 3 4 6 8"), e.g. PARTS="1 3 5" to rerun some.
# Data: data/cifar10 when present; else, with CIFAR_JPEG=<ImageFolder of CIFAR-10 JPEGs>, it
# is imported there first (45,000 train / 5,000 val); else GENERATED data, which says nothing
# about CIFAR-10 accuracy.
# Each part runs under its own time limit (seconds: TESTS_S, STEP_S, TTA_S, COMPILE_S,
# TUTORIAL_S, E2E_S, AIRBENCH_S) and a
# failing part does not stop the others; $OUT/summary.txt lists each part's exit status.
# It uses the python that has a CUDA build of torch ($PYTHON, default python3) and runs
# the package from src/ without installing it (the repo pins the CPU wheel for CI).
# Results go to $OUT (default bench-results/gpu): JSON files and the printed logs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench-results/gpu}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# part NAME SECONDS LOG COMMAND...: run COMMAND under a time limit, its output shown and
# kept in $OUT/LOG, and its exit status and duration appended to the summary.
part() {
    local name=$1 limit=$2 log=$3 start=$SECONDS rc
    shift 3
    echo "== $name (at most $limit s)"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$log"
    rc=${PIPESTATUS[0]}
    echo "gpu_check: $name: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)') after $((SECONDS - start)) s" \
        | tee -a "$OUT/summary.txt"
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')" \
    || exit 1
"$PY" -m multitower devices 2>&1 | tee "$OUT/devices.txt"

DATA=data/cifar10
if [ ! -f "$DATA/multitower.json" ] && [ -n "${CIFAR_JPEG:-}" ]; then
    part "import $CIFAR_JPEG" 300 import.txt "$PY" -m multitower data import "$CIFAR_JPEG" --out "$DATA" --val 5000
fi
if [ ! -f "$DATA/multitower.json" ]; then
    DATA=/tmp/gpu-check-synthetic
    [ -f "$DATA/multitower.json" ] || "$PY" -m multitower data synth --out "$DATA"
    echo "gpu_check: no data/cifar10 here: the benchmarks run on GENERATED data" | tee -a "$OUT/summary.txt"
fi

PARTS=" ${PARTS:-1 2 3 4 6 8} "
wanted() { [[ $PARTS == *" $1 "* ]]; }

wanted 1 && part "1. CUDA tests" "${TESTS_S:-240}" tests.txt "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py

wanted 2 && part "2a. train step, cifar10-tf, batch 128" "${STEP_S:-150}" train_step.txt \
    "$PY" benchmarks/train_step.py --device cuda --data "$DATA" --steps 50 --reps 5 \
    --candidates default,fp32-cl,bf16,bf16-cl,fp16-cl --out "$OUT/train_step.json"
wanted 2 && part "2b. train step, airbench 64,256,256, batch 1024" "${STEP_S:-150}" fast_throughput.txt \
    "$PY" benchmarks/fast_throughput.py --device cuda --data "$DATA" --widths 64,256,256 --batch-size 1024 \
    --precisions fp32 bf16 --threads "$(nproc)" --steps 10 --reps 5 --out "$OUT/fast_throughput.json"

for seed in ${TTA_SEEDS:-0}; do
    wanted 3 && part "3. fast recipe, seed $seed: time to 93%" "${TTA_S:-300}" "time_to_accuracy-fast-$seed.txt" \
        "$PY" benchmarks/time_to_accuracy.py --recipe fast --data "$DATA" --device cuda --widths 64,256,256 \
        --batch-size 1024 --precision bf16 --channels-last --seed "$seed" --max-minutes "${TTA_MINUTES:-4}" \
        --run-dir "${RUN_DIR:-/tmp/gpu-check-runs}/tta-fast-$seed" --out "$OUT/time_to_accuracy-fast-$seed.json"
done

wanted 4 && part "4. train step, cifar10-tf, compiled" "${COMPILE_S:-300}" train_step_compiled.txt \
    "$PY" benchmarks/train_step.py --device cuda --data "$DATA" --steps 50 --reps 5 \
    --candidates bf16-cl,bf16-cl-compile,bf16-cl-graphs --out "$OUT/train_step_compiled.json"

wanted 5 && part "5. tutorial recipe: time to accuracy" "${TUTORIAL_S:-300}" time_to_accuracy-tutorial.txt \
    "$PY" benchmarks/time_to_accuracy.py --recipe tutorial --data "$DATA" --device cuda --steps 60000 \
    --eval-every 2 --weights ema raw --max-minutes "${TUTORIAL_MINUTES:-2}" \
    --run-dir "${RUN_DIR:-/tmp/gpu-check-runs}/tta-tutorial" --out "$OUT/time_to_accuracy-tutorial.json"

wanted 6 && part "6. whole train job vs its step (tutorial, reduce-overhead, fast)" "${E2E_S:-600}" train_e2e.txt \
    "$PY" benchmarks/train_e2e.py --device cuda --data "$DATA" --cases tutorial,compiled,fast --steps 1050 \
    --fast-steps 440 --fast-flags "--widths 64,256,256 --batch-size 1024 --precision bf16 --channels-last" \
    --reps 3 --out "$OUT/train_e2e.json"

wanted 7 && part "7. two ranks on one GPU (gloo) vs one" "${E2E_S:-600}" train_e2e_two_ranks.txt \
    "$PY" benchmarks/train_e2e.py --device cuda --data "$DATA" --cases tutorial,workers2 --steps 550 \
    --reps 3 --out "$OUT/train_e2e_two_ranks.json"

if wanted 8 && [ -n "${AIRBENCH94:-}" ] && [ -f "$AIRBENCH94" ]; then
    part "8. airbench94's own script (control for part 6's fast recipe)" "${AIRBENCH_S:-300}" airbench94.txt \
        bash -c 'cd "$(dirname "$1")" && "$2" "$(basename "$1")"' _ "$AIRBENCH94" "$PY"
elif wanted 8; then
    echo "gpu_check: 8. skipped: set AIRBENCH94 to airbench94.py to run the control" | tee -a "$OUT/summary.txt"
fi

echo "== summary"
cat "$OUT/summary.txt"
! grep -q "exit [1-9]" "$OUT/summary.txt"
