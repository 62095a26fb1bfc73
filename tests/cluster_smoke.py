"""Launched by tests/test_cluster.py, one process per rank, as a cluster launcher starts them.

``scenarios``: several short trainings in one launch (in-process ``train()`` calls: the world is formed
by the first, from whatever the launcher set, e.g. srun's SLURM_* variables alone):

  full     4 steps, uninterrupted; every rank records its own loss terms per step (the callback), so
           the test can check that stats.jsonl holds their mean; the process group's timeout
           (train.dist_timeout_s) and the log's head are reported too.
  signal   the same run, with SIGTERM sent to rank 1 only after its step 1: every rank must stop after
           step 2 with one checkpoint, then ``--resume auto`` finishes it; the final weights must equal
           the uninterrupted run's.

``hang``: rank ``--rank`` sleeps before its first collective of ``hptransfer.train.main`` (the resume
decision's broadcast), so that the other rank's collective times out (train.dist_timeout_s).

Rank 0 writes ``--result`` (JSON).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

BASE = ["model.width=0.03125", "loss.vgg_weights=random", "loss.layers=[relu1_2]", "train.impl=reference",
        "train.tensorboard=false", "train.sample_every=0", "train.log_every=1", "data.workers=0", "data.flip=false",
        "train.deterministic=true", "train.dist_timeout_s=123",
        "stages=[{resolution: 64, iterations: 4, batch_size: 2}]"]


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode() + state[k].float().numpy().tobytes())
    return h.hexdigest()


def _gathered(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def scenarios(args) -> int:
    from hptransfer import checkpoint as ckpt
    from hptransfer.config import load_config
    from hptransfer.train import train

    def cfg(name: str):
        return load_config(None, [*BASE, f"data.root={args.data}", f"train.out_dir={Path(args.out) / name}"])

    report = {}

    # ---------------------------------------------------------------- full: an uninterrupted run
    terms = []
    full = train(cfg("full"), ds_config=args.ds_config, callback=lambda info: terms.append(info["terms"]))
    rank = dist.get_rank()
    report["env"] = _gathered({k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT", "LOCAL_WORLD_SIZE", "NODE_RANK")})
    report["pg_timeout_s"] = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    report["backend"] = dist.get_backend()
    report["terms"] = _gathered(terms)
    report["full_digest"] = _gathered(_digest(full["generator_state"]))
    report["full_step"] = full["global_step"]

    # ---------------------------------------------------------------- signal: SIGTERM to rank 1 after step 1
    def preempt_rank1(info):
        if rank == 1 and info["global_step"] == 0:  # info's global_step: before the step (0-based)
            os.kill(os.getpid(), signal.SIGTERM)

    out = Path(args.out) / "signal"
    first = train(cfg("signal"), ds_config=args.ds_config, callback=preempt_rank1)
    stopped = ckpt.read_latest(out / "checkpoints")
    report["signal_first"] = _gathered({"preempted": first["preempted"], "step": first["global_step"],
                                        "stopped": first["stopped"]})
    report["signal_checkpoint"] = stopped.name
    report["signal_files"] = sorted(str(f.relative_to(stopped)) for f in stopped.rglob("*") if f.is_file())
    report["signal_meta"] = {k: ckpt.read_meta(stopped)[k] for k in ("state", "preempted")}
    resumed = train(cfg("signal"), ds_config=args.ds_config, resume="auto")
    report["resumed"] = _gathered({"preempted": resumed["preempted"], "step": resumed["global_step"],
                                   "digest": _digest(resumed["generator_state"])})
    if rank == 0:
        Path(args.result).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def hang(args, argv: list) -> int:
    import hptransfer.train as train_module

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if rank == args.rank:
        real = train_module._resume_point

        def late(*a, **kw):
            time.sleep(args.seconds)  # this rank "hangs": the others wait in the broadcast below
            return real(*a, **kw)

        train_module._resume_point = late
    return train_module.main(argv)


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("scenarios")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--result", required=True)
    s.add_argument("--ds_config", required=True)
    h = sub.add_parser("hang")
    h.add_argument("--rank", type=int, default=1)
    h.add_argument("--seconds", type=float, default=10.0)
    args, rest = p.parse_known_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ["HPTRANSFER_NO_BAR"] = "1"
    return scenarios(args) if args.mode == "scenarios" else hang(args, rest)


if __name__ == "__main__":
    sys.exit(main())
