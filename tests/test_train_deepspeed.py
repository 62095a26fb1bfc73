"""Two CPU ranks under the ``deepspeed`` launcher (gloo), the engine a GPU user gets: bf16/fp16 as
torch autocast (fp32 weights and BatchNorm buffers), BatchNorm synchronised across ranks, in one
launch (tests/ds_smoke.py, which writes a JSON this test checks):

- ZeRO-2: a stage growth with DeepSpeed re-initialised, a discriminator engine at 128 px, a
  checkpoint written by every rank inside the input fade and a resume from it that ends bit-exact
  where the uninterrupted run ends;
- ZeRO-1 and ZeRO-3 runs;
- ZeRO-2 fp16 with DeepSpeed's loss scaling, stopped and resumed (the loss scale in the checkpoint),
  bit-exact against its uninterrupted run.

Each rank hashes its OWN training module (ZeRO-1/2 parameters, every stage's buffers), so "equal
across ranks" can fail; the export must equal the final fp32 state, BatchNorm statistics included.
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


def _assert_ranks_agree(own: list, params: bool = True, every_step_trains: bool = True) -> None:
    assert len(own) == 2 and all(o is not None for o in own)
    if params:
        assert own[0]["params"] == own[1]["params"], "parameters differ across ranks"
    assert own[0]["buffers"] == own[1]["buffers"], "BatchNorm buffers differ across ranks"
    for o in own:
        assert o["param_dtypes"] == ["torch.float32"], o  # fp32 weights under bf16/fp16 autocast
        assert o["bn_buffer_dtypes"] == ["torch.float32"], o  # BatchNorm running statistics stay fp32
        assert o["bn_class"] == ["AllReduceBatchNorm"], o  # synchronised, the same class on GPUs
    hashes = own[0]["step_hashes"]
    if every_step_trains:
        assert len(set(hashes)) == len(hashes), "a step left the weights unchanged"
    else:  # fp16: DeepSpeed drops a step whose gradients overflow at the current loss scale
        assert len(set(hashes)) > 1, "no fp16 step reached the weights"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_zero123_fp16_growth_checkpoint_resume(tmp_path):
    from test_train import make_dataset

    launcher = Path(sys.executable).with_name("deepspeed")
    if not launcher.exists():
        launcher = shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not installed in this environment"
    data = make_dataset(tmp_path / "data")
    out, result = tmp_path / "run", tmp_path / "result.json"
    env = dict(os.environ, HPTRANSFER_NO_BAR="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), str(ROOT / "tests" / "ds_smoke.py"),
           "--data", str(data), "--out", str(out), "--result", str(result), "--scenarios", "zero1,zero3,fp16,growth"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0 and result.is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    _check(json.loads(result.read_text()), proc.stdout + proc.stderr)


def _check(r: dict, output: str) -> None:
    assert r["world_size"] == 2

    for name in ("zero1", "zero3"):
        z = r[name]
        assert z["step"] == 2 and z["skipped"] == 0 and z["finite"], z
        _assert_ranks_agree(z["own"], params=name != "zero3")  # ZeRO-3: each rank holds its own shard
        assert z["export_vs_state"] == 0.0  # the export is the gathered fp32 master weights and buffers
    # zero1g_zero2d: each engine gets its own ZeRO stage from the config's hptransfer_engines overlay
    assert [o["zero_stages"] for o in r["zero1"]["own"]] == [[1, 2], [1, 2]]
    assert [o["zero_stages"] for o in r["zero3"]["own"]] == [[3, None], [3, None]]

    f = r["fp16"]
    assert f["step"] == 3 and f["finite"]
    _assert_ranks_agree(f["own"], every_step_trains=False)
    assert 0 < f["saved_scale"] <= 2.0**16  # DeepSpeed's GradScaler state, saved with the checkpoint
    assert f["resume_vs_full"] == 0.0 and f["export_vs_state"] == 0.0

    g = r["growth"]
    assert g["first_stopped"] and g["first_step"] == 3 and g["latest_after_first"] == "step_00000003"
    assert g["second_step"] == 4 and not g["second_stopped"]
    # Same seeds, data positions, optimiser and RNG states, and a deterministic gloo all-reduce of
    # two ranks: resuming is bit-exact.
    assert g["resume_vs_full"] == 0.0
    assert g["export_vs_state"] == 0.0
    _assert_ranks_agree(g["own"])
    _assert_ranks_agree(g["own_full"])
    assert g["resolution_keys"] == ["128", "64"]  # grown once
    assert g["from_rgb_keys"] == [f"from_rgb.{r}.conv.{p}" for r in (128, 64) for p in ("bias", "weight")]  # fading
    assert g["to_rgb_keys"] == [f"to_rgb.{r}.conv.{p}" for r in (128, 64) for p in ("bias", "weight")]  # output fade
    files = g["final_files"]
    assert "meta.json" in files and "rng_rank0.pt" in files and "rng_rank1.pt" in files
    for engine in ("generator", "discriminator"):  # DeepSpeed's own format, one optimiser shard per rank
        shards = [f for f in files if f.startswith(engine + "/") and "optim_states" in f]
        assert len(shards) == 2, files
    assert (Path(g["export"]) / "model.safetensors").is_file()
    assert "ZeRO-2 generator, ZeRO-2 discriminator, bf16 autocast" in output  # the backend line says what ran
