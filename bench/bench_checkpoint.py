"""What a training checkpoint costs at the top stage with the shipped configs, and how fast this disk
writes one.

    python bench/bench_checkpoint.py                                   # configs/h36m_1024.yaml, 1 and 8 ranks
    python bench/bench_checkpoint.py --ranks 1,8,64 --no-write         # the table only

1. Bytes, computed from the parameter counts of the config's last stage (generator, and the local
   discriminators where they train there), for every configs/ds/*.json and number of ranks: per
   engine the model-states file (ZeRO-1/2: rank 0 writes the module's fp32 weights and buffers; ZeRO-3:
   every rank writes the buffers) and each rank's optimiser shard (its partition of the fp32 master
   weights, Adam's exp_avg and exp_avg_sq: 12 bytes per parameter over the ranks). Under torch
   autocast (every shipped config) all of them are fp32. Small per-file overheads (pickled metadata) are
   left out: tests/test_reshard.py's tiny checkpoints show their size.
2. Measured (unless --no-write): one single-process checkpoint of that stage's full-width generator and
   discriminators with Adam state (what ``SingleBackend.save_engines`` writes: model, optimiser and
   GradScaler, fsync'd, then renamed), seconds and bytes, median of --repeat, into --out.

JSON: bench/results/checkpoint-cpu.json with bench.common.environment().
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import environment, result_path, table, write_json  # noqa: E402

FP32 = 4


def stage_models(config: str):
    """(generator, discriminator or None) of the config's last stage, full width, on the CPU."""
    from hptransfer import losses, pose
    from hptransfer.config import load_config
    from hptransfer.models import Generator, LocalDiscriminator

    cfg = load_config(config)
    R = cfg.stages[-1].resolution
    g = Generator(cfg.model, R)
    d = None
    if losses.active_terms(cfg.loss, R)["adv"]:
        d = LocalDiscriminator(cfg.model, losses.descriptors_at(cfg.loss, R), pose.crop_size(R))
    return cfg, g, d


def counts(module) -> tuple:
    """(parameters, buffer bytes) of ``module``."""
    params = sum(p.numel() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return params, buffers


def computed(engines: dict, ranks: list) -> list:
    """Rows: per DeepSpeed config, rank count and engine, the bytes each rank writes."""
    from hptransfer.backend import ENGINE_NAMES, engine_ds_config, load_ds_config

    rows = []
    for path in sorted((REPO / "configs" / "ds").glob("zero*.json")):
        raw = load_ds_config(path)
        for world in ranks:
            for name in ENGINE_NAMES:
                if name not in engines:
                    continue
                params, buffer_bytes = engines[name]
                zero = int(engine_ds_config(raw, name).get("zero_optimization", {}).get("stage", 0))
                model_rank0 = buffer_bytes + (params * FP32 if zero < 3 else 0)
                optim = 3 * FP32 * params / world  # fp32 master partition + exp_avg + exp_avg_sq
                rows.append({"config": path.name, "ranks": world, "engine": name, "zero": zero,
                             "params_M": params / 1e6, "model_states_MB": model_rank0 / 1e6,
                             "optim_per_rank_MB": optim / 1e6, "rank0_MB": (model_rank0 + optim) / 1e6,
                             "all_ranks_GB": (model_rank0 + (buffer_bytes * (world - 1) if zero == 3 else 0)
                                              + optim * world) / 1e9})
    return rows


def measure_write(g, d, out_root: Path, repeat: int) -> dict:
    """Seconds and bytes of the single-process checkpoint of ``g`` and ``d`` with Adam state."""
    from hptransfer.backend import SingleBackend

    backend = SingleBackend("bf16", device="cpu")
    engines = {}
    for name, module in (("generator", g), ("discriminator", d)):
        if module is None:
            continue
        opt = torch.optim.Adam(module.parameters(), lr=2e-4, foreach=True)
        for p in module.parameters():  # Adam's state exists after its first step
            p.grad = torch.zeros_like(p)
        opt.step()
        for p in module.parameters():
            p.grad = None
        engines[name] = backend.engine(name, module, opt, 1)
    seconds, size = [], 0
    for i in range(repeat):
        target = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=out_root))
        try:
            t0 = time.perf_counter()
            backend.save_engines(target, engines)
            seconds.append(time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in target.iterdir())
        finally:
            shutil.rmtree(target, ignore_errors=True)
    return {"seconds": seconds, "median_s": statistics.median(seconds), "bytes": size,
            "MB_per_s": size / 1e6 / statistics.median(seconds), "out": str(out_root)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "h36m_1024.yaml"))
    p.add_argument("--ranks", default="1,8", help="comma list of world sizes for the computed table")
    p.add_argument("--out", default=None, help="directory the measured checkpoint is written into (default: $TMPDIR)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="the computed table only")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg, g, d = stage_models(args.config)
    engines = {"generator": counts(g), **({"discriminator": counts(d)} if d is not None else {})}
    rows = computed(engines, [int(r) for r in args.ranks.split(",")])
    print(f"{args.config}: {cfg.stages[-1].resolution} px, generator {engines['generator'][0]:,} parameters"
          + (f", discriminators {engines['discriminator'][0]:,}" if d is not None else ""))
    print(table(rows, ["config", "ranks", "engine", "zero", "params_M", "model_states_MB", "optim_per_rank_MB",
                       "rank0_MB", "all_ranks_GB"]))
    measured = None
    if not args.no_write:
        out_root = Path(args.out or tempfile.gettempdir())
        out_root.mkdir(parents=True, exist_ok=True)
        measured = measure_write(g, d, out_root, args.repeat)
        print(f"single-process checkpoint (model + Adam + GradScaler, both engines): {measured['bytes'] / 1e9:.2f} GB "
              f"in {measured['median_s']:.1f} s median of {args.repeat} ({measured['MB_per_s']:.0f} MB/s), "
              f"into {out_root}")
    write_json(result_path("checkpoint"), {"config": args.config, "resolution": cfg.stages[-1].resolution,
                                           "parameters": {k: v[0] for k, v in engines.items()},
                                           "computed": rows, "measured_single_process": measured,
                                           "environment": environment("cpu")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
