"""Data-loading throughput: torch DataLoader (workers 0..N) vs the DALI pipeline, beside the
trainer's own images/s at the same resolution, so the table says whether loading is the bottleneck.

    python bench/bench_data.py                 # 256, 512, 1024 px; synthesizes data if --data is not given
    python bench/bench_data.py --quick         # CPU: small sizes, few batches
    python bench/bench_data.py --data data/deepfashion --sizes 256 512

Images/s counts pairs x 2 images (reference + target) per second, after one warm-up batch.
The trainer's images/s is read from bench/results/train-<device>.json when it has the size,
else timed here: generator forward + backward + global VGG loss at the given --width
(random-init VGG: the cost does not depend on the weights).
JSON goes to bench/results/data-<device>.json (atomically).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"

from bench.common import device_name, environment, write_json  # noqa: E402

log = logging.getLogger("bench_data")


def synthesize(root: Path, size: int, pairs: int, seed: int) -> None:
    """A small dataset at ``size`` px with at least ``pairs`` train pairs, via ``hptransfer data synth``."""
    poses = 4  # 12 ordered pairs per identity
    identities = max(2, -(-pairs // (poses * (poses - 1))) + 1)  # +1: one identity goes to the test split
    cmd = [sys.executable, "-m", "hptransfer", "data", "synth", "--out", str(root), "--size", str(size),
           "--identities", str(identities), "--poses", str(poses), "--seed", str(seed), "--test-fraction", "0.1"]
    log.info("synthesizing: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def time_loader(make, batches: int) -> dict:
    """Images/s over up to ``batches`` batches after one warm-up batch; ``first_batch_s`` is the
    start-up cost excluded from the rate (DALI pipeline build / worker start + first batch)."""
    t0 = time.perf_counter()
    it = iter(make())
    first = next(it)
    cuda = first["reference"].is_cuda
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(it):
        n += 2 * batch["reference"].shape[0]
        if i + 1 >= batches:
            break
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"images_per_s": (n / dt if dt > 0 and n else float("nan")), "images": n, "first_batch_s": first_s}


def trainer_rate(size: int, width: float, batch: int, device: torch.device, steps: int) -> dict:
    """Generator fwd+bwd + global VGG loss images/s (the trainer's own hot loop, without the optimiser)."""
    hit = _trainer_rate_from_json(size)
    if hit is not None:
        return hit
    from hptransfer.config import ModelConfig
    from hptransfer.losses import global_perceptual_loss
    from hptransfer.models import Generator, VGG16Features

    gen = Generator(ModelConfig(width=width), resolution=64)
    while gen.resolution < size:
        gen.grow()
    gen = gen.to(device)
    vgg = VGG16Features(weights="random").to(device).eval()
    ref = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    tgt = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    kp = torch.rand(batch, 18, 2, device=device) * (size - 1)

    def step():
        loss = global_perceptual_loss(gen(ref, kp), tgt, vgg, "l1")
        loss.backward()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    # One training sample = one pair = 2 loaded images: compare loader images/s with 2x this.
    return {"pairs_per_s": batch * steps / dt, "images_per_s": 2 * batch * steps / dt,
            "source": f"timed here: width {width}, batch {batch}, {steps} steps"}


def _trainer_rate_from_json(size: int):
    path = RESULTS / f"train-{device_name()}.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        for row in data.get("results", data.get("rows", [])):
            if int(row.get("resolution", -1)) == size and "images_per_s" in row:
                ips = float(row["images_per_s"])
                return {"pairs_per_s": ips, "images_per_s": 2 * ips, "source": str(path.relative_to(REPO))}
    except (ValueError, TypeError, AttributeError):
        return None
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="dataset root (default: synthesize one per size into a temp dir)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--batches", type=int, default=None, help="timed batches per loader")
    ap.add_argument("--max-workers", type=int, default=None)
    ap.add_argument("--width", type=float, default=None, help="model width for the trainer's images/s")
    ap.add_argument("--quick", action="store_true", help="CPU-sized run: small sizes and few batches")
    ap.add_argument("--no-dali", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from hptransfer.data import PairDataset, make_loader
    from hptransfer.data.dali import dali_available, make_dali_loader

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    quick = args.quick
    sizes = args.sizes or ([64, 256] if quick else [256, 512, 1024])
    batch = args.batch or (4 if quick else 16)
    batches = args.batches or (8 if quick else 20)
    max_workers = args.max_workers if args.max_workers is not None else (2 if quick else min(8, os.cpu_count() or 1))
    width = args.width or (1 / 32 if quick else 1 / 4)
    dali_device = "gpu" if cuda else "cpu"

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        for size in sizes:
            root = Path(args.data) if args.data else Path(tmp) / f"synth{size}"
            if not args.data:
                synthesize(root, size, batch * (batches + 1), seed=0)
            ds = PairDataset(root, args.split, size, flip=True)
            need = batch * (batches + 1)
            if len(ds) < need:
                log.warning("%d px: only %d pairs, fewer than %d needed; timing fewer batches", size, len(ds), need)
            row = {"resolution": size, "batch": batch, "pairs": len(ds), "loaders": {}}
            for w in range(0, max_workers + 1):
                res = time_loader(lambda: make_loader(ds, batch, workers=w, seed=0), batches)
                row["loaders"][f"torch-w{w}"] = res
                log.info("%5d px  torch workers=%d  %8.1f img/s", size, w, res["images_per_s"])
            if not args.no_dali and dali_available():
                threads = max(1, max_workers)
                res = time_loader(lambda: make_dali_loader(root, args.split, size, batch, seed=0, flip=True,
                                                           device=dali_device, num_threads=threads), batches)
                row["loaders"][f"dali-{dali_device}"] = dict(res, threads=threads)
                log.info("%5d px  dali %s threads=%d  %8.1f img/s", size, dali_device, threads, res["images_per_s"])
            tr = trainer_rate(size, width, max(1, min(batch, 2 if quick else batch)), device, 1 if quick else 5)
            row["trainer"] = tr
            best = max(v["images_per_s"] for v in row["loaders"].values())
            row["loading_is_bottleneck"] = bool(best < tr["images_per_s"])
            rows.append(row)

    payload = {"benchmark": "data", **environment(device), "quick": quick,
               "data": args.data or "synthetic (hptransfer data synth)",
               "note": "images/s = 2 images per pair; trainer images/s = 2 x pairs/s of generator fwd+bwd+VGG loss",
               "results": rows}  # the DALI version: backend_status.versions.dali
    out = Path(args.out) if args.out else RESULTS / f"data-{device_name()}.json"
    write_json(out, payload)

    names = sorted({k for r in rows for k in r["loaders"]})
    print(f"\nimages/s on {device_name()} (batch {batch}); trainer = generator fwd+bwd+VGG at width {width}")
    print(f"{'px':>6} " + " ".join(f"{n:>12}" for n in names) + f" {'trainer':>10}  loading bottleneck?")
    for r in rows:
        cells = " ".join(f"{r['loaders'][n]['images_per_s']:12.1f}" if n in r["loaders"] else f"{'-':>12}"
                         for n in names)
        print(f"{r['resolution']:>6} {cells} {r['trainer']['images_per_s']:10.1f}  "
              f"{'yes' if r['loading_is_bottleneck'] else 'no'}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
