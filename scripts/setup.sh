#!/usr/bin/env bash
# Sets up a fresh Debian machine: system libraries for FFCV, then a virtual environment in .venv
# with the pinned dependencies from setup.cfg. Safe to run again; it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
need_apt=0
for pkg in pkg-config libturbojpeg0-dev libopencv-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt=1
done
if [ "$need_apt" -eq 1 ]; then
  echo "setup: installing FFCV's system libraries (pkg-config, libturbojpeg, OpenCV)"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q pkg-config libturbojpeg0-dev libopencv-dev
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.setup-$(sha1sum setup.cfg | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  # numpy and numba first: ffcv's source build imports them.
  .venv/bin/pip install -q numpy numba
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
echo "setup: ready (.venv)"
