#!/usr/bin/env bash
# The GPU checks in one call, on a lent GPU machine (../.library/device/README.md), after
# scripts/device_carry.sh has built .carry/ here:
#
#   run(command="bash scripts/device_check.sh", carry=[".carry"], timeout_s=420)
#
# 1. tests/test_gpu.py (FFCV views cut and augmented on the GPU, AMP fp16/bf16 training with
#    channels-last, the benchmark's device-memory column; DALI's tests skip: not carried);
# 2. issue 7's GPU table: train.py --benchmark, ResNet-50 at 2x224 + 6x96 multi-crop with the
#    labeled stream, FFCV, channels-last, bf16 then fp16.
# Logs and benchmark.json files land in $OUT. Each step has its own time limit (150 + 2 x 100 s
# at most, plus the install), so one that hangs leaves time for the rest, and the whole call
# leaves time in a session's 15 device minutes to fix something and run it again.
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
# FFCV 1.0.2 imports distutils.log (gone from Python 3.12 unless setuptools provides it).
if ! python3 -c "import distutils.log" 2>/dev/null; then
    mkdir -p /tmp/shim/distutils && touch /tmp/shim/distutils/__init__.py
    echo "from logging import warning as warn" > /tmp/shim/distutils/log.py
    export PYTHONPATH=$PYTHONPATH:/tmp/shim
fi
nvidia-smi -L
python3 -c "import torch, numba, numpy, ffcv, torch_optimizer
from numba import njit, prange
@njit(parallel=True)
def total(a):
    s = 0.0
    for i in prange(a.size):
        s += a[i]
    return s
total(numpy.ones(64))  # FFCV's kernels need numba's tbb or omp layer, not workqueue
print('torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__,
      'cuda', torch.cuda.is_available(), 'numba threads', numba.threading_layer())" || exit 1

timeout 150 python3 -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py 2>&1 \
    | tee "$OUT/test_gpu.log"

for precision in bf16 fp16; do
    timeout 100 python3 train.py --config configs/imagenet.toml --data .carry/in-sample \
        --labels all --device cuda --precision "$precision" --batch-size "$BATCH" \
        --num-workers 16 --pipeline ffcv --out "/tmp/bench-$precision" --cache-dir /tmp/cache \
        --benchmark --bench-warmup 3 --bench-steps 10 2>&1 | tee "$OUT/bench-$precision.log"
    cp "/tmp/bench-$precision/benchmark.json" "$OUT/benchmark-$precision.json" 2>/dev/null
done
ls -la "$OUT"
