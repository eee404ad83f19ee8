#!/usr/bin/env bash
# Builds .carry/ on this (CPU) machine: what scripts/device_check.sh needs on a lent GPU machine,
# which downloads nothing, runs Python 3.12 with its own torch, numba and OpenCV wheel, and gets
# only the working tree plus up to 64 MiB of carried paths (../.library/device/README.md).
#
#   bash scripts/device_carry.sh        # here, after scripts/setup.sh; ~2 min
#   then the device tool: run(command="bash scripts/device_check.sh", carry=[".carry"])
#
# .carry/wheels  FFCV 1.0.2 built for CPython 3.12 against this machine's OpenCV and
#                libjpeg-turbo; torch-optimizer and pytorch-ranger (pure Python)
# .carry/py      DALI's wds2idx.py (pure Python), so that tests can write DALI shards
# .carry/lib     the shared libraries FFCV's C extension links, except glibc's, libstdc++,
#                libgcc and zlib (the GPU machine has those)
# .carry/in-sample  the 1,000 ImageNet JPEGs converted at max side 256 (train.beton + manifest)
# .carry/shared  a CIFAR-10 tarball holding the images tests/conftest.py extracts (60 a class of
#                train and test), named as in ../shared/data, for SUNCET_SHARED_DATA
#
# Limitation: nvidia-dali is not carried (installed, it is 476 MB, far above what one call
# can carry), so DALI's `mixed` decode cannot be checked this way; its GPU tests skip there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY312:-}" ]]; then  # the first Python 3.12 that runs (a pyenv shim may not)
    for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        if "$candidate" -c "" 2>/dev/null; then PY312=$candidate; break; fi
    done
fi
SHARED=${SUNCET_SHARED_DATA:-../shared/data}
[[ -x .venv/bin/python ]] || { echo "run scripts/setup.sh first" >&2; exit 1; }
[[ -n "${PY312:-}" ]] || { echo "no python3.12 found (set PY312)" >&2; exit 1; }

rm -rf .carry && mkdir -p .carry/wheels .carry/lib .carry/shared .carry/py
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT

# 1. Wheels.
"$PY312" -m venv "$build/venv"
"$build/venv/bin/pip" install -q wheel setuptools numpy
"$build/venv/bin/pip" wheel -q --no-deps --no-build-isolation ffcv==1.0.2 -w .carry/wheels
.venv/bin/pip download -q --no-deps torch-optimizer==0.3.0 pytorch-ranger==0.1.1 -d .carry/wheels

# DALI's wds2idx (one pure-Python file; the DALI converter indexes shards with it), without DALI.
cp .venv/lib/python3*/site-packages/wds2idx.py .carry/py/

# 2. FFCV's shared libraries.
mkdir "$build/ffcv" && (cd "$build/ffcv" && unzip -q "$OLDPWD"/.carry/wheels/ffcv-*.whl)
ldd "$build"/ffcv/ffcv/_libffcv*.so | awk '$3 ~ /^\// {print $3}' \
    | grep -Ev '/(libc|libm|libstdc\+\+|libgcc_s|libz|libpthread|libdl|librt)\.so' \
    | while read -r lib; do cp -L "$lib" .carry/lib/; done

# 3. Data.
.venv/bin/python - "$SHARED" <<'EOF'
import shutil, sys, tarfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, ".")
from bench.loaders import prepare_data

shared = Path(sys.argv[1])
data = prepare_data("imagenet", Path("/tmp/suncet-bench"))  # converted once, then reused
out = Path(".carry/in-sample")
out.mkdir()
for name in ("manifest.json", "train.beton"):
    shutil.copy(data / name, out / name)

taken = defaultdict(int)
with tarfile.open(shared / "cifar10-jpeg.tar.gz") as src, \
        tarfile.open(".carry/shared/cifar10-jpeg.tar.gz", "w:gz") as dst:
    for m in src:
        parts = Path(m.name).parts
        if m.isfile() and len(parts) == 4 and parts[1] in ("train", "test"):
            if taken[parts[1], parts[2]] < 60:
                taken[parts[1], parts[2]] += 1
                dst.addfile(m, src.extractfile(m))
print(f"cifar subset: {sum(taken.values())} images")
EOF
du -sh .carry .carry/*
