"""Local discriminator sizing: grouped (one discriminator per descriptor, the paper) vs shared (one for
all descriptors), first-layer width ``model.disc_channels`` 16 / 32 / 64, at one resolution.

    python bench/bench_discriminator.py                      # 1024 px: 44 descriptors, 128-px crops
    python bench/bench_discriminator.py --resolution 256 --batch 2 --repeat 3

Per variant: parameters; what they cost a data-parallel step whatever the device (fp32 gradient
all-reduce bytes, Adam state bytes); conv GFLOP of one D step (real and fake pairs in one call,
forward + input and weight gradients: x3); the tensors autograd saves for the backward (MiB: the
activations and the weights the convolutions keep); the measured time of one D step (forward + backward of the discriminator loss,
median of --repeat, after one warm-up). JSON: bench/results/discriminator-<device>.json with
bench.common.environment(). The generator at the same resolution is printed for scale.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import device_name, environment, median_ms, result_path, table, write_json  # noqa: E402

VARIANTS = [(shared, channels) for shared in (False, True) for channels in (16, 32, 64)]


def saved_mib(fn) -> float:
    """MiB of the tensors autograd saves while ``fn()`` builds its graph (each storage counted once)."""
    seen: dict = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def measure(shared: bool, channels: int, R: int, batch: int, device: torch.device, repeat: int) -> dict:
    from hptransfer import losses, pose
    from hptransfer.config import ModelConfig
    from hptransfer.models import LocalDiscriminator
    from hptransfer.models.summary import module_conv_flops

    n, crop = pose.descriptor_count(R), pose.crop_size(R)
    torch.manual_seed(0)
    d = LocalDiscriminator(ModelConfig(disc_shared=shared, disc_channels=channels), n, crop).to(device)
    params = sum(p.numel() for p in d.parameters())
    real = torch.rand(batch, n, 6, crop, crop, device=device) * 2 - 1
    fake = torch.rand(batch, n, 6, crop, crop, device=device) * 2 - 1
    valid = torch.ones(batch, n, dtype=torch.bool, device=device)

    def step():
        losses.discriminator_loss(d, real, fake, valid).backward()
        d.zero_grad(set_to_none=True)

    flops = 3 * module_conv_flops(d, torch.cat([real, fake]))
    return {"shared": shared, "disc_channels": channels, "descriptors": n, "crop": crop, "params": params,
            "adam_state_mib": 8 * params / 2**20, "grad_allreduce_mib": 4 * params / 2**20,
            "step_gflop": flops / 1e9,
            "saved_mib": saved_mib(lambda: losses.discriminator_loss(d, real, fake, valid)),
            "step_ms": median_ms(step, device, warmup=1, repeat=repeat)}


def main(argv=None) -> int:
    from hptransfer.config import ModelConfig
    from hptransfer.models import Generator

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=None, help="pairs per step, real and fake each (default 2 GPU, 1 CPU)")
    p.add_argument("--repeat", type=int, default=None, help="timed steps (default 20 GPU, 3 CPU)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    batch, repeat = args.batch or (2 if cuda else 1), args.repeat or (20 if cuda else 3)
    rows = []
    for shared, channels in VARIANTS:
        row = measure(shared, channels, args.resolution, batch, device, repeat)
        rows.append(row)
        print(f"{'shared' if shared else 'grouped'} {channels}: {row['params']:,} params, {row['step_ms']:.0f} ms",
              flush=True)
    with torch.device("meta"):
        g_params = sum(p.numel() for p in Generator(ModelConfig(), args.resolution).parameters())
    shown = [{"D": ("shared" if r["shared"] else "grouped") + f" {r['disc_channels']}",
              "params (M)": f"{r['params'] / 1e6:.1f}", "x generator": f"{r['params'] / g_params:.2f}",
              "Adam state (MiB)": f"{r['adam_state_mib']:.0f}", "grad all-reduce (MiB)": f"{r['grad_allreduce_mib']:.0f}",
              "step GFLOP": f"{r['step_gflop']:.1f}", "saved (MiB)": f"{r['saved_mib']:.0f}",
              "step ms": f"{r['step_ms']:.1f}"} for r in rows]
    print(f"\n{args.resolution} px, {rows[0]['descriptors']} descriptors, {rows[0]['crop']}-px crops, batch {batch} "
          f"(real + fake pairs), {device_name(device)}; generator {g_params / 1e6:.1f} M params")
    print(table(shown, list(shown[0])))
    out = Path(args.out) if args.out else result_path("discriminator")
    write_json(out, {"environment": environment(device), "resolution": args.resolution, "batch": batch,
                     "generator_params": g_params, "rows": rows})
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
