"""One training step under ``torch.cuda.set_sync_debug_mode("error")``: a hidden host-device sync in the
step (``.item()``, ``.tolist()``, a blocking copy, ``nonzero``...) raises, and the check fails with its
traceback.

    python bench/sync_check.py                                # GPU: 1024 px, batch 2, model.width 1.0
    python bench/sync_check.py --resolution 64 --batch 1 --width 0.03125 --vgg-layers relu1_2  # CPU: code path

The step is the trainer's (``hptransfer.step.train_step`` through bench_train's fast Runner: bf16,
channels_last, Triton kernels, data already on the device). Warm-up steps run first with the mode off
(first-use caches, cudnn autotuning and Triton compiles may sync once). The step's deliberate syncs,
the non-finite check that decides whether the optimisers step (``hptransfer.step.read_nonfinite``, one
read for both networks) and the valid-crop count of the local loss's compaction, run with the mode off
and are counted; any other sync fails. The CPU has no sync debug mode: there the script
only runs the same step at toy size (the dry run of bench/gpu_check.sh). Exit status 0 = no hidden
sync (or the CPU run completed). JSON: bench/results/sync_check-<device>.json (atomically) with
bench.common.environment().
"""
from __future__ import annotations

import argparse
import functools
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import bench_train  # noqa: E402
from bench.common import environment, result_path, write_json  # noqa: E402
from hptransfer import step as step_module  # noqa: E402
from hptransfer.ops import _local_loss_fast  # noqa: E402

# Deliberate, documented syncs of a training step: (module, function name) -> why it may sync.
ALLOWED = {(step_module, "read_nonfinite"): "the non-finite check: the host decides whether the optimisers step",
           (_local_loss_fast, "valid_crop_count"): "the valid-crop count: crops of missing descriptors skip VGG"}


def allow_syncs(counts: dict) -> None:
    """Wrap each ALLOWED function so that it runs with the sync debug mode off, counting its calls."""
    for (module, name) in ALLOWED:
        fn = getattr(module, name, None)
        if fn is None:  # gone from the code: nothing to allow
            continue
        key = f"{module.__name__}.{name}"
        counts[key] = 0

        @functools.wraps(fn)
        def wrapped(*args, _fn=fn, _key=key, **kwargs):
            counts[_key] += 1
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return _fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)

        setattr(module, name, wrapped)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=1024 if cuda else 64)
    p.add_argument("--batch", type=int, default=2 if cuda else 1)
    p.add_argument("--width", type=float, default=1.0 if cuda else 1 / 32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vgg-layers", nargs="+", default=None, help="VGG taps (default: all five)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/sync_check-<device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    R = args.resolution
    cfg = bench_train.make_config(R, args.batch, args.width, False, False, False, args.vgg_layers)
    run = bench_train.Runner("fast", cfg, R, args.batch, device)
    for _ in range(args.warmup):
        run.step()
    bench_train._sync(device)
    allowed: dict = {}
    error = None
    if cuda:
        allow_syncs(allowed)
        torch.cuda.set_sync_debug_mode("error")
    try:
        run.step()
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        error = traceback.format_exc()
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    bench_train._sync(device)
    result = "fail" if error else ("pass" if cuda else "ran (CPU: no sync debug mode; code path only)")
    out = Path(args.out) if args.out else result_path("sync_check")
    write_json(out, {"check": "sync_check", **environment(device), "resolution": R, "batch": args.batch,
                     "width": args.width, "warmup_steps": args.warmup, "sync_debug_mode": "error" if cuda else None,
                     "allowed_syncs": {f"{m.__name__}.{n}": why for (m, n), why in ALLOWED.items()},
                     "allowed_sync_calls": allowed, "result": result, "error": error})
    if error:
        print(f"hidden host sync in a {R}-px training step:\n{error}")
    print(f"sync check at {R} px, batch {args.batch}, width {args.width:g} on {device}: {result}; "
          f"allowed syncs taken: {allowed or 'none'}; JSON: {out}")
    return 1 if error else 0


if __name__ == "__main__":
    raise SystemExit(main())
