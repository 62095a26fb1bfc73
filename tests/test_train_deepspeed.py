"""Two CPU ranks under the ``deepspeed`` launcher (gloo), ZeRO-2: a stage growth with DeepSpeed
re-initialised, a discriminator engine at 128 px, a checkpoint written by every rank inside the input
fade (model.input_fade) and a resume from it.

The launched script is tests/ds_smoke.py; it writes a JSON this test checks.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_zero2_growth_checkpoint_resume(tmp_path):
    from test_train import make_dataset

    launcher = Path(sys.executable).with_name("deepspeed")
    if not launcher.exists():
        launcher = shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not installed in this environment"
    data = make_dataset(tmp_path / "data")
    out, result = tmp_path / "run", tmp_path / "result.json"
    env = dict(os.environ, HPTRANSFER_NO_BAR="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), str(ROOT / "tests" / "ds_smoke.py"),
           "--data", str(data), "--out", str(out), "--ds-config", str(ROOT / "configs" / "ds" / "zero2_bf16.json"),
           "--result", str(result)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and result.is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads(result.read_text())
    assert r["world_size"] == 2
    assert r["first_stopped"] and r["first_step"] == 3 and r["latest_after_first"] == "step_00000003"
    assert r["second_step"] == 4 and not r["second_stopped"]
    assert r["params_equal_across_ranks"]  # ZeRO-2 kept the replicas in lockstep
    assert r["resolution_keys"] == ["128", "64"]  # grown once
    assert r["from_rgb_keys"] == [f"from_rgb.{r}.conv.{p}" for r in (128, 64) for p in ("bias", "weight")]  # fading
    files = r["final_files"]
    assert "meta.json" in files and "rng_rank0.pt" in files and "rng_rank1.pt" in files
    for engine in ("generator", "discriminator"):  # DeepSpeed's own format, one optimiser shard per rank
        shards = [f for f in files if f.startswith(engine + "/") and "optim_states" in f]
        assert len(shards) == 2, files
    assert (Path(r["export"]) / "model.safetensors").is_file()
    assert "torch_autocast" in proc.stdout + proc.stderr  # bf16 run as autocast on the CPU, and said so
