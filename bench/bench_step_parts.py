"""What each switchable part of the fast training step is worth: the fast step (bench_train's Runner)
timed with all parts on, and with one part turned off at a time, in the same run (steps alternate).

    python bench/bench_step_parts.py                  # CPU default: 128 px, width 0.125, batch 2
    python bench/bench_step_parts.py --resolution 1024 --width 1.0 --batch 2 --steps 10

Parts: ``compaction`` (crops of invalid descriptors skip VGG; off = every crop through VGG, masked);
``fused_global`` (the global loss's distance by the fused op; off = torch's criterion on fp32 copies);
``one_read`` (both finite flags in one host read; off = one read per loss, as before). JSON:
bench/results/step_parts-<device>.json with bench.common.environment().
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import bench_train  # noqa: E402
from bench.common import environment, result_path, sync, table, write_json  # noqa: E402


@contextlib.contextmanager
def part_off(name: str, device: torch.device):
    """Turn one part of the fast step off for the duration (monkeypatching the module that owns it)."""
    from hptransfer import ops, step
    from hptransfer.ops import _local_loss_fast

    if name == "compaction":
        saved = dict(_local_loss_fast.COMPACTION_BUCKET)
        _local_loss_fast.COMPACTION_BUCKET[device.type] = None
        try:
            yield
        finally:
            _local_loss_fast.COMPACTION_BUCKET.update(saved)
    elif name == "fused_global":
        fused = ops.perceptual_distance
        ops.perceptual_distance = lambda a, b, criterion, mask=None, impl="auto": fused(a, b, criterion, mask, "reference")
        try:
            yield
        finally:
            ops.perceptual_distance = fused
    elif name == "one_read":
        one = step.read_nonfinite
        step.read_nonfinite = lambda backend, *values, agree=None: [f for v in values for f in one(backend, v)] + (
            one(backend, agree=agree) if agree is not None else [])
        try:
            yield
        finally:
            step.read_nonfinite = one
    else:
        raise ValueError(f"unknown part {name!r}")


PARTS = ("compaction", "fused_global", "one_read")


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--width", type=float, default=1.0 if cuda else 0.125)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--disc", action="store_true", help="local discriminators on (their D step and adversarial term)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    R = args.resolution
    cfg = bench_train.make_config(R, args.batch, args.width, args.disc, "off", False)
    run = bench_train.Runner("fast", cfg, R, args.batch, device)
    variants = ["all on", *(f"{part} off" for part in PARTS)]
    times: dict = {v: [] for v in variants}

    def timed(v: str) -> float:
        ctx = contextlib.nullcontext() if v == "all on" else part_off(v.split()[0], device)
        with ctx:
            sync(device)
            t0 = time.perf_counter()
            run.step()
            sync(device)
            return (time.perf_counter() - t0) * 1e3

    for v in variants:  # warm-up, one each
        timed(v)
    for _ in range(args.steps):  # round robin: load from other processes hits every variant alike
        for v in variants:
            times[v].append(timed(v))
    base = statistics.median(times["all on"])
    rows = [{"variant": v, "ms": statistics.median(times[v]),
             "vs all on": statistics.median(times[v]) / base} for v in variants]
    print(f"fast step, {R} px, batch {args.batch}, width {args.width}, {device.type}; median of {args.steps}")
    print(table([{"variant": r["variant"], "ms": f"{r['ms']:.0f}", "vs all on": f"{r['vs all on']:.3f}"} for r in rows],
                ["variant", "ms", "vs all on"]))
    out = Path(args.out) if args.out else result_path("step_parts")
    write_json(out, {"environment": environment(device), "args": vars(args), "rows": rows, "times_ms": times})
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
