#!/usr/bin/env bash
# The GPU checks in one call, on a lent GPU machine (../.library/device/README.md), after
# scripts/device_carry.sh has built .carry/ here:
#
#   run(command="bash scripts/device_check.sh", carry=[".carry"], timeout_s=560)
#
# 1. tests/test_gpu.py (FFCV views cut and augmented on the GPU, AMP fp16/bf16 training with
#    channels-last, the benchmark's device-memory column; DALI's tests skip: not carried);
# 2. issue 7's GPU table: train.py --benchmark, ResNet-50 at 2x224 + 6x96 multi-crop with the
#    labeled stream, FFCV, channels-last, bf16 then fp16.
# Logs and benchmark.json files land in $OUT. Each step has its own time limit, so one that
# hangs leaves time for the rest.
#
# Limitation: written without a GPU machine to try it on; the first session lent one runs it
# and fixes what it finds. The carried data is 1,000 images, so a batch of BATCH images gives
# only 1000 / BATCH steps an epoch and the epoch restarts count in the full-step rows.
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
BATCH=${BATCH:-128}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/.carry/py LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}
export SUNCET_SHARED_DATA=$PWD/.carry/shared NUMBA_CACHE_DIR=/tmp/numba-cache

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .carry/wheels/*.whl || exit 1
nvidia-smi -L
python3 -c "import torch, numba, numpy, ffcv, torch_optimizer
print('torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__,
      'cuda', torch.cuda.is_available())" || exit 1

timeout 240 python3 -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py 2>&1 \
    | tee "$OUT/test_gpu.log"

for precision in bf16 fp16; do
    timeout 120 python3 train.py --config configs/imagenet.toml --data .carry/in-sample \
        --labels all --device cuda --precision "$precision" --batch-size "$BATCH" \
        --num-workers 16 --pipeline ffcv --out "/tmp/bench-$precision" --cache-dir /tmp/cache \
        --benchmark --bench-warmup 3 --bench-steps 10 2>&1 | tee "$OUT/bench-$precision.log"
    cp "/tmp/bench-$precision/benchmark.json" "$OUT/benchmark-$precision.json" 2>/dev/null
done
ls -la "$OUT"
