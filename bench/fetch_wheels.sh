#!/usr/bin/env bash
# Wheels for what bench/gpu_check.sh needs and the GPU machine's image lacks (Python 3.12, x86-64), in the
# versions of this checkout's .venv; gpu_check.sh installs them there offline (each one only where the
# machine lacks its distribution or has an older version).
#
#   bash bench/fetch_wheels.sh [DEST]    # default .whl (in .gitignore: never committed)
#
# What the image lacks (docs: the device README's package list): DeepSpeed 0.19.8 and its pure-Python
# needs hjson, pydantic, pydantic-core (compiled, cp312), annotated-types, typing-inspection, plus
# typing-extensions (pydantic needs a newer one than the image may have); lpips. DeepSpeed's
# other needs (einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo, tqdm) are in the image.
# About 5 MB in all. DeepSpeed publishes only an sdist: it is built here into a pure-Python wheel
# (DS_BUILD_OPS=0, ops JIT-compile on first use; the trainer needs none). DALI (nvidia-dali-cuda130 2.4.0,
# hundreds of MB: 476 MB installed here) does not fit the 64 MiB that a device call may carry: gpu_check.sh
# then skips its dali step and leaves tests/test_dali.py out, and says so. With the device tool: carry
# [".whl"] in the run call.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DEST"
version() { "$PY" -c "from importlib import metadata; print(metadata.version('$1'))"; }
PINNED=()
for name in lpips hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  PINNED+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PINNED[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"
ls -l "$DEST"
du -sh "$DEST"
