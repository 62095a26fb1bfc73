"""Local perceptual loss, forward + backward: the reference loop (one VGG call per descriptor) vs the
fast path (batched crops, VGG per half, fused criterion of hptransfer._C), same inputs, same run.

    python bench/bench_local_loss.py            # 256/512/1024 px (N = 31/31/44), batch 1, 2, 4, 8
    python bench/bench_local_loss.py --quick    # CPU-sized: 256 px, batch 1 and 2
    python bench/bench_local_loss.py --sizes 256 --batches 1 2 4 --repeat 5

Times are medians of --repeat timed steps after one warm-up; peak memory is CUDA's max allocated
(on the CPU: the peak RSS growth of the process is not per-step, so it is left out). VGG16Features with
random weights: the cost does not depend on the weights. NVTX ranges name each step on CUDA.
JSON goes to bench/results/local_loss-<device>.json (atomically, after every row; "complete" once all are in).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"

from bench.common import device_name, environment, nvtx, write_json  # noqa: E402
from bench.common import sync as _sync  # noqa: E402

log = logging.getLogger("bench_local_loss")
COUNTS = {256: 31, 512: 31, 1024: 44}


def time_step(impl, fake, real, kp, vgg, repeat, device):
    """Median seconds of forward + backward, and peak CUDA memory (MiB) or None."""
    from hptransfer import ops, pose

    centers, valid = pose.local_descriptors(kp.to(device), real.shape[-1])  # once per step, as the trainer does

    def step():
        x = fake.detach().requires_grad_()
        # the precision is the caller's (as in training): bf16 autocast on CUDA, fp32 on the CPU
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = ops.local_perceptual_loss(x, real, centers, valid, vgg, "l1", impl=impl)
        loss.backward()
        return loss

    step()  # warm-up: cudnn autotune, Triton compile, allocator
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeat):
        with nvtx(f"local_loss/{impl}/{i}"):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized subset: 256 px, batch 1 and 2")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--vgg-layers", nargs="+", default=None, help="VGG taps (default: all five; fewer = a toy run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from hptransfer.models import VGG16Features

    sizes = args.sizes or ([256] if args.quick else [256, 512, 1024])
    batches = args.batches or ([1, 2] if args.quick else [1, 2, 4, 8])
    repeat = args.repeat or (3 if args.quick else 10)
    device = torch.device(args.device)
    vgg = VGG16Features("random", **({"layers": args.vgg_layers} if args.vgg_layers else {})).to(device)
    out = args.out or RESULTS / f"local_loss-{device_name(device)}.json"
    rows = []

    def save(complete: bool) -> None:  # after every row: a run stopped by a time limit keeps what it measured
        write_json(out, {"bench": "local_loss", **environment(device), "criterion": "l1",
                         "vgg": f"VGG16Features(weights='random', layers={list(vgg.layers)})", "local_min_crop": 32,
                         "repeat": repeat, "quick": args.quick, "rows": rows, "complete": complete})

    for R in sizes:
        N = COUNTS.get(R) or (44 if R >= 1024 else 31 if R >= 256 else 18)
        for B in batches:
            g = torch.Generator().manual_seed(R + B)
            fake = (torch.rand(B, 3, R, R, generator=g) * 2 - 1).to(device)
            real = (torch.rand(B, 3, R, R, generator=g) * 2 - 1).to(device)
            kp = (torch.rand(B, 18, 2, generator=g) * (R - 1)).to(device)
            row = {"resolution": R, "descriptors": N, "batch": B}
            for impl in ("reference", "fast"):
                try:
                    t, peak = time_step(impl, fake, real, kp, vgg, repeat, device)
                except torch.OutOfMemoryError:
                    t, peak = None, None
                    torch.cuda.empty_cache()
                row[f"{impl}_ms"] = None if t is None else round(t * 1e3, 2)
                row[f"{impl}_peak_mib"] = None if peak is None else round(peak, 1)
            ref, fast = row["reference_ms"], row["fast_ms"]
            row["speedup"] = round(ref / fast, 2) if ref and fast else None
            rows.append(row)
            save(complete=len(rows) == len(sizes) * len(batches))
            log.info("%5d px  N=%2d  batch %d  reference %9s ms  fast %9s ms  x%s  peak MiB %s / %s", R, N, B, ref, fast,
                     row["speedup"], row["reference_peak_mib"], row["fast_peak_mib"])

    print("\n| px | N | batch | reference ms | fast ms | speedup | ref peak MiB | fast peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['resolution']} | {r['descriptors']} | {r['batch']} | {r['reference_ms']} | {r['fast_ms']} | "
              f"{r['speedup']} | {r['reference_peak_mib']} | {r['fast_peak_mib']} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
