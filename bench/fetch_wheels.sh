#!/usr/bin/env bash
# Wheels for packages of requirements.txt that the GPU machine's image lacks (Python 3.12, x86-64), in the
# versions of this checkout's .venv, for bench/gpu_check.sh to install there (only those it lacks).
#
#   bash bench/fetch_wheels.sh [DEST]    # default .whl (added to .git/info/exclude: never committed)
#
# DeepSpeed (+ hjson, pydantic, pydantic-core, annotated-types, typing-inspection), lpips and nvtx: about
# 8 MB. DeepSpeed publishes only an sdist: it is built here into a pure-Python wheel (DS_BUILD_OPS=0,
# ops JIT-compile on first use). DALI (hundreds of MB) is too large to carry: gpu_check.sh then leaves
# tests/test_dali.py out and says so. With the device tool: carry [".whl"] in the run call.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
if [ "$DEST" = .whl ] && [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
  echo '/.whl/' >> .git/info/exclude
fi
mkdir -p "$DEST"
version() { "$PY" -c "from importlib import metadata; print(metadata.version('$1'))"; }
PINNED=()
for name in lpips nvtx hjson pydantic pydantic-core annotated-types typing-inspection; do
  PINNED+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PINNED[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"
ls -l "$DEST"
du -sh "$DEST"
