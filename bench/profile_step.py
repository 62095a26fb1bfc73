"""Driver for bench/profile.sh: build the fast step at a resolution, warm up, profile a few steps.

PROFILE_TOOL=nsys: the steps sit between torch.cuda.profiler.start()/stop() (nsys --capture-range=cudaProfilerApi).
PROFILE_TOOL=torch: torch.profiler; writes profile-<device>-<R>.trace.json.gz (a gzipped Chrome trace,
with the NVTX / record_function phase names) and profile-<device>-<R>.txt (environment and the top ops)
into PROFILE_OUT (default bench/results).
Sizes: env BATCH, WIDTH (defaults as bench_train.py: 8 / 1.0 on GPU, 2 / 0.125 on the CPU), STEPS (3),
VGG_LAYERS (comma-separated VGG taps; default all five).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import bench_train  # noqa: E402
from bench.common import environment  # noqa: E402
from hptransfer import profiling  # noqa: E402


def main() -> int:
    R = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = int(os.environ.get("BATCH", 8 if cuda else 2))
    width = float(os.environ.get("WIDTH", 1.0 if cuda else 0.125))
    steps = int(os.environ.get("STEPS", 3))
    vgg_layers = [x for x in os.environ.get("VGG_LAYERS", "").split(",") if x] or None
    run = bench_train.Runner("fast", bench_train.make_config(R, batch, width, False, False, False, vgg_layers), R,
                             batch, device)
    for _ in range(2):
        run.step()
    bench_train._sync(device)
    out_dir = Path(os.environ.get("PROFILE_OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"profile-{bench_train.device_name()}-{R}"
    if os.environ.get("PROFILE_TOOL") == "nsys":
        torch.cuda.profiler.start()
        for _ in range(steps):
            run.step()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return 0
    profiling.enable(cuda)  # NVTX ranges show in the trace too on GPU; record_function names the phases
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts, record_shapes=False) as prof:
        for i in range(steps):
            with torch.profiler.record_function(f"step{i}"):
                run.step()
        bench_train._sync(device)
    prof.export_chrome_trace(str(base) + ".trace.json.gz")  # gzipped: a 1024-px trace is tens of MB
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    env = environment(device)
    header = (f"torch.profiler: {steps} fast training steps at {R} px, batch {batch}, model.width {width:g}, "
              f"{env['device']}, torch {env['torch']}; sorted by {key}\n"
              f"environment: {json.dumps(env)}\n")
    tmp = Path(str(base) + ".txt.tmp")
    tmp.write_text(header + table + "\n")
    os.replace(tmp, str(base) + ".txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
