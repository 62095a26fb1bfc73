#!/usr/bin/env bash
# Profile whole training steps (fast path, hptransfer.step.train_step) at one resolution.
#
#   bash bench/profile.sh [RESOLUTION] [extra bench_train.py Runner args via env: BATCH, WIDTH, STEPS]
#
# Output goes to PROFILE_OUT (default bench/results). With a GPU and nsys on PATH: Nsight Systems with
# the NVTX phase ranges (HPTRANSFER_NVTX=1), capturing only the profiled steps (cudaProfilerApi range)
# -> profile-<device>-<R>.nsys-rep plus a text summary (nsys stats: NVTX ranges, top CUDA kernels) in
# profile-<device>-<R>.txt (the stats CSVs go to a temporary directory).
# Otherwise torch.profiler -> a gzipped Chrome trace profile-<device>-<R>.trace.json.gz (open in
# ui.perfetto.dev) and the environment and top ops by self time in profile-<device>-<R>.txt.
# Phase names match hptransfer/step.py.
set -euo pipefail
cd "$(dirname "$0")/.."
R="${1:-128}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
OUT="${PROFILE_OUT:-bench/results}"
mkdir -p "$OUT"
DEV=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower() if torch.cuda.is_available() else 'cpu')")
BASE="${OUT}/profile-${DEV}-${R}"
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

if [ "$HAS_CUDA" = 1 ] && command -v nsys >/dev/null 2>&1; then
  HPTRANSFER_NVTX=1 PROFILE_TOOL=nsys nsys profile -t cuda,nvtx,osrt --capture-range=cudaProfilerApi \
      --capture-range-end=stop -f true -o "$BASE" "$PY" bench/profile_step.py "$R"
  STATS=$(mktemp -d)
  trap 'rm -rf "$STATS"' EXIT
  nsys stats -r nvtx_sum,cuda_gpu_kern_sum -f csv -o "$STATS/s" "$BASE.nsys-rep" >/dev/null
  { echo "nsys profile of $R px training steps on $DEV ($(date -u +%FT%TZ))"
    echo "== NVTX phases (hptransfer.profiling) =="; head -n 20 "$STATS/s_nvtx_sum.csv" || true
    echo "== top CUDA kernels by total time =="; head -n 25 "$STATS/s_cuda_gpu_kern_sum.csv" || true
  } > "$BASE.txt.tmp" && mv "$BASE.txt.tmp" "$BASE.txt"
else
  [ "$HAS_CUDA" = 1 ] && echo "nsys not found: using torch.profiler"
  PROFILE_OUT="$OUT" PROFILE_TOOL=torch "$PY" bench/profile_step.py "$R"
fi
echo "summary: $BASE.txt"
