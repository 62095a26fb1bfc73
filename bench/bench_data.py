"""Data-loading throughput, side by side in one run: a folder of 1024-px images vs its tar shards,
the torch DataLoader vs the DALI pipeline, at each stage resolution; the per-core decode rate of a
1024-px member; and what a node of 8 GPUs needs at 1024 px.

    python bench/bench_data.py                      # synthesizes a 1024-px folder, shards it, times 64/256/1024
    python bench/bench_data.py --quick              # fewer images and batches
    python bench/bench_data.py --data data/h36m     # your own folder dataset (shards written to a temp dir)

Images/s counts pairs x 2 images (reference + target) per second after one warm-up batch; the
loaders alternate round by round (``--rounds``) and the table gives each one's median, so a load
change on shared cores hits all of them alike. The folder loader decodes the 1024-px source at every
stage (and resizes it); the shard loader decodes the stage's own member. JSON goes to
bench/results/data-<device>.json (atomically).
"""
from __future__ import annotations

import argparse
import io
import logging
import statistics
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

# The step's physical limit at 1024 px (up to 165 pairs/s per GPU; 66 at 40% MFU) and a pair = 2 images.
NODE_GPUS = 8
PAIRS_PER_GPU = {"physical limit": 165, "40% MFU": 66}


def synthesize(root: Path, size: int, pairs: int, seed: int) -> None:
    """A folder at ``size`` px with at least ``pairs`` train pairs, via ``hptransfer data synth``."""
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
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for i, batch in enumerate(it):
        n += 2 * batch["reference"].shape[0]
        if i + 1 >= batches:
            break
    if cuda:
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    # cpu: this process's CPU seconds (its threads: DALI's decoders; not DataLoader worker processes)
    return {"images_per_s": (n / dt if dt > 0 and n else float("nan")), "images": n, "first_batch_s": first_s,
            "cpu_ms_per_image": 1e3 * cpu / n if n else float("nan")}


def one_core(dataset, images: int) -> dict:
    """The torch loader's whole work per image on one core (a shard member: read by offset, length
    and CRC checked, PIL decode, to a [-1, 1] tensor): wall and CPU milliseconds per image; the CPU
    time is what shared cores do not inflate much."""
    n = min(images, len(dataset.table))
    c0 = time.process_time()
    for i in range(n):
        dataset.encoded(i)  # what a DALI Python reader does per image
    read = time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        dataset._load(i)
    return {"wall_ms_per_image": 1e3 * (time.perf_counter() - t0) / n,
            "cpu_ms_per_image": 1e3 * (time.process_time() - c0) / n, "read_cpu_ms_per_image": 1e3 * read / n,
            "images": n}


def member_formats(folder: Path, resolution: int, images: int) -> dict:
    """Bytes and one-core PIL decode time of the fitted image as a JPEG member (quality 95, 4:4:4, what
    ``data shard`` writes) and as a PNG member, over up to ``images`` images of the folder."""
    from PIL import Image

    from hptransfer.data.dataset import fit_image, load_image
    from hptransfer.data.formats import read_annotations

    names = sorted(read_annotations(folder / "annotations-train.csv"))[:images]
    out = {}
    for fmt, kw in (("jpg", {"format": "JPEG", "quality": 95, "subsampling": 0}), ("png", {"format": "PNG",
                                                                                           "compress_level": 1})):
        sizes, times = [], []
        for name in names:
            buf = io.BytesIO()
            fit_image(load_image(folder / "images" / name), resolution).save(buf, **kw)
            data = buf.getvalue()
            t0 = time.perf_counter()
            with Image.open(io.BytesIO(data)) as im:
                im.convert("RGB")
            times.append(time.perf_counter() - t0)
            sizes.append(len(data))
        out[fmt] = {"bytes_mean": statistics.mean(sizes), "decode_ms_median": 1e3 * statistics.median(times)}
    return out


def load_average() -> list:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder dataset (default: synthesize one at 1024 px into a temp dir)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024], help="stage resolutions to time")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=None, help="timed batches per loader and round")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                    help="torch DataLoader worker counts; DALI gets max(workers) threads and Python readers")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (median reported)")
    ap.add_argument("--quick", action="store_true", help="fewer images, batches and rounds")
    ap.add_argument("--no-dali", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from hptransfer.data import PairDataset, make_loader
    from hptransfer.data.dali import dali_available, make_dali_loader_from_dataset
    from hptransfer.data.shard_writer import ShardOptions, shard_folder
    from hptransfer.data.shards import ShardPairDataset, ShardSet

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batches = args.batches or (4 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 3)
    threads = max(1, max(args.workers))
    dali = not args.no_dali and dali_available()
    dali_device = "gpu" if cuda else "cpu"
    load_before = load_average()

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        folder = Path(args.data) if args.data else Path(tmp) / "folder1024"
        if not args.data:
            synthesize(folder, 1024, args.batch * (batches + 2), seed=0)
        shard_root = Path(tmp) / "shards"
        t0 = time.perf_counter()
        shard_folder(folder, shard_root, ShardOptions(sizes=sorted(set(args.sizes) | {64, 1024})),
                     workers=threads, splits=[args.split])
        shard_s = time.perf_counter() - t0
        shards = ShardSet(shard_root)
        table = shards.table(args.split)
        member_bytes = {R: float(table["size"][:, shards.column(R)].mean()) for R in shards.sizes}

        rows = []
        for R in args.sizes:
            datasets = {"folder": PairDataset(folder, args.split, R, flip=True),
                        "shards": ShardPairDataset(shard_root, args.split, R, flip=True)}
            makers = {}
            for fmt, ds in datasets.items():
                for w in args.workers:
                    makers[f"{fmt} torch w{w}"] = (lambda ds=ds, w=w: make_loader(ds, args.batch, workers=w, seed=0,
                                                                               pin_memory=False))
                if dali:
                    makers[f"{fmt} dali-{dali_device} t{threads}"] = (
                        lambda ds=ds: make_dali_loader_from_dataset(ds, args.batch, seed=0, device=dali_device,
                                                                    num_threads=threads, workers=threads))
            runs = {k: [] for k in makers}
            for r in range(rounds):
                for name, make in makers.items():
                    res = time_loader(make, batches)
                    runs[name].append(res)
                    log.info("%5d px round %d  %-24s %8.1f img/s  %7.1f CPU ms/img (this process)", R, r, name,
                             res["images_per_s"], res["cpu_ms_per_image"])
            loaders = {k: {"images_per_s": statistics.median(x["images_per_s"] for x in v),
                           "cpu_ms_per_image": statistics.median(x["cpu_ms_per_image"] for x in v),
                           "rounds": [x["images_per_s"] for x in v]} for k, v in runs.items()}
            rows.append({"resolution": R, "batch": args.batch, "pairs": len(datasets["shards"]), "loaders": loaders})

        decode = {R: one_core(ShardPairDataset(shard_root, args.split, R), 24 if args.quick else 64)
                  for R in (64, 1024)}
        formats = member_formats(folder, 1024, 4 if args.quick else 8)

    # 8-GPU node at 1024 px: images/s needed, and the cores that supply them at this CPU's CPU time per
    # image: the torch loader's whole item in one process (workers 0: read, decode, tensor, flip, collate),
    # and DALI's CPU decode threads (its run's CPU time; its byte-reading Python workers not counted).
    by_r = {r["resolution"]: r for r in rows}
    torch_ms = (by_r[1024]["loaders"]["shards torch w0"]["cpu_ms_per_image"]
                if 1024 in by_r and 0 in args.workers else None)
    dali_key = f"shards dali-{dali_device} t{threads}"
    dali_ms = by_r[1024]["loaders"][dali_key]["cpu_ms_per_image"] if dali and 1024 in by_r and not cuda else None
    node = {}
    for what, pairs in PAIRS_PER_GPU.items():
        need = 2 * pairs * NODE_GPUS
        node[what] = {"pairs_per_gpu": pairs, "images_per_s_per_node": need,
                      "torch_worker_cores": need * torch_ms / 1e3 if torch_ms else None,
                      "dali_cpu_threads": need * dali_ms / 1e3 if dali_ms else None}
    ratios = {}
    for r in rows:
        L = r["loaders"]
        for w in args.workers:
            ratios[f"{r['resolution']}px shards/folder torch w{w}"] = (L[f"shards torch w{w}"]["images_per_s"]
                                                                      / L[f"folder torch w{w}"]["images_per_s"])
        if dali:
            ratios[f"{r['resolution']}px shards/folder dali"] = (L[f"shards dali-{dali_device} t{threads}"]["images_per_s"]
                                                                 / L[f"folder dali-{dali_device} t{threads}"]["images_per_s"])
    payload = {"benchmark": "data", **environment(device), "quick": args.quick,
               "data": args.data or "synthetic (hptransfer data synth --size 1024)",
               "load_average_before": load_before, "load_average_after": load_average(),
               "batch": args.batch, "batches": batches, "rounds": rounds, "torch_workers": args.workers,
               "dali_threads_and_readers": threads if dali else None,
               "note": "images/s = 2 images per pair, median over alternating rounds; folder = the 1024-px source "
                       "decoded (and resized) at every stage, shards = the stage's own member (jpg q95 4:4:4)",
               "shard_seconds": shard_s, "member_bytes_mean": member_bytes, "member_formats_1024": formats,
               "one_core_decode": decode, "results": rows, "ratios": ratios, "node_8_gpus_1024px": node}
    out = Path(args.out) if args.out else RESULTS / f"data-{device_name()}.json"
    write_json(out, payload)

    names = list(rows[0]["loaders"])
    print(f"\nimages/s on {device_name()} (batch {args.batch}, median of {rounds} alternating rounds; "
          f"load {load_before} -> {payload['load_average_after']})")
    print(f"{'px':>6} " + " ".join(f"{n:>24}" for n in names))
    for r in rows:
        print(f"{r['resolution']:>6} " + " ".join(f"{r['loaders'][n]['images_per_s']:24.1f}" for n in names))
    print("\nratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print("one core, torch loader work per shard member: " + ", ".join(
        f"{R} px {d['cpu_ms_per_image']:.1f} CPU ms ({d['wall_ms_per_image']:.1f} wall; reading it "
        f"{d['read_cpu_ms_per_image']:.2f})" for R, d in decode.items()))
    print("1024-px member: " + ", ".join(f"{k} {v['bytes_mean'] / 1e3:.0f} kB, decode {v['decode_ms_median']:.1f} ms"
                                          for k, v in formats.items()))
    for what, v in node.items():
        if v["torch_worker_cores"] is None and v["dali_cpu_threads"] is None:
            print(f"8 GPUs at the {what}: {v['images_per_s_per_node']} img/s (cores not estimated: needs --sizes 1024 "
                  f"and --workers 0)")
            continue
        print(f"8 GPUs at the {what}: {v['images_per_s_per_node']} img/s = {v['torch_worker_cores'] or float('nan'):.0f} cores of "
              f"torch workers, or {v['dali_cpu_threads'] or float('nan'):.0f} DALI CPU threads, at this CPU's CPU time "
              f"per image")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
