"""Whole training steps, fast vs naive, data already on the device.

    python bench/bench_train.py --resolution 128 --mode both            # CPU default: width 0.125, batch 2
    python bench/bench_train.py --resolution 256 512 1024 --batch 8      # GPU: width 1.0; naive, fast fp32, fast bf16
    python bench/bench_train.py --resolution 256 --max-batch             # largest batch, +/- checkpointing (GPU;
                                                                          # the CPU only runs the search, up to 2)
    python bench/bench_train.py --resolution 1024 256 512 --mode fast naive --max-batch 1024   # in that order
    python bench/bench_train.py --resolution 512 --mode fast --amp fp16 --grad-check   # fp16's gradients checked

A step = generator forward, every loss of the stage (global perceptual; local perceptual with the
stage's descriptor count; local discriminators with their D step at the top stage or with --disc),
backward, optimiser steps. ``fast`` is the trainer's path (``hptransfer.step.train_step``: bf16
autocast on GPU (--amp fp16 for fp16), Triton/extension kernels with impl="auto", channels_last on GPU,
the trainer's optimiser (fused Adam on CUDA); --checkpointing optional). ``fast_compiled`` (with
--compile blocks|full) is fast with that train.compile, timed beside eager fast in the same run. ``fast_fp32`` is
the same path at fp32, so that the kernels' gain (naive -> fast_fp32) and the precision's
(fast_fp32 -> fast) are told apart; on the CPU fast already runs at fp32, and --mode both runs no
separate fast_fp32 row there (the row says so). ``naive`` (bench/naive.py) is the research-code way:
fp32, eager, heatmaps per sample on the CPU, one VGG call per descriptor crop. All run in the same
process, after warm-up; times are medians (on the CPU the modes' steps alternate, so load from other
processes hits them alike). VGG-16 has random weights: the cost does not depend on them. Resolutions run
in the order given, each row (and its max-batch search, for the resolutions --max-batch names) saved
before the next starts. --grad-check adds one step to the fast row that checks what fp16 breaks first:
finite losses, and the gradient the global perceptual loss (relu1_2) sends to the generated image,
loss-scaled as fp16's GradScaler starts, against the same gradient in fp32 (exit status 1 when it fails).

FLOPs are counted analytically for the convolutions only (2 * Cin/groups * Cout * k * k * Hout * Wout
per conv, shapes from a meta-device forward; ``hptransfer.models.summary.module_conv_flops``), each
network's forward times what autograd computes in it (a conv's backward costs one forward per gradient:
input, weight): the generator and the discriminators' D step are trained, x3 (forward, input and
weight gradients; the first conv's input gradient, which autograd skips, is under 1 %); VGG on the fake
image and crops and the discriminators in the generator's adversarial term are frozen but the gradient
flows through them to the generator, x2 (forward + input gradient); VGG on the real image and crops runs
under torch.no_grad, x1. Model FLOPs: activation checkpointing's recomputation is not counted.
MFU per mode, against the peak of the mode's precision: ``mfu_spec`` against the datasheet's dense peak
(``SPEC_PEAKS_TFLOPS`` by GPU name; fp32 convolutions count at the TF32 rate while cuDNN allows TF32,
PyTorch's default; none on the CPU) and ``mfu_measured`` against a large matmul in the same dtype timed
in the same run (GPU and CPU). Phase shares come from hptransfer.profiling timers (CUDA events on GPU)
in separate timed steps. JSON: bench/results/train-<device>.json (atomically, after every resolution,
with bench.common.environment(): versions, CPU model and flags, ``hptransfer.ops.backend_status()``).
"""
from __future__ import annotations

import argparse
import logging
import re
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
# What one pass of a network costs, in forwards, by what autograd computes in it: a convolution's
# backward is one forward's worth of work per gradient it produces (input, weight).
TRAINED = 3     # forward + input gradient + weight gradient: the generator, the discriminators' D step
INPUT_GRAD = 2  # forward + input gradient, parameters frozen: VGG on the fake image and crops, the
                # discriminators in the generator's adversarial term (the gradient flows through to the crops)
NO_GRAD = 1     # forward only, under torch.no_grad: VGG on the real image and crops


def step_flops(cfg: Config, R: int, batch: int, with_discriminators: bool) -> dict:
    """Analytic conv FLOPs of one training step, per network (see the module docstring and
    TRAINED / INPUT_GRAD / NO_GRAD): {"generator", "global_vgg", "local_vgg", "discriminator", "total"}."""
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
    out = {"generator": TRAINED * gen,
           "global_vgg": (INPUT_GRAD + NO_GRAD) * vgg_img,  # fake with autograd, real without
           "local_vgg": (INPUT_GRAD + NO_GRAD) * n * vgg_crop if active["local"] else 0, "discriminator": 0}
    if with_discriminators:
        with torch.device("meta"):
            discriminator = LocalDiscriminator(cfg.model, n, pose.crop_size(R))
        s = pose.crop_size(R)
        per = module_conv_flops(discriminator, torch.zeros(1, n, 6, s, s, device="meta"))
        # D step on real + fake pairs (trained); G's adversarial pass on the fake pairs (frozen)
        out["discriminator"] = TRAINED * 2 * per + INPUT_GRAD * per
    out = {k: v * batch for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- peaks
# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets, by the name torch.cuda.get_device_name
# gives; the first pattern that matches wins (variants before the family). "tf32" is the rate of fp32
# convolutions while torch.backends.cudnn.allow_tf32 is on (PyTorch's default), "fp32" without it.
SPEC_PEAKS_TFLOPS = (
    (r"H100.*PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H[12]00.*NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100|H200|H800|GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (r"A100|A800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"L40\b", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),  # fp32 accumulation
    (r"V100.*PCIE", {"fp16": 112.0, "fp32": 14.0}),
    (r"V100", {"fp16": 125.0, "fp32": 15.7}),
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fp32_math() -> str:
    """What fp32 convolutions run in on CUDA: "tf32" (cuDNN's TF32 switch on, PyTorch's default) or "fp32"."""
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def spec_peak_tflops(gpu_name: Optional[str], dtype: str) -> tuple[Optional[float], Optional[str]]:
    """(dense datasheet peak in TFLOP/s of ``dtype`` ("fp32" counts as fp32_math()), the table pattern
    that matched) for the GPU named ``gpu_name``; (None, None) for the CPU or a GPU not in the table."""
    if not gpu_name:
        return None, None
    key = fp32_math() if dtype == "fp32" else dtype
    for pattern, peaks in SPEC_PEAKS_TFLOPS:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return peaks.get(key), pattern
    return None, None


def matmul_tflops(device: torch.device, dtype: str = "bf16") -> float:
    """Measured rate of a large square matmul in ``dtype`` in TFLOP/s, in this process: 8192^2 on a GPU
    (CUDA events, median of 10; fp32 with TF32 exactly when fp32 convolutions use it), 1024^2 on the CPU
    (median of 10 wall times, the threads torch has)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    precision = torch.get_float32_matmul_precision()
    if cuda and dtype == "fp32":
        torch.set_float32_matmul_precision("high" if fp32_math() == "tf32" else "highest")
    try:
        for _ in range(3):
            a @ b
        times = []
        for _ in range(10):
            if cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                a @ b
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e) / 1e3)
            else:
                t0 = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_float32_matmul_precision(precision)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def peaks(device: torch.device, dtypes) -> dict:
    """{dtype: {"spec_tflops", "spec_match", "math", "measured_tflops"}} for each of ``dtypes``: the
    datasheet peak (GPU only, see SPEC_PEAKS_TFLOPS) and a matmul measured now in the same dtype."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    out = {}
    for dt in dtypes:
        spec, match = spec_peak_tflops(name, dt)
        out[dt] = {"spec_tflops": spec, "spec_match": match,
                   "math": (fp32_math() if device.type == "cuda" else "fp32") if dt == "fp32" else dt,
                   "measured_tflops": matmul_tflops(device, dt)}
    return out


# ----------------------------------------------------------------------------- set-up
MODES = ("naive", "fast_fp32", "fast", "fast_compiled")


def mode_precision(mode: str, device: torch.device, amp: str = "bf16") -> str:
    """The precision a mode runs in: ``amp`` for "fast" (and "fast_compiled") on a GPU, fp32 otherwise."""
    return amp if mode in ("fast", "fast_compiled") and device.type == "cuda" else "fp32"


def modes_to_run(mode, device: torch.device, compile_: str = "off") -> list:
    """``--mode`` (one name or a list) -> the modes to time, in order. "both": naive, fast_fp32 and fast on a
    GPU; naive and fast on the CPU, where fast already runs at fp32 (a fast_fp32 row would time the same
    thing twice); plus fast_compiled (fast with ``--compile``'s train.compile) when ``compile_`` is not "off"."""
    out: list = []
    for m in [mode] if isinstance(mode, str) else mode:
        if m == "both":
            both = ["fast", "fast_fp32", "naive"] if device.type == "cuda" else ["fast", "naive"]
            expanded = both + (["fast_compiled"] if compile_ != "off" else [])
        else:
            expanded = [m]
        out += [e for e in expanded if e not in out]
    return out


def make_config(R: int, batch: int, width: float, with_discriminators: bool, compile_: str, checkpointing: bool,
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
    """Models, optimisers and a ``step()`` for one (mode, resolution, batch). Modes (:data:`MODES`):
    "naive"; "fast_fp32", the trainer's path at fp32; "fast", the trainer's path with ``amp`` autocast
    on a GPU (fp32 on the CPU, where it is the same as fast_fp32)."""

    def __init__(self, mode: str, cfg: Config, R: int, batch: int, device: torch.device, amp: str = "bf16",
                 compile_backend: Optional[str] = None):
        from hptransfer.models import Generator, LocalDiscriminator, VGG16Features
        from hptransfer.train import _compile_generator, _make_optimizer

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.R, self.device = mode, R, device
        fast = mode != "naive"
        self.cfg = cfg
        torch.manual_seed(0)
        self.precision = mode_precision(mode, device, amp)
        self.backend = SingleBackend(self.precision, device=str(device), channels_last=fast)
        g = Generator(cfg.model, R)
        vgg = VGG16Features(weights="random", layers=tuple(cfg.loss.layers)).to(device).eval()
        for p in vgg.parameters():
            p.requires_grad_(False)
        discriminator = (LocalDiscriminator(cfg.model, pose.descriptor_count(R), pose.crop_size(R))
                         if losses.active_terms(cfg.loss, R)["adv"] else None)
        if fast:  # the trainer's optimiser (fused Adam on CUDA)
            opt = lambda ps, lr: _make_optimizer(cfg, ps, lr)  # noqa: E731
        else:
            opt = lambda ps, lr: torch.optim.Adam([p for p in ps if p.requires_grad], lr=lr,  # noqa: E731
                                                  weight_decay=cfg.train.weight_decay)
        self.criterion = "l2"
        if fast:
            g.impl = "auto"
            stage = cfg.stages[0].activation_checkpointing
            g.set_activation_checkpointing(cfg.train.activation_checkpointing if stage is None else stage)
            self.g = self.backend.prepare(g)
            if device.type == "cuda":
                vgg = vgg.to(memory_format=torch.channels_last)
            self.g_engine = self.backend.engine("generator", self.g, opt(self.g.parameters(), cfg.train.lr), batch)
            if mode == "fast_compiled" and compile_backend:  # e.g. aot_eager: the dry run on a CPU
                if cfg.train.compile != "blocks":
                    raise ValueError("--compile-backend is for --compile blocks")
                self.g.compile_blocks(backend=compile_backend)
            elif mode == "fast_compiled":  # the other modes run eager: compiled vs eager in one run
                _compile_generator(cfg.train.compile, self.g, self.g_engine)
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

    def step(self) -> Optional[dict]:
        """One training step; the trainer's step result (``hptransfer.step.train_step``) on the fast modes."""
        ref, tgt, kr, kt = self.inputs
        if self.mode != "naive":  # fast, fast_fp32, fast_compiled: the trainer's step
            return train_step(self.g_engine, self.g, self.vgg, self.cfg, ref, tgt, kr, kt, self.criterion, "auto",
                              self.backend, d_engine=self.d_engine)
        naive.naive_step(self.g, self.g_opt, self.vgg, self.cfg, ref, tgt, kr, kt, self.criterion,
                         self.discriminator, self.d_opt)
        return None

    def grad_check(self) -> dict:
        """One more trainer step and what fp16 breaks first (a fast mode): every loss term finite, and the
        gradient that the global perceptual loss's first VGG layer (relu1_2: the largest C*H*W, where fp16
        underflows first) sends to the generated image, in the step's precision and loss-scaled as fp16's
        GradScaler starts (2^16, above fp16's largest value), against the same gradient in fp32: finite, about
        as many non-zero entries, the same direction. Host reads: a bench, not a step."""
        out = self.step()
        tgt = self.inputs[1]
        fake = out["fake"].float().requires_grad_()
        scale = 2.0 ** 16 if self.precision == "fp16" else 1.0  # GradScaler's initial scale
        first = [1.0] + [0.0] * (len(self.cfg.loss.layers) - 1)
        with self.backend.loss_autocast():
            loss = losses.global_perceptual_loss(fake, tgt, self.vgg, self.criterion, first, impl="auto")
        (grad,) = torch.autograd.grad(loss * scale, fake)
        grad = grad.float() / scale
        loss32 = losses.global_perceptual_loss(fake, tgt.float(), self.vgg, self.criterion, first, impl="auto")
        (want,) = torch.autograd.grad(loss32, fake)
        terms = {k: float(v) for k, v in out["terms"].items()}
        nonzero, nonzero_fp32 = float((grad != 0).float().mean()), float((want != 0).float().mean())
        cosine = float(torch.nn.functional.cosine_similarity(grad.flatten(), want.flatten(), dim=0))
        result = {"precision": self.precision, "loss_scale": scale, "terms": terms, "skipped": bool(out["skipped"]),
                  "global_loss": float(loss), "global_loss_fp32": float(loss32),
                  "global_grad_finite": bool(torch.isfinite(grad).all()), "global_grad_nonzero": nonzero,
                  "global_grad_nonzero_fp32": nonzero_fp32, "global_grad_cosine_fp32": cosine}
        # finite everywhere; at most a tenth fewer non-zero entries than fp32; the fp32 direction (cosine 0.9:
        # far from both an underflowed, mostly-zero gradient and the rounding of fp16 convolutions)
        result["ok"] = (all(map(lambda v: v == v and abs(v) != float("inf"), terms.values()))
                        and result["global_grad_finite"] and nonzero >= 0.9 * nonzero_fp32 and cosine >= 0.9)
        return result


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
def bench_resolution(args, R: int, device: torch.device, peak: dict) -> dict:
    """One resolution's row: FLOPs, and per mode the times, throughput and MFU against ``peak``
    (:func:`peaks`: spec and measured, per dtype); with --grad-check, the fast mode's ``grad_check``."""
    modes = modes_to_run(args.mode, device, args.compile)
    cfg = make_config(R, args.batch, args.width, args.disc, args.compile, args.checkpointing, args.vgg_layers)
    with_discriminators = losses.active_terms(cfg.loss, R)["adv"]
    flops = step_flops(cfg, R, args.batch, with_discriminators)
    row = {"resolution": R, "batch": args.batch, "width": args.width, "descriptors": pose.descriptor_count(R),
           "disc": with_discriminators, "flops": flops, "modes": {}}
    checked = None
    if device.type == "cuda":  # one mode at a time: its own peak memory
        timed = {}
        for mode in modes:
            log.info("%d px %s: building", R, mode)
            run = Runner(mode, cfg, R, args.batch, device, args.amp, args.compile_backend)
            timed.update(time_runners({mode: run}, args.steps, args.warmup))
            if mode == "fast" and args.grad_check:
                checked = run.grad_check()
            del run
            torch.cuda.empty_cache()
    else:
        runs = {m: Runner(m, cfg, R, args.batch, device, args.amp, args.compile_backend) for m in modes}
        timed = time_runners(runs, args.steps, args.warmup)
        if "fast" in runs and args.grad_check:
            checked = runs["fast"].grad_check()
    if checked is not None:
        row["grad_check"] = checked
    for mode, res in timed.items():
        res["precision"] = mode_precision(mode, device, args.amp)
        res["images_per_s"] = args.batch / (res["ms"] / 1e3)
        res["tflops"] = flops["total"] / (res["ms"] / 1e3) / 1e12
        p = peak.get(res["precision"], {})
        res["mfu_spec"] = res["tflops"] / p["spec_tflops"] if p.get("spec_tflops") else None
        res["mfu_measured"] = res["tflops"] / p["measured_tflops"] if p.get("measured_tflops") else None
        res["mfu"] = res["mfu_measured"]  # the name older result files have
        row["modes"][mode] = res
    ms = {m: r["ms"] for m, r in row["modes"].items()}
    if "fast" in ms and "naive" in ms:
        row["speedup"] = ms["naive"] / ms["fast"]  # kernels and precision together
    if "fast_fp32" in ms and "naive" in ms:
        row["speedup_kernels"] = ms["naive"] / ms["fast_fp32"]  # the fast path alone, both at fp32
    if "fast_compiled" in ms and "fast" in ms:
        row["speedup_compile"] = ms["fast"] / ms["fast_compiled"]  # train.compile alone, same precision
    if "fast_fp32" in ms and "fast" in ms:
        row["speedup_precision"] = ms["fast_fp32"] / ms["fast"]  # autocast alone, both on the fast path
    if device.type != "cuda" and "fast" in ms:
        row["fast_fp32"] = "not run: on the CPU fast runs at fp32 (the fast row is the fast fp32 row)"
        if "naive" in ms:
            row["speedup_kernels"] = row["speedup"]
    return row


def max_batch_row(args, row: dict, device: torch.device) -> dict:
    """{"plain", "checkpointing", "limit", "tries", "tolerance"}: the largest batches at row's resolution."""
    R, with_discriminators = row["resolution"], row["disc"]
    plain = max_batch(R, args.width, device, False, with_discriminators, start=args.batch, limit=args.max_batch_limit,
                      tolerance=args.max_batch_tolerance, vgg_layers=args.vgg_layers)
    # checkpointing keeps fewer activations: at least the plain batch fits
    ckpt = max_batch(R, args.width, device, True, with_discriminators, start=max(args.batch, plain["batch"]),
                     limit=args.max_batch_limit, tolerance=args.max_batch_tolerance, vgg_layers=args.vgg_layers)
    return {"plain": plain["batch"], "checkpointing": ckpt["batch"], "limit": args.max_batch_limit,
            "tries": {"plain": plain["tries"], "checkpointing": ckpt["tries"]}, "tolerance": plain["tolerance"]}


def print_table(rows: list, device: str, width: float, peak: dict) -> None:
    def tf(v):
        return f"{v:.3g}" if v else "-"

    peak_text = "; ".join(f"{dt} peak {tf(p['spec_tflops'])} spec / {tf(p['measured_tflops'])} measured TFLOP/s"
                          + (f" (fp32 math: {p['math']})" if dt == "fp32" else "") for dt, p in peak.items())
    print(f"\nTraining step on {device}, model.width={width:g}"
          f"{' (reduced for the CPU)' if width != 1.0 else ''}; VGG-16 random weights (cost does not depend on them); "
          f"FLOPs: convs only, trained nets x{TRAINED}, frozen with input gradient x{INPUT_GRAD}, no grad x{NO_GRAD}; "
          + peak_text)
    print(f"{'R':>5} {'B':>3} {'mode':>9} {'prec':>4} {'ms/step':>9} {'img/s':>8} {'speed-up':>8} {'peak MiB':>9} "
          f"{'GFLOP/step':>10} {'TFLOP/s':>8} {'MFU spec':>8} {'MFU meas':>8}")
    pct = lambda v: f"{100 * v:.1f}%" if v else "-"  # noqa: E731
    for r in rows:
        for mode, m in r["modes"].items():
            naive_ms = r["modes"].get("naive", {}).get("ms")
            sp = f"{naive_ms / m['ms']:.2f}x" if mode != "naive" and naive_ms else ""
            mem = f"{m['peak_mib']:.0f}" if m["peak_mib"] is not None else "-"
            print(f"{r['resolution']:>5} {r['batch']:>3} {mode:>9} {m['precision']:>4} {m['ms']:>9.1f} "
                  f"{m['images_per_s']:>8.2f} {sp:>8} {mem:>9} {r['flops']['total'] / 1e9:>10.1f} {m['tflops']:>8.3f} "
                  f"{pct(m['mfu_spec']):>8} {pct(m['mfu_measured']):>8}")
        if "fast_fp32" in r and isinstance(r["fast_fp32"], str):
            print(f"      fast_fp32 {r['fast_fp32']}")
        if "speedup_precision" in r:
            print(f"      speed-up over naive {r['speedup']:.2f}x = fast path at fp32 {r['speedup_kernels']:.2f}x "
                  f"x autocast {r['speedup_precision']:.2f}x")
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
    p.add_argument("--mode", nargs="+", choices=(*MODES, "both"), default=["both"],
                   help="modes to time, in order; both: naive, fast_fp32 and fast on a GPU; naive and fast on the "
                        "CPU (fast is fp32 there)")
    p.add_argument("--amp", choices=("bf16", "fp16"), default="bf16", help="the fast mode's autocast dtype (GPU)")
    p.add_argument("--width", type=float, default=None, help="model.width (default 1.0 on GPU, 0.125 on the CPU)")
    p.add_argument("--compile", choices=("off", "blocks", "full"), default="off",
                   help="also time fast_compiled: the fast path with this train.compile (compiled vs eager)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of fast_compiled with --compile blocks (default inductor; aot_eager "
                        "for a dry run on a CPU, where inductor takes minutes per graph)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (fast mode)")
    p.add_argument("--disc", action="store_true", help="local discriminators at every resolution benchmarked")
    p.add_argument("--vgg-layers", nargs="+", default=None, help="VGG taps of the losses (default: all five)")
    p.add_argument("--max-batch", type=int, nargs="*", default=None, metavar="R",
                   help="largest batch, +/- checkpointing, at these resolutions (none named: every resolution)")
    p.add_argument("--grad-check", action="store_true",
                   help="the fast row checks its losses and the global loss's gradient (see the module docstring)")
    p.add_argument("--max-batch-tolerance", type=float, default=1 / 16,
                   help="the search stops when the largest fitting batch is known within this fraction (fewer tries)")
    p.add_argument("--max-batch-limit", type=int, default=None,
                   help="largest batch tried (default 4096 on GPU, 2 on the CPU: there it only runs the search)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/train-<device>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.batch = args.batch or (8 if cuda else 2)
    args.steps = args.steps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else ((10 if args.compile != "off" else 5) if cuda else 1)
    args.width = args.width or (1.0 if cuda else 0.125)
    args.max_batch_limit = args.max_batch_limit or (4096 if cuda else 2)
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    # datasheet and measured (matmul, now) peaks in the dtypes the modes run in
    peak = peaks(device, sorted({mode_precision(m, device, args.amp) for m in modes_to_run(args.mode, device)}))
    dev = device_name()
    out = Path(args.out) if args.out else RESULTS / f"train-{dev}.json"
    rows: list = []

    def save(complete: bool) -> None:
        # rewritten after every part: a run stopped by a time limit keeps what it measured
        write_json(out, {**environment(device), "args": vars(args), "peaks": peak,
                         "matmul_bf16_tflops": peak.get("bf16", {}).get("measured_tflops"),
                         "notes": f"VGG-16 random weights; FLOPs = convs only (model FLOPs: checkpointing's "
                                  f"recomputation not counted), trained networks (generator, D step) forward "
                                  f"x{TRAINED}, frozen networks the gradient flows through (VGG on the fake, D in "
                                  f"G's adversarial term) x{INPUT_GRAD}, no-grad passes (VGG on the real) "
                                  f"x{NO_GRAD}; MFU per mode against the peaks of its precision: mfu_spec "
                                  f"(datasheet, GPU only), mfu_measured (matmul in this run)",
                         "complete": complete, "results": rows})

    searched = set(args.resolution if args.max_batch == [] else (args.max_batch or []))
    for R in args.resolution:  # in the order given: each row, then its max-batch search, saved as it comes
        rows.append(bench_resolution(args, R, device, peak))
        last = len(rows) == len(args.resolution)
        save(complete=last and R not in searched)
        if R in searched:
            rows[-1]["max_batch"] = max_batch_row(args, rows[-1], device)
            save(complete=last)
    print_table(rows, dev, args.width, peak)
    print(f"JSON: {out}")
    failed = [r["resolution"] for r in rows if not r.get("grad_check", {"ok": True})["ok"]]
    if failed:
        print(f"grad check FAILED at {failed} px (losses not finite, or the global loss's gradient lost): see the JSON")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
