#!/usr/bin/env bash
# Sets up a fresh Debian machine: system libraries for FFCV, then a virtual environment in .venv
# with the pinned dependencies from setup.cfg. Safe to run again; it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null; then
  echo "setup: $PY not found; suncet-trainer needs Python 3.11+ (set PYTHON=/path/to/python3)" >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: $PY is $("$PY" --version 2>&1); suncet-trainer needs Python 3.11+" \
    "(set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
# FFCV's system libraries, and what a venv and FFCV's source build need (a compiler, headers).
pkgs="pkg-config libturbojpeg0-dev libopencv-dev python3-venv python3-dev build-essential"
missing=""
for pkg in $pkgs; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "setup: installing system packages:$missing"
  $SUDO apt-get update -q
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing
fi

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
