"""Whole training steps, fast vs naive, data already on the device.

    python bench/bench_train.py --resolution 128 --mode both            # CPU default: width 0.125, batch 2
    python bench/bench_train.py --resolution 256 512 1024 --batch 8      # GPU: width 1.0, bf16
    python bench/bench_train.py --resolution 256 --max-batch             # largest batch, +/- checkpointing (GPU;
                                                                          # the CPU only runs the search, up to 2)

A step = generator forward, every loss of the stage (global perceptual; local perceptual with the
stage's descriptor count; local discriminators with their D step at the top stage or with --disc),
backward, optimiser steps. ``fast`` is the trainer's path (``hptransfer.step.train_step``: bf16
autocast on GPU, Triton/extension kernels with impl="auto", channels_last on GPU; --compile and
--checkpointing optional). ``naive`` (bench/naive.py) is the research-code way: fp32, eager,
heatmaps per sample on the CPU, one VGG call per descriptor crop. Both run in the same process,
after warm-up; times are medians (on the CPU the two
modes' steps alternate, so load from other processes hits both alike). VGG-16 has random weights:
the cost does not depend on them.

FLOPs are counted analytically for the convolutions only (2 * Cin/groups * Cout * k * k * Hout * Wout
per conv, shapes from a meta-device forward; ``hptransfer.models.summary.module_conv_flops``): generator,
VGG on the fake image and crops, and the discriminators, each forward x3 for forward + backward; VGG on
the real image/crops runs without autograd and counts x1. MFU = achieved TFLOP/s / a large bf16
matmul's TFLOP/s measured in the same run (GPU only). Phase shares come from hptransfer.profiling
timers (CUDA events on GPU) in separate timed steps. JSON: bench/results/train-<device>.json
(atomically, after every resolution, with bench.common.environment(): versions, CPU flags, backend status).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"

from bench import naive  # noqa: E402
from bench.common import device_name, environment, write_json  # noqa: E402
from bench.common import sync as _sync  # noqa: E402
from hptransfer import losses, pose, profiling  # noqa: E402
from hptransfer.backend import SingleBackend  # noqa: E402
from hptransfer.config import Config, StageConfig  # noqa: E402
from hptransfer.models.summary import conv_flops, module_conv_flops  # noqa: E402
from hptransfer.step import PHASES, train_step  # noqa: E402

log = logging.getLogger("bench_train")


# ----------------------------------------------------------------------------- FLOPs
def step_flops(cfg: Config, R: int, batch: int, with_discriminators: bool) -> dict:
    """Analytic conv FLOPs of one training step (see the module docstring)."""
    from hptransfer.models import Generator, LocalDiscriminator, VGG16Features

    with torch.device("meta"):
        g = Generator(cfg.model, R)
        vgg = VGG16Features(weights="random", layers=tuple(cfg.loss.layers))
    g.impl = "reference"
    gen = conv_flops(g, R)
    vgg_img = module_conv_flops(vgg.features, torch.zeros(1, 3, R, R, device="meta"))
    side = max(pose.crop_size(R), int(cfg.loss.local_min_crop or 0))
    vgg_crop = module_conv_flops(vgg.features, torch.zeros(1, 3, side, side, device="meta"))
    n = pose.descriptor_count(R)
    active = losses.active_terms(cfg.loss, R)
    out = {"generator": 3 * gen, "global_vgg": 3 * vgg_img + vgg_img,
           "local_vgg": (3 + 1) * n * vgg_crop if active["local"] else 0, "discriminator": 0}
    if with_discriminators:
        with torch.device("meta"):
            discriminator = LocalDiscriminator(cfg.model, n, pose.crop_size(R))
        s = pose.crop_size(R)
        per = module_conv_flops(discriminator, torch.zeros(1, n, 6, s, s, device="meta"))
        out["discriminator"] = 3 * 2 * per + 3 * per  # D step on real+fake, G's adversarial pass
    out = {k: v * batch for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def matmul_tflops(device: torch.device) -> float | None:
    """Measured bf16 matmul rate (8192^2, median of 10) in TFLOP/s; None on the CPU."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n ** 3 / statistics.median(times) / 1e12


# ----------------------------------------------------------------------------- set-up
def make_config(R: int, batch: int, width: float, with_discriminators: bool, compile_: bool, checkpointing: bool,
                vgg_layers: Optional[list] = None) -> Config:
    """``vgg_layers``: the loss's VGG taps (default: the paper's five; a toy run takes fewer, a shorter VGG)."""
    cfg = Config()
    cfg.model.width = width
    cfg.loss.vgg_weights = "random"
    if vgg_layers:
        cfg.loss.layers = list(vgg_layers)
    if with_discriminators:
        cfg.loss.disc_at_resolution = min(cfg.loss.disc_at_resolution, R)
    cfg.stages = [StageConfig(R, 1000, batch)]
    cfg.train.compile, cfg.train.activation_checkpointing = compile_, checkpointing
    return cfg


def make_inputs(R: int, batch: int, device: torch.device, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    ref = torch.rand(batch, 3, R, R, generator=gen) * 2 - 1
    tgt = torch.rand(batch, 3, R, R, generator=gen) * 2 - 1
    # keypoints inside the image (a person roughly centred), one missing to exercise the mask
    kp = lambda: (torch.rand(batch, 18, 2, generator=gen) * 0.6 + 0.2) * (R - 1)  # noqa: E731
    kr, kt = kp(), kp()
    kr[:, 17], kt[:, 16] = -1, -1
    return ref.to(device), tgt.to(device), kr.to(device), kt.to(device)


class Runner:
    """Models, optimisers and a ``step()`` for one (mode, resolution, batch)."""

    def __init__(self, mode: str, cfg: Config, R: int, batch: int, device: torch.device):
        from hptransfer.models import Generator, LocalDiscriminator, VGG16Features

        self.mode, self.R, self.device = mode, R, device
        fast = mode == "fast"
        self.cfg = cfg
        torch.manual_seed(0)
        precision = "bf16" if fast and device.type == "cuda" else "fp32"
        self.backend = SingleBackend(precision, device=str(device), channels_last=fast)
        g = Generator(cfg.model, R)
        vgg = VGG16Features(weights="random", layers=tuple(cfg.loss.layers)).to(device).eval()
        for p in vgg.parameters():
            p.requires_grad_(False)
        discriminator = (LocalDiscriminator(cfg.model, pose.descriptor_count(R), pose.crop_size(R))
                         if losses.active_terms(cfg.loss, R)["adv"] else None)
        opt = lambda ps, lr: torch.optim.Adam([p for p in ps if p.requires_grad], lr=lr,  # noqa: E731
                                              weight_decay=cfg.train.weight_decay)
        self.criterion = "l2"
        if fast:
            g.impl = "auto"
            g.set_activation_checkpointing(cfg.train.activation_checkpointing)
            self.g = self.backend.prepare(g)
            if device.type == "cuda":
                vgg = vgg.to(memory_format=torch.channels_last)
            self.g_engine = self.backend.engine("generator", self.g, opt(self.g.parameters(), cfg.train.lr), batch)
            if cfg.train.compile:
                self.g_engine.forward_fn = torch.compile(self.g)
            self.d_engine = None
            if discriminator is not None:
                discriminator = self.backend.prepare(discriminator)
                self.d_engine = self.backend.engine("discriminator", discriminator,
                                                    opt(discriminator.parameters(), cfg.loss.disc_lr), batch)
        else:
            naive.make_naive(g)
            self.g = g.to(device)
            self.g_opt = opt(self.g.parameters(), cfg.train.lr)
            self.discriminator = discriminator.to(device) if discriminator is not None else None
            self.d_opt = opt(self.discriminator.parameters(), cfg.loss.disc_lr) if discriminator is not None else None
        self.vgg = vgg
        self.g.train()
        ref, tgt, kr, kt = make_inputs(R, batch, device)
        if fast:
            fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
            dt = self.backend.input_dtype
            ref, tgt = (t.to(dtype=dt, memory_format=fmt) for t in (ref, tgt))
        self.inputs = (ref, tgt, kr, kt)

    def step(self) -> None:
        ref, tgt, kr, kt = self.inputs
        if self.mode == "fast":
            train_step(self.g_engine, self.g, self.vgg, self.cfg, ref, tgt, kr, kt, self.criterion, "auto",
                       self.backend, d_engine=self.d_engine)
        else:
            naive.naive_step(self.g, self.g_opt, self.vgg, self.cfg, ref, tgt, kr, kt, self.criterion,
                             self.discriminator, self.d_opt)


def _phases(run: "Runner", n: int) -> dict:
    """Per-phase median seconds over ``n`` steps timed by hptransfer.profiling (kept apart from the
    ms/step steps: CUDA events add no sync, but the CPU timer reads perf_counter at every phase)."""
    phases: dict = {}
    for _ in range(n):
        with profiling.PhaseTimer(cuda=run.device.type == "cuda") as t:
            run.step()
        for k, v in t.totals().items():
            phases.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in phases.items()}


def time_runners(runs: dict, steps: int, warmup: int) -> dict:
    """{mode: {"ms" (median), "times_ms", "peak_mib" (CUDA) , "phases_s"}}.

    On the CPU the modes' steps are interleaved (fast, naive, fast, ...) so that load from other
    processes on a shared machine hits both alike; on CUDA each mode runs alone (its own peak memory).
    """
    dev = next(iter(runs.values())).device
    out = {m: {"times": []} for m in runs}
    interleave = dev.type != "cuda"
    order = [list(runs)] * steps if interleave else [[m] * steps for m in runs]
    for m, run in runs.items():
        for _ in range(warmup):
            run.step()
    _sync(dev)
    for group in order:
        for m in group:
            if not interleave and len(out[m]["times"]) == 0 and dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            runs[m].step()
            _sync(dev)
            out[m]["times"].append(time.perf_counter() - t0)
            if dev.type == "cuda" and not interleave:
                out[m]["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    res = {}
    for m, run in runs.items():
        times = out[m]["times"]
        res[m] = {"ms": 1e3 * statistics.median(times), "times_ms": [1e3 * x for x in times],
                  "peak_mib": out[m].get("peak_mib"), "phases_s": _phases(run, max(1, min(steps, 3)))}
    return res


# ----------------------------------------------------------------------------- max batch
def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


def search_max_batch(peak_of: Callable[[int], Optional[int]], start: int, limit: int, capacity: Optional[int],
                     tolerance: float = 1 / 16) -> tuple[int, list]:
    """Largest batch in [0, ``limit``] for which ``peak_of(batch)`` (peak bytes; None = out of memory)
    succeeds, in few tries (GPU time is short).

    From ``start`` the batch doubles until two batches have fitted; with ``capacity`` (device bytes)
    their peaks give a line (peak memory is close to affine in the batch), and the next try is the
    batch that line puts at 97% of ``capacity``, then at 100% (at least ``tolerance`` more) while it
    fits. Without ``capacity`` it keeps doubling. A failure brackets the answer; after a failed
    prediction the next tries are 10% under the failure (twice at most), then bisection, until the
    bracket is within ``tolerance``.
    Returns (batch, [(batch tried, fitted)])."""
    peaks: dict = {}
    tries: list = []

    def fits(b: int) -> bool:
        peak = peak_of(b)
        tries.append((b, peak is not None))
        if peak is not None and capacity:
            peaks[b] = peak
        return peak is not None

    lo, hi, b, jumped = 0, None, max(1, min(start, limit)), False
    while True:  # grow until a batch fails or the limit fits
        if not fits(b):
            hi = b
            break
        lo = b
        if b >= limit:
            break
        if len(peaks) >= 2:
            (b1, p1), (b2, p2) = sorted(peaks.items())[-2:]
            target = (1.0 if jumped else 0.97) * capacity
            predicted = int(b2 + (target - p2) * (b2 - b1) / (p2 - p1)) if p2 > p1 else 2 * b
            b = max(int(b * (1 + tolerance)) if jumped else b, b + 1, predicted)
            jumped = True
        else:
            b = 2 * b
        b = min(b, limit)
    near = 2 if jumped else 0  # a failed prediction is usually just above the answer: try 10% under it
    while hi is not None and hi - lo > max(1, int(lo * tolerance)):
        mid = (lo + hi) // 2
        if near and lo < int(hi * 0.9) < hi:
            mid, near = max(mid, int(hi * 0.9)), near - 1
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, tries


def max_batch(R: int, width: float, device: torch.device, checkpointing: bool, with_discriminators: bool,
              start: int = 1, limit: int = 4096, tolerance: float = 1 / 16, vgg_layers: Optional[list] = None) -> dict:
    """Largest fast-mode batch (up to ``limit``) that trains two steps (the second holds the Adam
    state), found by :func:`search_max_batch` (CUDA OOM = does not fit), with cudnn autotuning off.
    Returns {"batch", "tries", "tolerance"}."""
    cuda = device.type == "cuda"

    def peak_of(b: int) -> Optional[int]:
        run = None
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            cfg = make_config(R, b, width, with_discriminators, False, checkpointing, vgg_layers)
            run = Runner("fast", cfg, R, b, device)
            run.step()
            run.step()
            _sync(device)
            peak = torch.cuda.max_memory_allocated() if cuda else 0
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not _is_oom(e):
                raise
            peak = None
        finally:
            del run
            if cuda:
                torch.cuda.empty_cache()
        log.info("%d px max batch (checkpointing=%s): batch %d %s", R, checkpointing, b,
                 "OOM" if peak is None else "fits")
        return peak

    capacity = torch.cuda.mem_get_info(device)[1] if cuda else None
    # cudnn autotuning would re-time every convolution at every new batch size (seconds per try)
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        batch, tries = search_max_batch(peak_of, start, limit, capacity, tolerance)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return {"batch": batch, "tries": tries, "tolerance": tolerance}


# ----------------------------------------------------------------------------- main
def bench_resolution(args, R: int, device: torch.device, peak_tflops) -> dict:
    modes = ["fast", "naive"] if args.mode == "both" else [args.mode]
    cfg = make_config(R, args.batch, args.width, args.disc, args.compile, args.checkpointing, args.vgg_layers)
    with_discriminators = losses.active_terms(cfg.loss, R)["adv"]
    flops = step_flops(cfg, R, args.batch, with_discriminators)
    row = {"resolution": R, "batch": args.batch, "width": args.width, "descriptors": pose.descriptor_count(R),
           "disc": with_discriminators, "flops": flops, "modes": {}}
    if device.type == "cuda":  # one mode at a time: its own peak memory
        timed = {}
        for mode in modes:
            log.info("%d px %s: building", R, mode)
            run = Runner(mode, cfg, R, args.batch, device)
            timed.update(time_runners({mode: run}, args.steps, args.warmup))
            del run
            torch.cuda.empty_cache()
    else:
        runs = {m: Runner(m, cfg, R, args.batch, device) for m in modes}
        timed = time_runners(runs, args.steps, args.warmup)
    for mode, res in timed.items():
        res["images_per_s"] = args.batch / (res["ms"] / 1e3)
        res["tflops"] = flops["total"] / (res["ms"] / 1e3) / 1e12
        res["mfu"] = res["tflops"] / peak_tflops if peak_tflops else None
        row["modes"][mode] = res
    if "fast" in row["modes"] and "naive" in row["modes"]:
        row["speedup"] = row["modes"]["naive"]["ms"] / row["modes"]["fast"]["ms"]
    return row


def max_batch_row(args, row: dict, device: torch.device) -> dict:
    """{"plain", "checkpointing", "limit", "tries", "tolerance"}: the largest batches at row's resolution."""
    R, with_discriminators = row["resolution"], row["disc"]
    plain = max_batch(R, args.width, device, False, with_discriminators, start=args.batch, limit=args.max_batch_limit,
                      vgg_layers=args.vgg_layers)
    # checkpointing keeps fewer activations: at least the plain batch fits
    ckpt = max_batch(R, args.width, device, True, with_discriminators, start=max(args.batch, plain["batch"]),
                     limit=args.max_batch_limit, vgg_layers=args.vgg_layers)
    return {"plain": plain["batch"], "checkpointing": ckpt["batch"], "limit": args.max_batch_limit,
            "tries": {"plain": plain["tries"], "checkpointing": ckpt["tries"]}, "tolerance": plain["tolerance"]}


def print_table(rows: list, device: str, width: float, peak) -> None:
    print(f"\nTraining step on {device}, model.width={width:g}"
          f"{' (reduced for the CPU)' if width != 1.0 else ''}; VGG-16 random weights (cost does not depend on them); "
          "FLOPs: convs only, fwd x3 for fwd+bwd" + (f"; bf16 matmul peak {peak:.0f} TFLOP/s" if peak else ""))
    print(f"{'R':>5} {'B':>3} {'mode':>6} {'ms/step':>9} {'img/s':>8} {'speed-up':>8} {'peak MiB':>9} "
          f"{'GFLOP/step':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for r in rows:
        for mode, m in r["modes"].items():
            sp = f"{r['speedup']:.2f}x" if mode == "fast" and "speedup" in r else ""
            mem = f"{m['peak_mib']:.0f}" if m["peak_mib"] is not None else "-"
            mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] else "-"
            print(f"{r['resolution']:>5} {r['batch']:>3} {mode:>6} {m['ms']:>9.1f} {m['images_per_s']:>8.2f} {sp:>8} "
                  f"{mem:>9} {r['flops']['total'] / 1e9:>10.1f} {m['tflops']:>8.3f} {mfu:>6}")
        for mode, m in r["modes"].items():
            tot = sum(m["phases_s"].values()) or 1.0
            shares = "  ".join(f"{k} {100 * m['phases_s'][k] / tot:.0f}%" for k in PHASES if k in m["phases_s"])
            print(f"      {mode} phases: {shares}")
        if "max_batch" in r:
            mb = r["max_batch"]
            print(f"      max batch: {mb['plain']} (plain), {mb['checkpointing']} (checkpointing); "
                  f"limit {mb['limit']}, within {100 * mb['tolerance']:.0f}%")


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, nargs="+", default=[128])
    p.add_argument("--batch", type=int, default=None, help="default: 8 on GPU, 2 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 5 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="default 5 on GPU (10 with --compile), 1 on the CPU")
    p.add_argument("--mode", choices=("fast", "naive", "both"), default="both")
    p.add_argument("--width", type=float, default=None, help="model.width (default 1.0 on GPU, 0.125 on the CPU)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (fast mode)")
    p.add_argument("--disc", action="store_true", help="local discriminators at every resolution benchmarked")
    p.add_argument("--vgg-layers", nargs="+", default=None, help="VGG taps of the losses (default: all five)")
    p.add_argument("--max-batch", action="store_true", help="largest batch per resolution, +/- checkpointing")
    p.add_argument("--max-batch-limit", type=int, default=None,
                   help="largest batch tried (default 4096 on GPU, 2 on the CPU: there it only runs the search)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/train-<device>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.batch = args.batch or (8 if cuda else 2)
    args.steps = args.steps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else ((10 if args.compile else 5) if cuda else 1)
    args.width = args.width or (1.0 if cuda else 0.125)
    args.max_batch_limit = args.max_batch_limit or (4096 if cuda else 2)
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    peak = matmul_tflops(device)
    dev = device_name()
    out = Path(args.out) if args.out else RESULTS / f"train-{dev}.json"
    rows: list = []

    def save(complete: bool) -> None:
        # rewritten after every part: a run stopped by a time limit keeps what it measured
        write_json(out, {**environment(device), "args": vars(args), "matmul_bf16_tflops": peak,
                         "notes": "VGG-16 random weights; FLOPs = convs only, forward x3 for fwd+bwd, "
                                  "no-grad VGG passes x1", "complete": complete, "results": rows})

    for R in args.resolution:  # step times first, then the (longer) max-batch searches
        rows.append(bench_resolution(args, R, device, peak))
        save(complete=len(rows) == len(args.resolution) and not args.max_batch)
    if args.max_batch:
        for i, row in enumerate(rows):
            row["max_batch"] = max_batch_row(args, row, device)
            save(complete=i == len(rows) - 1)
    print_table(rows, dev, args.width, peak)
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
