"""Two "nodes" x one rank on this machine, through the training CLI (``python -m hptransfer.train``
per rank, the environment a multi-node launcher gives: distinct RANK and NODE_RANK, LOCAL_RANK 0 on
both, WORLD_SIZE 2, LOCAL_SIZE 1, and a node-local TMPDIR / Triton cache per node). Code that takes
the local rank for the global one writes rank 0's files twice and never rank 1's, or has both
"nodes" rename the same checkpoint; here that fails.

One short ZeRO-2 run (64 px, 2 steps) checks: a run stopped after step 1 writes one checkpoint
with both ranks' RNG states and optimiser shards; a rerun into that out_dir without --resume stops
on both nodes with one clear line (nothing overwritten, nobody hangs); with ``latest`` made to
dangle, ``--resume auto`` (decided on rank 0, broadcast) falls back to the newest complete
checkpoint with a warning and finishes the run.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hptransfer import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, cfg: Path, out: Path, *extra: str) -> list:
    """Start both "nodes" and wait; [(returncode, stdout, stderr)] per node."""
    port = _free_port()
    procs = []
    for node in range(2):
        local = tmp / f"node{node}"  # this node's local disk
        (local / "tmp").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, RANK=str(node), NODE_RANK=str(node), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_SIZE="1",
                   LOCAL_WORLD_SIZE="1", CROSS_RANK=str(node), CROSS_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), TMPDIR=str(local / "tmp"), TRITON_CACHE_DIR=str(local / "triton"),
                   HPTRANSFER_NO_BAR="1", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "hptransfer.train", "--config", str(cfg), "--out", str(out),
               "--deepspeed_config", str(ROOT / "configs" / "ds" / "zero2_bf16.json"), *extra]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    try:
        for p in procs:
            out_, err = p.communicate(timeout=600)
            results.append((p.returncode, out_, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_one_rank_each(tmp_path):
    from test_train import make_dataset

    data = make_dataset(tmp_path / "data")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps({
        "model": {"width": 0.03125}, "loss": {"vgg_weights": "random", "layers": ["relu1_2"]},
        "data": {"root": str(data), "workers": 0, "flip": False},
        "train": {"impl": "reference", "tensorboard": False, "sample_every": 0, "log_every": 1},
        "stages": [{"resolution": 64, "iterations": 2, "batch_size": 2}]}))
    out = tmp_path / "shared" / "run"  # the shared file system both nodes see

    first = _launch(tmp_path, cfg, out, "--stop_at_step", "1")
    assert all(rc == 0 for rc, _, _ in first), [e[-3000:] for _, _, e in first]
    root = out / "checkpoints"
    step1 = root / "step_00000001"
    assert ckpt.read_latest(root) == step1
    files = sorted(str(f.relative_to(step1)) for f in step1.rglob("*") if f.is_file())
    assert "rng_rank0.pt" in files and "rng_rank1.pt" in files, files  # one per GLOBAL rank
    assert len([f for f in files if f.startswith("generator/") and "optim_states" in f]) == 2, files
    meta = ckpt.read_meta(step1)
    assert meta["world_size"] == 2 and meta["backend"] == "deepspeed" and meta["zero_stage"] == 2
    assert (out / "train.log").read_text().count("backend: DeepSpeed, 2 ranks") == 1  # rank 0 logs, not each node

    again = _launch(tmp_path, cfg, out)  # no --resume: refused on both nodes, nothing overwritten
    for rc, _, err in again:
        assert rc == 2, err[-3000:]
        assert "already holds checkpoints" in err and "--resume" in err and "--overwrite" in err, err[-3000:]
        assert "Traceback" not in err
    assert [p.name for p in ckpt.complete(root)] == ["step_00000001"]

    (root / ckpt.LATEST).write_text("step_00000099\n")  # dangling: names a checkpoint that is not there
    resumed = _launch(tmp_path, cfg, out, "--resume", "auto")
    assert all(rc == 0 for rc, _, _ in resumed), [e[-3000:] for _, _, e in resumed]
    assert "using the newest complete checkpoint, step_00000001" in resumed[0][2]
    log = (out / "train.log").read_text()
    assert "resuming from" in log and "step_00000001" in log  # train.log says where it resumed
    assert ckpt.read_latest(root).name == "step_00000002"
    assert ckpt.read_meta(root / "step_00000002")["state"]["global_step"] == 2
