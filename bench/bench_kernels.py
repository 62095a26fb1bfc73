"""Triton kernels against their torch references: pose heatmaps and the multi-crop gather.

    python bench/bench_kernels.py [--quick] [--dtype bf16|fp32]

Per resolution (64..1024 px, descriptors 18/18/31/31/44, crop R/8) and batch (1..16) it prints the
median time of the reference and the kernel, their ratio, and the kernel's achieved GB/s against the
bytes that must move, beside the device-to-device copy bandwidth measured in the same run:
- heatmaps: maps at every decoder scale 32..R (the pose-at-every-scale case; the bottleneck alone is
  the first of them), bytes = every output element written once (+ keypoints);
- gather forward: crops written + the same number of image elements read;
- gather backward: crop gradient read + image-gradient read-modify-write (fp32 atomics) + its cast.
NVTX ranges name every region. On a CPU only the references are timed (the Triton interpreter is not a
performance path) and the table says so. JSON: bench/results/kernels-<device>.json, rewritten after every
size ("complete" once all are in).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median_ms, nvtx, result_path, table, write_json  # noqa: E402
from hptransfer.ops import gather_crops, gather_crops_reference, heatmaps_multi  # noqa: E402
from hptransfer.pose import crop_size, default_sigma, descriptor_count, local_descriptors  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def copy_bandwidth(device) -> float | None:
    """Device-to-device copy GB/s (read + write) of a 256 MiB buffer: the yardstick."""
    if torch.device(device).type != "cuda":
        return None
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() / ms / 1e6


def scales(R: int) -> list[tuple[int, int]]:
    out, s = [], 32
    while s <= R:
        out.append((s, s))
        s *= 2
    return out


def bench_heatmaps(R, B, dtype, device, gpu):
    kp = (torch.rand(B, 18, 2) * (R - 1)).to(device)
    sizes = scales(R)
    sigmas = [default_sigma(h) for h, _ in sizes]
    out_bytes = sum(B * 18 * h * w for h, w in sizes) * torch.finfo(dtype).bits // 8 + kp.numel() * 4
    with nvtx(f"heatmaps_reference_{R}_b{B}"):
        ref = median_ms(lambda: heatmaps_multi(kp, (R, R), sizes, sigmas, impl="reference", dtype=dtype), device)
    fast = None
    if gpu:
        with nvtx(f"heatmaps_triton_{R}_b{B}"):
            fast = median_ms(lambda: heatmaps_multi(kp, (R, R), sizes, sigmas, impl="fast", dtype=dtype), device)
    return {"op": "heatmaps", "resolution": R, "batch": B, "maps": len(sizes), "reference_ms": ref, "kernel_ms": fast,
            "speedup": ref / fast if fast else None, "gb": out_bytes / 1e9,
            "kernel_gbps": out_bytes / fast / 1e6 if fast else None}


def bench_gather(R, B, dtype, device, gpu):
    N, s = descriptor_count(R), crop_size(R)
    images = (torch.rand(B, 3, R, R, device=device) * 2 - 1).to(dtype).requires_grad_()
    kp = torch.rand(B, 18, 2) * (R - 1)
    centers, _ = local_descriptors(kp, R)
    centers = centers.to(device)
    el = torch.finfo(dtype).bits // 8
    crop_elems = B * N * 3 * s * s
    fwd_bytes = 2 * crop_elems * el
    bwd_bytes = crop_elems * el + 2 * crop_elems * 4 + images.numel() * (4 + el)
    grad = torch.randn(B * N, 3, s, s, device=device, dtype=dtype)
    rows = []
    for name, impl in (("reference", "reference"), ("kernel", "fast")):
        if impl == "fast" and not gpu:
            continue
        fn = gather_crops_reference if impl == "reference" else (lambda *a, **k: gather_crops(*a, impl="fast", **k))
        with nvtx(f"gather_{name}_fwd_{R}_b{B}"):
            f = median_ms(lambda: fn(images, centers, s, normalize=True), device)
        out = fn(images, centers, s, normalize=True)
        with nvtx(f"gather_{name}_bwd_{R}_b{B}"):
            b = median_ms(lambda: torch.autograd.grad(out, images, grad, retain_graph=True), device)
        rows.append((f, b))
    ref_f, ref_b = rows[0]
    fast_f, fast_b = rows[1] if len(rows) > 1 else (None, None)
    return [{"op": "gather_fwd", "resolution": R, "batch": B, "descriptors": N, "crop": s, "reference_ms": ref_f,
             "kernel_ms": fast_f, "speedup": ref_f / fast_f if fast_f else None, "gb": fwd_bytes / 1e9,
             "kernel_gbps": fwd_bytes / fast_f / 1e6 if fast_f else None},
            {"op": "gather_bwd", "resolution": R, "batch": B, "descriptors": N, "crop": s, "reference_ms": ref_b,
             "kernel_ms": fast_b, "speedup": ref_b / fast_b if fast_b else None, "gb": bwd_bytes / 1e9,
             "kernel_gbps": bwd_bytes / fast_b / 1e6 if fast_b else None}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small subset (64/256 px, batch 1-2): CPU-sized")
    ap.add_argument("--resolutions", type=int, nargs="+", default=None, help="override the resolutions")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="override the batch sizes")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-<device>.json)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    resolutions = args.resolutions or ((64, 256) if args.quick else (64, 128, 256, 512, 1024))
    batches = args.batches or ((1, 2) if args.quick else (1, 4, 16))
    bw = copy_bandwidth(device)
    path = Path(args.out) if args.out else result_path("kernels")
    rows = []
    for i, R in enumerate(resolutions):
        for j, B in enumerate(batches):
            rows.append(bench_heatmaps(R, B, dtype, device, gpu))
            rows.extend(bench_gather(R, B, dtype, device, gpu))
            for r in rows:
                r["of_copy_bw"] = r["kernel_gbps"] / bw if (bw and r["kernel_gbps"]) else None
            complete = i == len(resolutions) - 1 and j == len(batches) - 1
            # rewritten after every size: a run stopped by a time limit keeps what it measured
            write_json(path, {**environment(device), "dtype": str(dtype), "copy_gbps": bw, "rows": rows,
                              "complete": complete})
    env = environment(device)
    print(f"device {env['device']}, dtype {dtype}, torch {env['torch']}, triton {env['triton']}; "
          f"copy bandwidth {bw:.0f} GB/s" if bw else f"device {env['device']}, dtype {dtype}: references only "
          "(the Triton kernels need a GPU; on the CPU they run in the interpreter, which is not a performance path)")
    print(table(rows, ["op", "resolution", "batch", "reference_ms", "kernel_ms", "speedup", "kernel_gbps", "of_copy_bw"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
