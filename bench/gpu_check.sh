#!/usr/bin/env bash
# The whole GPU validation as one command, sized for one H100/H200 inside 480 s of wall time:
#
#   bash bench/gpu_check.sh OUTDIR             # on the GPU machine (docs/development.md, "GPU check")
#   bash bench/gpu_check.sh OUTDIR --dry-run   # every step at toy size on the CPU (CI: tests/test_gpu_check.py)
#
# Steps, most valuable first, each under its own time box and all within GPU_CHECK_BUDGET_S seconds (default
# 480 on the GPU, 1500 for the dry run); every step writes its JSON as soon as it has a number:
#   install     wheels from GPU_CHECK_WHEELS (default .whl: bench/fetch_wheels.sh) whose distribution this
#               interpreter lacks or has older, strictly offline; hptransfer._C built for this GPU's own
#               architecture: `pip install -e .` where the environment is writable, else an in-place build
#               and PYTHONPATH (dry run: pip --dry-run, nothing built)
#   pytest      HPTRANSFER_STRICT=1 pytest --require-cuda -m cuda tests (dry run: collection only)
#   sync_check  bench/sync_check.py at 512 px (local perceptual loss) and 1024 px (local discriminators)
#   train       bench/bench_train.py: 1024 px fast vs naive and its max batch (+/- checkpointing), then 256, 512
#   deepspeed   bench/ds_check.py: one GPU, ZeRO-2 bf16, 3 steps, stop, resume 1 step, bit-exact
#   compile     bench/bench_train.py --compile blocks: compiled vs eager at 256 px
#   fp16        bench/bench_train.py --amp fp16 --grad-check at 1024 px: finite losses, global gradient kept
#   profile     bench/profile.sh 1024, one step (torch.profiler; nsys where it is on PATH), trace under 16 MiB
#   kernels     bench/bench_kernels.py at 1024 px
#   local_loss  bench/bench_local_loss.py at 512 px
#   dali        bench/bench_data.py with the DALI loader, only where nvidia.dali imports (its wheel is too
#               large to carry to the GPU machine: see bench/fetch_wheels.sh)
# A step that fails or overruns its own box is FAIL/TIMEOUT. When the budget runs out, the running step is
# ended (CUT) and it and every later step are reported; the summary's last line is then PARTIAL, with the
# files written so far. GPU_CHECK_STEPS="install train ..." runs only the steps named (the others: SKIP).
# OUTDIR receives at most 8 files: summary.txt (one line per step, the verdict last), log.txt (every step's
# output), gpu_check-<device>.json (each step's result and the small steps' numbers: install's backend status,
# pytest's counts, sync_check, deepspeed, compile, fp16, dali), train-, kernels-, local_loss-<device>.json and
# profile-<device>-<R>.txt with its trace. Every JSON carries bench.common.environment(). Copy them into
# bench/results/ to commit them. Exit status: 0 all passed, 1 a step failed, 3 partial (budget spent).
# PYTHON picks the interpreter (default .venv/bin/python if present, else python3). A tree copied without
# .git (the device tool's) names its commit in HPTRANSFER_GIT_COMMIT.
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
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$DRY" = 1 ] && echo 1500 || echo 480)}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SELECTED=${GPU_CHECK_STEPS:-}
LOG=$OUTDIR/log.txt
SUMMARY=$OUTDIR/summary.txt
START=$(date +%s)
: > "$LOG"
SCRATCH=$(mktemp -d)  # outside OUTDIR, which holds at most 8 files
trap 'rm -rf "$SCRATCH"' EXIT

# one interpreter start for the device, the commit and the versions (importing torch takes seconds)
FACTS=$("$PY" -c "
import platform, sys
import torch, triton
sys.path.insert(0, '.')
from bench.common import device_name, git_commit
print(device_name()); print(git_commit())
print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')
") || { echo "gpu_check: $PY cannot import torch and triton" | tee "$SUMMARY"; exit 1; }
DEV=$(sed -n 1p <<<"$FACTS")
COMMIT=$(sed -n 2p <<<"$FACTS")
if [ "$DRY" = 0 ] && [ "$DEV" = cpu ]; then
  echo "gpu_check: no CUDA device visible to $PY (use --dry-run on a machine without a GPU)" | tee "$SUMMARY"
  exit 1
fi
REPORT=$OUTDIR/gpu_check-$DEV.json
TOY=(--width 0.03125 --vgg-layers relu1_2)  # toy size: 1/32 of the channels, VGG up to its second conv

RESULTS=()
FAILED=()
CUT=""       # the step the budget ended, once it has
NOT_RUN=()   # steps after it

# record NAME RESULT SECONDS NOTE [JSON]: a summary line, and the step (with its JSON, if any) in REPORT
record() {
  local name=$1 result=$2 dt=$3 note=$4 json=${5:-}
  RESULTS+=("$(printf '%-11s %-8s %5s s  %s' "$name" "$result" "$dt" "$note")")
  "$PY" - "$REPORT" "$name" "$result" "$dt" "$note" "$json" "$DRY" "$BUDGET" "$COMMIT" "$DEV" <<'EOF'
import json, os, sys
from pathlib import Path
report, name, result, dt, note, data, dry, budget, commit, device = sys.argv[1:]
report = Path(report)
doc = json.loads(report.read_text()) if report.is_file() else {
    "check": "gpu_check", "device": device, "dry_run": dry == "1", "git_commit": commit, "budget_s": int(budget),
    "steps": {}}
step = {"result": result, "seconds": int(dt), "note": note}
if data and Path(data).is_file():  # the step's scripts write atomically: what is there is whole
    step["data"] = json.loads(Path(data).read_text())
doc["steps"][name] = step
tmp = report.with_suffix(".json.tmp")
tmp.write_text(json.dumps(doc, indent=1) + "\n")
os.replace(tmp, report)
EOF
}

selected() { [ -z "$SELECTED" ] || [[ " $SELECTED " == *" $1 "* ]]; }

# run_step NAME BOX_S NOTE JSON CMD...: CMD under min(BOX_S, the budget left); log, summary line, REPORT entry
run_step() {
  local name=$1 box=$2 note=$3 json=$4; shift 4
  local left limit rc t0 dt result
  if ! selected "$name"; then record "$name" SKIP 0 "not selected (GPU_CHECK_STEPS)"; return; fi
  if [ -n "$CUT" ]; then
    NOT_RUN+=("$name"); record "$name" "NOT RUN" 0 "the budget ran out at $CUT"; return
  fi
  left=$((BUDGET - ($(date +%s) - START)))
  limit=$box
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 3 ]; then
    CUT=$name; NOT_RUN+=("$name"); record "$name" "NOT RUN" 0 "budget of ${BUDGET} s spent"; return
  fi
  echo "== $name (time box ${limit} s): $*" | tee -a "$LOG"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$SCRATCH/step.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  cat "$SCRATCH/step.log" >>"$LOG"
  [ "$rc" = 0 ] || tail -n 40 "$SCRATCH/step.log"  # the reason, where the caller sees it
  if [ "$rc" = 0 ]; then
    result=PASS
  elif { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && [ "$limit" -lt "$box" ]; then
    result=CUT; CUT=$name; note="ended by the budget after ${dt} s${note:+; $note}"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    result=TIMEOUT; FAILED+=("$name"); note="stopped at its ${box}-s time box${note:+; $note}"
  else
    result=FAIL; FAILED+=("$name"); note="exit status $rc${note:+; $note}"
  fi
  record "$name" "$result" "$dt" "$note" "$json"
  echo "== $name: $result in ${dt} s ${note:+($note)}" | tee -a "$LOG"
}

# ---------------------------------------------------------------- install
step_install() {
  local pipdry=() wheels=() writable site=$SCRATCH/site  # site: the wheels when the environment is not writable
  local pip=("$PY" -m pip install --no-index --disable-pip-version-check --no-deps)  # strictly offline
  [ "$DRY" = 1 ] && pipdry=(--dry-run)
  writable=$("$PY" -c "import os, sysconfig; print(int(os.access(sysconfig.get_paths()['purelib'], os.W_OK)))")
  if [ -d "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    # only distributions this interpreter lacks or has in an older version: the machine's own stay
    mapfile -t wheels < <("$PY" - "$WHEELS"/*.whl <<'EOF'
import sys
from importlib import metadata
from packaging.version import Version
for wheel in sys.argv[1:]:
    name, version = wheel.rsplit("/", 1)[-1].split("-")[:2]
    try:
        if Version(metadata.version(name)) >= Version(version):
            continue
    except metadata.PackageNotFoundError:
        pass
    print(wheel)
EOF
)
    echo "wheels in $WHEELS; to install (missing or older here): ${wheels[*]:-none}"
    if [ ${#wheels[@]} -gt 0 ]; then
      if [ "$writable" = 1 ]; then
        "${pip[@]}" "${pipdry[@]}" -q --no-compile "${wheels[@]}" || return 1
      else
        "${pip[@]}" "${pipdry[@]}" -q --no-compile --target "$site" "${wheels[@]}" || return 1
        echo "export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}" >> "$SCRATCH/env.sh"
      fi
    fi
  fi
  if [ "$DRY" = 1 ]; then
    "${pip[@]}" --dry-run --no-build-isolation -e . || return 1
  else
    # this GPU's architecture only (half the nvcc time of the default two), every core
    export TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export MAX_JOBS=$(nproc)
    if [ "$writable" = 1 ]; then
      "${pip[@]}" -q --no-build-isolation -e . || return 1
    else  # in place: hptransfer/_C*.so beside the sources, hptransfer.kernels as a link to kernels/
      "$PY" setup.py -q build_ext --inplace || return 1
      ln -sfn ../kernels hptransfer/kernels
      echo "export PYTHONPATH=$REPO\${PYTHONPATH:+:\$PYTHONPATH}" >> "$SCRATCH/env.sh"
    fi
  fi
  [ -f "$SCRATCH/env.sh" ] && source "$SCRATCH/env.sh"
  "$PY" - "$DRY" "$SCRATCH/install.json" "$writable" <<'EOF'
import json
import sys

import hptransfer.kernels  # noqa: F401
import torch
from hptransfer.ops import backend_status

status = backend_status()
print(json.dumps(status, indent=1))
with open(sys.argv[2], "w") as f:
    json.dump({"environment_writable": sys.argv[3] == "1", "backend_status": status}, f)
if sys.argv[1] == "0":
    assert torch.cuda.is_available(), "no CUDA device"
    assert status["extension_cuda"], f"hptransfer._C has no CUDA part: {status['extension']}"
    assert status["triton"] == "available", status["triton"]
EOF
}

# ---------------------------------------------------------------- pytest
step_pytest() {
  local args=(-m cuda tests -q -p no:cacheprovider)
  [ "$DALI" = 1 ] || args+=(--ignore tests/test_dali.py)
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest "${args[@]}" --collect-only
  else
    # four workers where pytest-xdist is installed (the GPU image has it): imports and CPU references overlap
    "$PY" -c "import xdist" 2>/dev/null && args+=(-n 4)
    "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 120)  # a hung test fails alone
    HPTRANSFER_STRICT=1 "$PY" -m pytest --require-cuda "${args[@]}" --junitxml "$SCRATCH/pytest.xml"
    local rc=$?
    "$PY" - "$SCRATCH/pytest.xml" "$SCRATCH/pytest.json" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
failed = [f"{c.get('classname')}.{c.get('name')}" for c in suite.iter("testcase")
          if c.find("failure") is not None or c.find("error") is not None]
json.dump({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"failed": failed},
          open(sys.argv[2], "w"))
EOF
    return $rc
  fi
}

# ---------------------------------------------------------------- profile (the trace must come back: 16 MiB)
step_profile() {
  local R=$1 trace
  env PYTHON="$PY" PROFILE_OUT="$OUTDIR" bash bench/profile.sh "$R" || return 1
  for trace in "$OUTDIR"/profile-*.trace.json.gz; do
    [ -f "$trace" ] || continue
    if [ "$(stat -c %s "$trace")" -gt $((16 * 1024 * 1024)) ]; then
      echo "profile: $trace is $(($(stat -c %s "$trace") / 1048576)) MiB, over the 16 MiB a result file may have: removed"
      rm -f "$trace"
      return 1
    fi
  done
}

{ echo "gpu_check $([ "$DRY" = 1 ] && echo "DRY RUN (toy sizes, CPU)" || echo "on $DEV") of commit $COMMIT," \
       "$(date -u +%FT%TZ), budget ${BUDGET} s"
  sed -n 3p <<<"$FACTS"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 | head -n 1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} 2>&1 | tee -a "$LOG"

export PY DRY WHEELS SCRATCH OUTDIR REPO
export -f step_install step_pytest step_profile  # `timeout` runs commands, not functions: they run in `bash -c`

run_step install 120 "" "$SCRATCH/install.json" bash -c step_install
[ -f "$SCRATCH/env.sh" ] && source "$SCRATCH/env.sh"  # PYTHONPATH of an in-place build, for every later step
DALI=0
"$PY" -c "import nvidia.dali" 2>/dev/null && DALI=1  # installed here, or from its wheel just now
export DALI
run_step pytest 120 "$([ "$DALI" = 1 ] || echo "nvidia.dali missing: tests/test_dali.py not collected")" \
    "$SCRATCH/pytest.json" bash -c step_pytest
if [ "$DRY" = 1 ]; then
  run_step sync_check 120 "CPU: bench.common.HostReads" "$SCRATCH/sync_check.json" "$PY" bench/sync_check.py \
      --resolution 64 128 --disc-at 128 --batch 1 "${TOY[@]}" --warmup 1 --out "$SCRATCH/sync_check.json"
  run_step train 240 "" "" "$PY" bench/bench_train.py --resolution 64 --batch 1 --steps 1 --warmup 1 "${TOY[@]}" \
      --mode fast naive --max-batch 64 --out "$OUTDIR/train-$DEV.json"
  run_step deepspeed 240 "" "$SCRATCH/deepspeed.json" "$PY" bench/ds_check.py --resolution 64 --batch 1 --fp32 "${TOY[@]}" \
      --out "$SCRATCH/deepspeed.json"
  run_step compile 240 "aot_eager backend (inductor: minutes per graph on a CPU)" "$SCRATCH/compile.json" \
      "$PY" bench/bench_train.py --resolution 64 --batch 1 --steps 1 --warmup 1 "${TOY[@]}" --mode fast fast_compiled \
      --compile blocks --compile-backend aot_eager --out "$SCRATCH/compile.json"
  run_step fp16 120 "CPU: fast runs fp32" "$SCRATCH/fp16.json" "$PY" bench/bench_train.py --resolution 64 --batch 1 \
      --steps 1 --warmup 1 "${TOY[@]}" --mode fast --amp fp16 --grad-check --out "$SCRATCH/fp16.json"
  run_step profile 120 "" "" env BATCH=1 WIDTH=0.03125 STEPS=1 VGG_LAYERS=relu1_2 bash -c "step_profile 64"
  run_step kernels 120 "" "" "$PY" bench/bench_kernels.py --resolutions 64 --batches 1 --out "$OUTDIR/kernels-$DEV.json"
  run_step local_loss 120 "" "" "$PY" bench/bench_local_loss.py --sizes 64 --batches 1 --repeat 1 --vgg-layers relu1_2 \
      --out "$OUTDIR/local_loss-$DEV.json"
  DALI_ARGS=(--sizes 64 --batch 2 --batches 2 --workers 0 --rounds 1 --quick)
else
  run_step sync_check 90 "" "$SCRATCH/sync_check.json" env HPTRANSFER_STRICT=1 "$PY" bench/sync_check.py \
      --resolution 512 1024 --out "$SCRATCH/sync_check.json"
  run_step train 240 "JSON rewritten after each part" "" env HPTRANSFER_STRICT=1 "$PY" bench/bench_train.py \
      --resolution 1024 256 512 --batch 4 --mode fast naive --max-batch 1024 --max-batch-tolerance 0.125 \
      --steps 3 --warmup 1 --out "$OUTDIR/train-$DEV.json"
  run_step deepspeed 90 "" "$SCRATCH/deepspeed.json" env HPTRANSFER_STRICT=1 "$PY" bench/ds_check.py \
      --out "$SCRATCH/deepspeed.json"
  run_step compile 150 "" "$SCRATCH/compile.json" env HPTRANSFER_STRICT=1 "$PY" bench/bench_train.py --resolution 256 \
      --batch 8 --mode fast fast_compiled --compile blocks --steps 5 --warmup 3 --out "$SCRATCH/compile.json"
  run_step fp16 60 "" "$SCRATCH/fp16.json" env HPTRANSFER_STRICT=1 "$PY" bench/bench_train.py --resolution 1024 \
      --batch 1 --mode fast --amp fp16 --grad-check --steps 2 --warmup 1 --out "$SCRATCH/fp16.json"
  run_step profile 60 "" "" env BATCH=2 STEPS=1 bash -c "step_profile 1024"
  run_step kernels 60 "" "" "$PY" bench/bench_kernels.py --resolutions 1024 --batches 4 --out "$OUTDIR/kernels-$DEV.json"
  run_step local_loss 60 "" "" "$PY" bench/bench_local_loss.py --sizes 512 --batches 4 --repeat 3 \
      --out "$OUTDIR/local_loss-$DEV.json"
  DALI_ARGS=(--sizes 512 --batch 8 --batches 4 --workers 2 --rounds 1 --quick)
fi
if [ "$DALI" = 1 ]; then
  run_step dali 90 "" "$SCRATCH/dali.json" "$PY" bench/bench_data.py "${DALI_ARGS[@]}" --out "$SCRATCH/dali.json"
else
  record dali SKIP 0 "nvidia.dali not installed (no wheel: see bench/fetch_wheels.sh)"
fi

FILES="summary.txt $(cd "$OUTDIR" && ls | grep -vx summary.txt | tr '\n' ' ')"
{
  head -n 1 "$LOG"
  sed -n 2p "$LOG"
  printf '%-11s %-8s %7s  %s\n' step result time note
  printf '%s\n' "${RESULTS[@]}"
  echo "total $(($(date +%s) - START)) s of a ${BUDGET}-s budget; files in $OUTDIR: $FILES"
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}${CUT:+; the budget ran out at $CUT}: see log.txt"
  elif [ -n "$CUT" ]; then
    echo "PARTIAL: the budget of ${BUDGET} s ran out at $CUT; not run: ${NOT_RUN[*]:-none}; files written: $FILES"
  else
    echo "ALL PASSED"
  fi
} > "$SCRATCH/summary.txt" && mv "$SCRATCH/summary.txt" "$SUMMARY"
echo
cat "$SUMMARY"
if [ ${#FAILED[@]} -gt 0 ]; then exit 1; elif [ -n "$CUT" ]; then exit 3; fi
exit 0
