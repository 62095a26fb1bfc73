"""Training steps with every hidden host read an error: on a GPU under ``torch.cuda.set_sync_debug_mode("error")``
(``.item()``, ``.tolist()``, a blocking copy, ``nonzero``... raise), on the CPU under
:class:`bench.common.HostReads` (the aten ops that read a device value on the host; CUDA's debug mode does
not exist there). Either way the check fails with the offending call's traceback or op names.

    python bench/sync_check.py                              # GPU: 512 px (local perceptual loss) and 1024 px
                                                            # (local discriminators), batch 2, model.width 1.0
    python bench/sync_check.py --resolution 64 128 --disc-at 128 --batch 1 --width 0.03125 --vgg-layers relu1_2

The step is the trainer's (``hptransfer.step.train_step`` through bench_train's fast Runner: bf16,
channels_last, Triton kernels, data already on the device). Warm-up steps run first unchecked (first-use
caches, cudnn autotuning and Triton compiles may sync once). The step's deliberate syncs, the non-finite
check that decides whether the optimisers step (``hptransfer.step.read_nonfinite``, one read for both
networks) and the valid-crop count of the local loss's compaction, run unchecked and are counted; any
other fails. On the CPU the optimisers' step is not checked either (torch's CPU Adam reads its step count on
the host; the trainer's fused CUDA Adam does not, and the GPU run checks it). Resolutions run in the order given, the JSON (bench/results/sync_check-<device>.json, atomic,
with bench.common.environment()) rewritten after each. Exit status 0 = no hidden host read.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import bench_train  # noqa: E402
from bench.common import HostReads, environment, result_path, write_json  # noqa: E402
from hptransfer import losses  # noqa: E402
from hptransfer import step as step_module  # noqa: E402
from hptransfer.ops import _local_loss_fast  # noqa: E402

# Deliberate, documented syncs of a training step: (module, function name) -> why it may sync.
ALLOWED = {(step_module, "read_nonfinite"): "the non-finite check: the host decides whether the optimisers step",
           (_local_loss_fast, "valid_crop_count"): "the valid-crop count: crops of missing descriptors skip VGG"}


@contextlib.contextmanager
def allow_syncs(counts: dict, unchecked):
    """While inside: each ALLOWED function runs inside ``unchecked()`` (a context), its calls counted."""
    saved = {}
    for (module, name) in ALLOWED:
        fn = getattr(module, name, None)
        if fn is None:  # gone from the code: nothing to allow
            continue
        key = f"{module.__name__}.{name}"
        counts[key] = 0
        saved[(module, name)] = fn

        @functools.wraps(fn)
        def wrapped(*args, _fn=fn, _key=key, **kwargs):
            counts[_key] += 1
            with unchecked():
                return _fn(*args, **kwargs)

        setattr(module, name, wrapped)
    try:
        yield
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


def _unchecked(fn, unchecked):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with unchecked():
            return fn(*args, **kwargs)
    return wrapped


@contextlib.contextmanager
def _cuda_sync_mode(mode):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def check_resolution(args, R: int, device: torch.device) -> dict:
    """Warm-up, then one checked step at ``R``: {"resolution", "terms" (which losses ran), "result", "error"}."""
    cfg = bench_train.make_config(R, args.batch, args.width, False, False, False, args.vgg_layers)
    if args.disc_at:
        cfg.loss.disc_at_resolution = args.disc_at
    run = bench_train.Runner("fast", cfg, R, args.batch, device)
    for _ in range(args.warmup):
        run.step()
    bench_train._sync(device)
    allowed: dict = {}
    error = None
    if device.type == "cuda":
        try:
            with allow_syncs(allowed, lambda: _cuda_sync_mode(0)), _cuda_sync_mode("error"):
                run.step()
        except RuntimeError as e:
            if "synchroniz" not in str(e):
                raise
            error = traceback.format_exc()
    else:
        reads = HostReads()
        # torch's CPU Adam reads its step count on the host; the trainer's CUDA Adam is fused and keeps it on
        # the device (the GPU's sync debug mode checks that): the optimisers' step is not checked here
        for engine in (run.g_engine, run.d_engine):
            if engine is not None:
                engine.optimizer.step = _unchecked(engine.optimizer.step, reads.pause)
        with allow_syncs(allowed, reads.pause), reads:
            run.step()
        if reads.counts:
            error = f"host reads outside the allowed functions: {reads.counts}; first calls:\n" + "\n".join(
                f"{name}:\n{stack}" for name, stack in reads.where.items())
    bench_train._sync(device)
    return {"resolution": R, "terms": losses.active_terms(cfg.loss, R), "allowed_sync_calls": allowed,
            "result": "fail" if error else "pass", "error": error}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, nargs="+", default=[512, 1024] if cuda else [64])
    p.add_argument("--batch", type=int, default=2 if cuda else 1)
    p.add_argument("--width", type=float, default=1.0 if cuda else 1 / 32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--disc-at", type=int, default=None,
                   help="loss.disc_at_resolution (default the config's: local discriminators from 1024 px)")
    p.add_argument("--vgg-layers", nargs="+", default=None, help="VGG taps (default: all five)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/sync_check-<device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    out = Path(args.out) if args.out else result_path("sync_check")
    results: list = []
    for R in args.resolution:
        results.append(check_resolution(args, R, device))
        r = results[-1]
        write_json(out, {"check": "sync_check", **environment(device), "batch": args.batch, "width": args.width,
                         "warmup_steps": args.warmup, "mode": "cuda sync debug mode 'error'" if cuda else
                         "bench.common.HostReads (aten ops that read a device value)",
                         "allowed_syncs": {f"{m.__name__}.{n}": why for (m, n), why in ALLOWED.items()},
                         "results": results, "complete": len(results) == len(args.resolution)})
        active = ", ".join(k for k, v in r["terms"].items() if v) or "global only"
        print(f"sync check at {R} px ({active}), batch {args.batch}, width {args.width:g} on {device}: {r['result']}; "
              f"allowed syncs taken: {r['allowed_sync_calls'] or 'none'}")
        if r["error"]:
            print(f"hidden host read in a {R}-px training step:\n{r['error']}")
    print(f"JSON: {out}")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
