#!/usr/bin/env bash
# The whole GPU validation as one command, sized for one H100/H200 in at most 9 minutes:
#
#   bash bench/gpu_check.sh OUTDIR             # on the GPU machine
#   bash bench/gpu_check.sh OUTDIR --dry-run   # every step at toy size on the CPU (CI: tests/test_gpu_check.py)
#
# Steps, each under its own `timeout` so one failure or hang does not eat the rest, all within
# GPU_CHECK_BUDGET_S seconds (default 540 on the GPU, 1500 for the dry run; a step that would start with less than 30 s left per step
# still to run is cut short, and one with nothing left is reported "not run"):
#   install      missing wheels from GPU_CHECK_WHEELS (default .whl, if it exists: see bench/fetch_wheels.sh),
#                then `pip install --no-deps --no-build-isolation -e .` (builds hptransfer._C with nvcc) and
#                a check that the extension has its CUDA part (dry run: pip --dry-run, nothing is built)
#   pytest       HPTRANSFER_STRICT=1 pytest --require-cuda -m cuda tests (dry run: collection only)
#   sync_check   one 1024-px training step under torch.cuda.set_sync_debug_mode("error") (bench/sync_check.py)
#   compile      tests/compile_kernels.py: every kernel for sm_80/sm_90 with this machine's Triton
#   kernels      bench/bench_kernels.py
#   local_loss   bench/bench_local_loss.py (--repeat 5)
#   profile      bench/profile.sh 1024 (Nsight Systems when nsys is on PATH, else torch.profiler + NVTX names)
#   train        bench/bench_train.py --resolution 256 512 1024 --mode both --max-batch (JSON after each size)
# OUTDIR receives at most 8 files: summary.txt (one line per step), log.txt (every step's output), and
# sync_check-, kernels-, local_loss-, train-<device>.json, profile-<device>-<R>.txt and its trace
# (.trace.json.gz, or .nsys-rep under nsys). Every JSON carries bench.common.environment() (versions,
# CPU flags, GPU, hptransfer.ops.backend_status()). Copy them into bench/results/ to commit them.
# Exit status: 0 when every step passed. PYTHON picks the interpreter (default .venv/bin/python if
# present, else python3). A tree copied without .git (the device tool's) names its commit in
# HPTRANSFER_GIT_COMMIT.
set -uo pipefail

usage() { echo "usage: bash bench/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
OUTDIR=$1
DRY=0
if [ $# = 2 ]; then [ "$2" = --dry-run ] && DRY=1 || usage; fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels on the GPU; the dry run never launches a Triton kernel
# the GPU lease is short: 9 minutes there; the CPU dry run only must finish (a loaded CI box is slow)
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$DRY" = 1 ] && echo 1500 || echo 540)}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
LOG=$OUTDIR/log.txt
SUMMARY=$OUTDIR/summary.txt
START=$(date +%s)
: > "$LOG"
SCRATCH=$(mktemp -d)  # outside OUTDIR, which holds at most 8 files
trap 'rm -rf "$SCRATCH"' EXIT

DEV=$("$PY" -c "import sys; sys.path.insert(0, '.'); from bench.common import device_name; print(device_name())") || {
  echo "gpu_check: $PY cannot import torch" | tee "$SUMMARY"; exit 1; }
if [ "$DRY" = 0 ] && [ "$DEV" = cpu ]; then
  echo "gpu_check: no CUDA device visible to $PY (use --dry-run on a machine without a GPU)" | tee "$SUMMARY"
  exit 1
fi
TOY=(--width 0.03125 --vgg-layers relu1_2)  # toy size: 1/32 of the channels, VGG up to its second conv

STEPS=(install pytest sync_check compile kernels local_loss profile train)
RESULTS=()
FAILED=0

# run_step NAME BOX_S NOTE CMD...: run CMD under a time box, log its output, record its result
run_step() {
  local name=$1 box=$2 note=$3; shift 3
  local now left after reserve rc t0 dt result
  now=$(date +%s)
  left=$((BUDGET - (now - START)))
  after=0
  local seen=0 s
  for s in "${STEPS[@]}"; do
    [ "$seen" = 1 ] && after=$((after + 1))
    [ "$s" = "$name" ] && seen=1
  done
  reserve=$((after * 30))  # leave the later steps 30 s each
  [ $((left - reserve)) -lt "$box" ] && box=$((left - reserve))
  [ "$box" -gt "$left" ] && box=$left
  if [ "$box" -lt 5 ]; then
    result="not run (time budget spent)"
    FAILED=1
    RESULTS+=("$(printf '%-11s %-8s %5s s  %s' "$name" "SKIP" 0 "$result")")
    echo "== $name: $result" | tee -a "$LOG"
    return
  fi
  echo "== $name (time box ${box} s): $*" | tee -a "$LOG"
  t0=$(date +%s)
  timeout --kill-after=10 "$box" "$@" >"$SCRATCH/step.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  cat "$SCRATCH/step.log" >>"$LOG"
  [ "$rc" = 0 ] || tail -n 40 "$SCRATCH/step.log"  # the reason, where the caller sees it
  if [ "$rc" = 0 ]; then
    result="PASS"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    result="TIMEOUT"; FAILED=1; note="stopped at its ${box}-s time box${note:+; $note}"
  else
    result="FAIL"; FAILED=1; note="exit status $rc${note:+; $note}"
  fi
  RESULTS+=("$(printf '%-11s %-8s %5s s  %s' "$name" "$result" "$dt" "$note")")
  echo "== $name: $result in ${dt} s ${note:+($note)}" | tee -a "$LOG"
}

# ---------------------------------------------------------------- install
step_install() {
  local pipdry=() missing=()
  [ "$DRY" = 1 ] && pipdry=(--dry-run)
  if [ -d "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    # only distributions this interpreter lacks: the machine's own versions stay
    mapfile -t missing < <("$PY" - "$WHEELS"/*.whl <<'EOF'
import sys
from importlib import metadata
for wheel in sys.argv[1:]:
    name = wheel.rsplit("/", 1)[-1].split("-")[0]
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(wheel)
EOF
)
    echo "wheels in $WHEELS; missing here: ${missing[*]:-none}"
    if [ ${#missing[@]} -gt 0 ]; then
      "$PY" -m pip install "${pipdry[@]}" --no-index --no-deps --no-compile "${missing[@]}" || return 1
    fi
  fi
  "$PY" -m pip install "${pipdry[@]}" --no-deps --no-build-isolation -e . || return 1
  "$PY" - "$DRY" <<'EOF'
import json
import sys

import hptransfer.kernels  # noqa: F401
import torch
from hptransfer.ops import backend_status

status = backend_status()
print(json.dumps(status, indent=1))
if sys.argv[1] == "0":
    assert torch.cuda.is_available(), "no CUDA device"
    assert status["extension_cuda"], f"hptransfer._C has no CUDA part: {status['extension']}"
    assert status["triton"] == "available", status["triton"]
EOF
}

# ---------------------------------------------------------------- pytest
step_pytest() {
  local args=(-m cuda tests -q -p no:cacheprovider)
  if ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
    args+=(--ignore tests/test_dali.py)
  fi
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest "${args[@]}" --collect-only
  else
    HPTRANSFER_STRICT=1 "$PY" -m pytest --require-cuda "${args[@]}"
  fi
}
PYTEST_NOTE=""
"$PY" -c "import nvidia.dali" 2>/dev/null || PYTEST_NOTE="nvidia.dali missing: tests/test_dali.py (GPU decode) not collected"

COMMIT=$("$PY" -c "import sys; sys.path.insert(0, '.'); from bench.common import git_commit; print(git_commit())")
{ echo "gpu_check $([ "$DRY" = 1 ] && echo "DRY RUN (toy sizes, CPU)" || echo "on $DEV") of commit $COMMIT, $(date -u +%FT%TZ)"
  "$PY" -c "import platform, torch; import triton; print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 | head -n 1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} 2>&1 | tee -a "$LOG"

export PY DRY WHEELS
export -f step_install step_pytest  # `timeout` runs commands, not functions: they run in `bash -c`
run_step install 240 "" bash -c step_install
run_step pytest 150 "$PYTEST_NOTE" bash -c step_pytest
if [ "$DRY" = 1 ]; then
  run_step sync_check 240 "CPU: code path only" "$PY" bench/sync_check.py --resolution 64 --batch 1 "${TOY[@]}" --warmup 1 \
      --out "$OUTDIR/sync_check-$DEV.json"
else
  run_step sync_check 90 "" env HPTRANSFER_STRICT=1 "$PY" bench/sync_check.py --out "$OUTDIR/sync_check-$DEV.json"
fi
run_step compile 90 "" "$PY" tests/compile_kernels.py
if [ "$DRY" = 1 ]; then
  run_step kernels 240 "" "$PY" bench/bench_kernels.py --resolutions 64 --batches 1 --out "$OUTDIR/kernels-$DEV.json"
  run_step local_loss 240 "" "$PY" bench/bench_local_loss.py --sizes 64 --batches 1 --repeat 1 --vgg-layers relu1_2 \
      --out "$OUTDIR/local_loss-$DEV.json"
  run_step profile 240 "" env PYTHON="$PY" PROFILE_OUT="$OUTDIR" BATCH=1 WIDTH=0.03125 STEPS=1 VGG_LAYERS=relu1_2 \
      bash bench/profile.sh 64
  run_step train 300 "" "$PY" bench/bench_train.py --resolution 64 --batch 1 --steps 1 --warmup 1 "${TOY[@]}" \
      --mode both --max-batch --out "$OUTDIR/train-$DEV.json"
else
  run_step kernels 90 "" "$PY" bench/bench_kernels.py --out "$OUTDIR/kernels-$DEV.json"
  run_step local_loss 90 "" "$PY" bench/bench_local_loss.py --repeat 5 --out "$OUTDIR/local_loss-$DEV.json"
  run_step profile 90 "" env PYTHON="$PY" PROFILE_OUT="$OUTDIR" STEPS=2 bash bench/profile.sh 1024
  run_step train 600 "JSON rewritten after each resolution" "$PY" bench/bench_train.py --resolution 256 512 1024 \
      --mode both --max-batch --steps 3 --warmup 1 --out "$OUTDIR/train-$DEV.json"
fi

{
  head -n 1 "$LOG"
  sed -n 2p "$LOG"
  printf '%-11s %-8s %7s  %s\n' step result time note
  printf '%s\n' "${RESULTS[@]}"
  echo "total $(($(date +%s) - START)) s of a ${BUDGET}-s budget; files in $OUTDIR: summary.txt" \
       "$(cd "$OUTDIR" && ls | grep -v '^summary\.txt' | tr '\n' ' ')"
  [ "$FAILED" = 0 ] && echo "ALL PASSED" || echo "FAILED: see log.txt"
} > "$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
echo
cat "$SUMMARY"
exit "$FAILED"
