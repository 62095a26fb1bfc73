"""Launched by tests/test_train_deepspeed.py as ``deepspeed --num_gpus 2 tests/ds_smoke.py ...``.

Two ranks train 64 -> 128 px (one growth, DeepSpeed re-initialised, discriminator engine at 128),
stop after global step 3 (a checkpoint written by every rank), then a second ``train`` call resumes
from ``latest`` and finishes. Rank 0 writes a JSON the test checks: steps, resume point, whether the
generator parameters are identical on both ranks, the files in the final checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hptransfer.config import load_config
from hptransfer.train import train


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ds-config", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--local_rank", type=int, default=None)  # passed by the launcher
    args = p.parse_args()
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(name)s: %(message)s")
    os.environ["HPTRANSFER_NO_BAR"] = "1"
    cfg = load_config(None, [
        "model.width=0.03125", "model.disc_channels=4", "model.input_fade=0.5", "loss.vgg_weights=random",
        "loss.layers=[relu1_2,relu2_2]", "loss.disc_at_resolution=128", "train.kernels=reference",
        "train.tensorboard=false", "train.sample_every=0", "train.checkpoint_every=2", "train.log_every=1", "data.workers=0", "data.flip=false",
        f"data.root={args.data}", f"train.out_dir={args.out}",
        "stages=[{resolution: 64, iterations: 2, batch_size: 2}, {resolution: 128, iterations: 2, batch_size: 2}]"])
    first = train(cfg, ds_config=args.ds_config, stop_at_step=3)
    latest = (Path(args.out) / "checkpoints" / "latest").read_text().strip()
    second = train(cfg, ds_config=args.ds_config, resume="auto")

    # Parameters (not BatchNorm running stats: no SyncBatchNorm on CPU) must agree across ranks.
    params = {k: v for k, v in second["generator_state"].items() if "running_" not in k and "num_batches" not in k}
    flat = torch.cat([v.flatten().double() for v in params.values()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    if rank == 0:
        final = Path(args.out) / "checkpoints" / (Path(args.out) / "checkpoints" / "latest").read_text().strip()
        Path(args.result).write_text(json.dumps({
            "world_size": dist.get_world_size(), "first_stopped": first["stopped"], "first_step": first["global_step"],
            "latest_after_first": latest, "second_step": second["global_step"], "second_stopped": second["stopped"],
            "params_equal_across_ranks": same, "resolution_keys": sorted({k.split(".")[1] for k in params
                                                                         if k.startswith("encoder.")}),
            "from_rgb_keys": sorted(k for k in params if k.startswith("from_rgb.")),
            "final_files": sorted(str(f.relative_to(final)) for f in final.rglob("*") if f.is_file()),
            "export": str(second["export"])}))
    dist.barrier()
    dist.destroy_process_group()  # a clean shutdown: gloo's threads must not outlive the interpreter
    return 0


if __name__ == "__main__":
    sys.exit(main())
