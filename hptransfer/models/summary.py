"""``hptransfer model-summary``: the generator's stages as a table, then one timed forward.

Per stage 64..R: resolution, channels of that stage's outer block (``channels_at(R)``), parameters
the stage adds, total parameters, and GFLOP of one image's forward. FLOPs are counted analytically
per convolution as 2 * (Cin / groups) * Cout * k * k * Hout * Wout (one multiply-add = 2 FLOPs);
norms, activations, pooling, upsampling and the heatmaps are left out (well under 1 %). Shapes come
from a forward on the ``meta`` device, so the table costs no compute even at 1024 px.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn as nn

from hptransfer.config import ModelConfig, channels_at
from hptransfer.models.generator import Generator

log = logging.getLogger(__name__)


def module_conv_flops(module: nn.Module, *inputs) -> int:
    """FLOPs of every Conv2d of ``module`` in one forward of ``inputs`` (whole batch): per conv
    2 * (Cin / groups) * Cout * kh * kw * Hout * Wout per image. Pass ``meta`` tensors: shapes only."""
    total = 0

    def hook(m: nn.Conv2d, inputs, output):
        nonlocal total
        kh, kw = m.kernel_size
        per_image = 2 * (m.in_channels // m.groups) * m.out_channels * kh * kw * output.shape[-2] * output.shape[-1]
        total += per_image * output.shape[0]

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total


def conv_flops(model: nn.Module, resolution: int) -> int:
    """FLOPs of all Conv2d layers of the generator ``model`` in one forward of one (3, R, R) image (meta device)."""
    x = torch.zeros(1, 3, resolution, resolution, device="meta")
    kp = torch.full((1, 18, 2), resolution / 2, device="meta")
    return module_conv_flops(model, x, kp)


def stage_table(model_cfg: ModelConfig, resolution: int) -> list[dict]:
    """One row per stage 64..``resolution``: resolution, channels, new_params, params, gflop."""
    rows = []
    with torch.device("meta"):
        g = Generator(model_cfg, 2 * model_cfg.bottleneck_size)
    g.impl = "reference"
    g.eval()
    prev_grown = 0
    while True:
        grown = sum(p.numel() for n, p in g.named_parameters() if not n.startswith(("from_rgb", "to_rgb")))
        total = sum(p.numel() for p in g.parameters())
        rows.append({"resolution": g.resolution, "channels": channels_at(g.resolution, model_cfg),
                     # blocks of this stage plus its from/to-RGB (the previous RGB layers are dropped)
                     "new_params": grown - prev_grown + (total - grown),
                     "params": total, "gflop": conv_flops(g, g.resolution) / 1e9})
        prev_grown = grown
        if g.resolution >= resolution:
            return rows
        g.grow()


def discriminator_params(resolution: int, channels=(16, 32, 64)) -> dict:
    """{disc_channels: {"grouped": params, "shared": params}} of the local discriminators at ``resolution``."""
    from hptransfer import pose
    from hptransfer.models.discriminator import LocalDiscriminator

    n, crop = pose.descriptor_count(resolution), pose.crop_size(resolution)
    with torch.device("meta"):
        return {c: {kind: sum(p.numel() for p in LocalDiscriminator(
            ModelConfig(disc_channels=c, disc_shared=kind == "shared"), n, crop).parameters())
            for kind in ("grouped", "shared")} for c in channels}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolution", type=int, default=1024, help="last stage to list and time (64..1024)")
    parser.add_argument("--width", type=float, default=1.0, help="model.width (1.0 = the paper)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the timed forward")
    parser.add_argument("--device", default="cpu", help="device of the timed forward (cpu, cuda, cuda:1)")
    parser.add_argument("--no-forward", action="store_true", help="print the table only")


def run(args: argparse.Namespace) -> int:
    from hptransfer.config import RESOLUTIONS
    from hptransfer.errors import InputError

    if args.resolution not in RESOLUTIONS or args.width <= 0 or args.batch < 1:
        raise InputError(f"--resolution must be one of {RESOLUTIONS}, --width > 0 and --batch >= 1; got "
                         f"{args.resolution}, {args.width}, {args.batch}")
    cfg = ModelConfig(width=args.width)
    rows = stage_table(cfg, args.resolution)
    print(f"Generator, model.width={args.width:g}. GFLOP: conv layers only, 2*Cin*Cout*k*k*Hout*Wout per conv, "
          "one image forward. new params: the stage's encoder/decoder blocks and its from/to-RGB "
          "(total drops the previous stage's from/to-RGB).")
    print(f"{'resolution':>10} {'channels':>9} {'new params':>14} {'total params':>14} {'GFLOP/img':>11}")
    for r in rows:
        print(f"{r['resolution']:>10} {r['channels']:>9} {r['new_params']:>14,} {r['params']:>14,} {r['gflop']:>11.2f}")
    print(f"\nLocal discriminators at {args.resolution} px (model.disc_channels x model.disc_shared), parameters; "
          "bench/bench_discriminator.py times them:")
    print(f"{'disc_channels':>13} {'grouped':>14} {'shared':>12}")
    for channels, counts in discriminator_params(args.resolution).items():
        print(f"{channels:>13} {counts['grouped']:>14,} {counts['shared']:>12,}")
    if args.no_forward:
        return 0
    device = torch.device(args.device)
    g = Generator(cfg, args.resolution).to(device).eval()
    R = args.resolution
    x = torch.rand(args.batch, 3, R, R, device=device) * 2 - 1
    kp = torch.rand(args.batch, 18, 2, device=device) * (R - 1)
    with torch.inference_mode():
        if device.type == "cuda":  # first CUDA call pays for cuDNN set-up; time the second
            g(x, kp)
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        y = g(x, kp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
    print(f"forward at {R}x{R}, batch {args.batch}, {device}: {dt:.3f} s "
          f"({rows[-1]['gflop'] * args.batch / dt:.1f} GFLOP/s); output {tuple(y.shape)}")
    return 0
