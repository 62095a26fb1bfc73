"""A DeepSpeed run on another number of ranks, and without ranks (tests/ds_smoke.py, two launches at once).

A 2-rank and a 1-rank launch (CPU, gloo) each write a checkpoint at step 1 under every shipped
configs/ds/*.json, then resume the other launch's checkpoints: 2 -> 1 and 1 -> 2. Right after the load
each engine's consolidated state (fp32 weights, Adam's exp_avg / exp_avg_sq, the optimiser's step, the
loss scale, BatchNorm buffers), gathered from the live engines, must equal what the writer's engines
held when they saved. The 2-rank checkpoints then load with no process group (export, eval, infer,
--init-from) and must equal the engines' gathered weights. Both launches also run the accumulation
scenario: 1 rank x 2 micro-batches, 2 ranks x 1, and here a single process x 2 reach the same weights.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs" / "ds").glob("zero*.json"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Both launches at once (each resumes the other's checkpoints); their JSON reports and the folder."""
    from test_train import make_dataset

    from hptransfer.models import VGG16Features

    tmp = tmp_path_factory.mktemp("reshard")
    data = make_dataset(tmp / "data")
    # one VGG for every rank and run (a "random" VGG is drawn from each rank's own seed)
    torch.manual_seed(0)
    vgg = tmp / "vgg_relu1_2.pth"
    torch.save(VGG16Features(weights="random", layers=("relu1_2",)).state_dict(), vgg)
    launcher = Path(sys.executable).with_name("deepspeed")
    assert launcher.exists(), "the deepspeed launcher is not installed in this environment"
    out = tmp / "out"
    env = dict(os.environ, HPTRANSFER_NO_BAR="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    procs, t0 = {}, time.perf_counter()
    for ranks, peer in ((2, 1), (1, 2)):
        cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(_free_port()),
               str(ROOT / "tests" / "ds_smoke.py"), "--data", str(data), "--out", str(out), "--vgg", str(vgg),
               "--result", str(tmp / f"result{ranks}.json"), "--peer-ranks", str(peer),
               # accum first: DeepSpeed keeps the last torch_autocast dtype in a process-wide variable, and
               # gives a later fp32 ZeRO engine the GradScaler of an earlier fp16 one
               "--scenarios", "accum,reshard_write,reshard_resume"]
        procs[ranks] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
    logs = {}
    try:
        for ranks, p in procs.items():
            logs[ranks] = p.communicate(timeout=1800)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for ranks, p in procs.items():
        assert p.returncode == 0 and (tmp / f"result{ranks}.json").is_file(), logs[ranks][-6000:]
    results = {ranks: json.loads((tmp / f"result{ranks}.json").read_text()) for ranks in procs}
    return {"out": out, "data": data, "vgg": vgg, "results": results, "logs": logs,
            "seconds": time.perf_counter() - t0}


def _assert_equal_state(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), where
    for engine in want:
        g, w = got[engine], want[engine]
        assert g["params"].keys() == w["params"].keys(), (where, engine)
        for name, states in w["params"].items():
            for key, tensor in states.items():  # fp32, exp_avg, exp_avg_sq
                assert torch.equal(g["params"][name][key], tensor), f"{where} {engine} {name} {key} differs"
        assert g["buffers"].keys() == w["buffers"].keys()
        for name, buf in w["buffers"].items():
            assert torch.equal(g["buffers"][name], buf), f"{where} {engine} buffer {name} differs"
        assert g["step"] == w["step"] and len(w["step"]) == 1 and w["step"][0] >= 1, (where, engine, g["step"])
        assert g["scaler"] == w["scaler"], (where, engine)


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_on_another_number_of_ranks(launches):
    out, results = launches["out"], launches["results"]
    for world, peer in ((1, 2), (2, 1)):
        resumed = results[world]["reshard_resume"]
        for name in CONFIGS:
            stem = Path(name).stem
            live = torch.load(out / f"w{peer}" / stem / "live.pt", weights_only=False)
            loaded = torch.load(out / f"r{world}" / stem / "loaded.pt", weights_only=False)
            if "fp16" in name:  # the loss scale is part of what must carry over
                assert live["generator"]["scaler"] is not None and live["generator"]["scaler"]["scale"] > 0
            if "zero1g" in name:  # both engines, each under its own ZeRO stage
                assert sorted(live) == ["discriminator", "generator"]
            _assert_equal_state(loaded, live, f"{peer} -> {world} ranks, {name}")
            r = resumed[name]
            assert r["step"] == 2 and r["finite"] and not r["scratch_left"], (name, r)
            own = [o for o in r["own"] if o is not None]
            assert len(own) == world and all(o["buffers"] == own[0]["buffers"] for o in own)
    assert "resharding step_00000001/generator: universal checkpoint written" in launches["logs"][1]


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_checkpoint_without_ranks(launches, tmp_path):
    """export / eval / infer / --init-from read a DeepSpeed checkpoint on the CPU, no process group."""
    from hptransfer import checkpoint as ckpt
    from hptransfer.cli import main
    from hptransfer.config import load_config
    from hptransfer.export import load_any, load_generator
    from hptransfer.train import _init_from

    out, data = launches["out"], launches["data"]
    for name in CONFIGS:
        run = out / "w2" / Path(name).stem
        step = ckpt.read_latest(run / "checkpoints")
        live = torch.load(run / "live.pt", weights_only=False)["generator"]
        want = {**{k: v["fp32"] for k, v in live["params"].items()}, **live["buffers"]}
        for source in (step, run):  # the checkpoint, or the run directory (its latest)
            got = load_any(source).state_dict()  # weights and persistent buffers (BatchNorm statistics)
            assert set(live["params"]) < set(got) <= set(want) and any("running_var" in k for k in got), name
            assert all(torch.equal(got[k], want[k]) for k in got), f"{name}: loaded weights differ from the engine's"
    run = out / "w2" / "zero3_bf16"
    assert main(["export", "--checkpoint", str(run), "--format", "safetensors", "--out", str(tmp_path / "x")]) == 0
    exported, gathered = load_generator(tmp_path / "x").state_dict(), load_any(run).state_dict()
    assert all(torch.equal(v, gathered[k]) for k, v in exported.items())
    reference = next((data / "images").glob("*.jpg"))
    assert main(["infer", "--checkpoint", str(run), "--reference", str(reference), "--pose",
                 f"{data / 'annotations-test.csv'}:{reference.name}", "--frame", "fit", "--pose-size", "64x64",
                 "--out", str(tmp_path / "o.png")]) == 0 and (tmp_path / "o.png").is_file()
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--metrics", "ssim", "--limit", "2",
                 "--out", str(tmp_path / "m.json")]) == 0 and (tmp_path / "m.json").is_file()
    cfg = load_config(None, ["model.width=0.03125", "stages=[{resolution: 64, iterations: 1, batch_size: 1}]"])
    grown = _init_from(cfg, str(ckpt.read_latest(run / "checkpoints")))
    assert all(torch.equal(grown.state_dict()[k], v) for k, v in load_any(run).state_dict().items())


@pytest.mark.slow
@pytest.mark.distributed
def test_accumulation_equals_more_ranks(launches, tmp_path):
    """One optimiser step over a global batch of 4: 1 rank x 2 micro-batches (DeepSpeed, and a single
    process) = 2 ranks x 1, with per-rank BatchNorm statistics (train.sync_batchnorm=false: each
    micro-batch normalised alone in every split); step 1 has a NaN micro-batch and is dropped whole."""
    from ds_smoke import ACCUM_OVERRIDES, BASE

    from hptransfer.config import load_config
    from hptransfer.train import train

    out, results = launches["out"], launches["results"]
    nan_at = []

    def nan_hook(terms, info):
        if info["global_step"] == 1 and info["micro_step"] == 0:
            nan_at.append(info["micro_step"])
            return dict(terms, total=terms["total"] * float("nan"))
        return terms

    final = {}

    def capture(info):
        final.update({n: {k: v.detach().clone() for k, v in info[f"{n}_engine"].module.state_dict().items()}
                      for n in ("generator", "discriminator")})

    cfg = load_config(None, [*BASE, f"data.root={launches['data']}", f"train.out_dir={tmp_path / 'single'}",
                             "stages=[{resolution: 64, iterations: 3, batch_size: 2}]", *ACCUM_OVERRIDES,
                             f"loss.vgg_weights={launches['vgg']}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launches (OMP_NUM_THREADS=1): the CPU kernels' summation order
    try:
        single = train(cfg, callback=capture, loss_hook=nan_hook)
    finally:
        torch.set_num_threads(threads)
    assert single["skipped"] == 1 and nan_at == [0]
    runs = {"ds_1x2": torch.load(out / "accum_w1.pt", weights_only=False),
            "ds_2x1": torch.load(out / "accum_w2.pt", weights_only=False), "single_1x2": final}
    assert runs["ds_1x2"]["accumulation"] == [2, 2] and runs["ds_2x1"]["accumulation"] == [1, 1]
    for world in (1, 2):
        r = results[world]["accum"]
        assert r["step"] == 3 and r["skipped"] == 1 and r["d_skipped"] == 0, r
        # the schedule, checkpoints and the data position count optimiser steps, not micro-batches
        assert r["meta_state"]["global_step"] == 3 and r["meta_state"]["consumed"] == 3
        assert r["meta_state"]["global_batch"] == 4
    # Observed: equal to the last bit (halving is exact in binary floating point, so g0/2 + g1/2 is
    # (g0 + g1)/2). 1e-6 leaves room for other reduction orders; a CPU thread count other than the
    # launches' changes the convolutions' sums, which Adam's first steps amplify to ~1e-5.
    # The BatchNorm running statistics are left out: per rank (2 x 1) they see one micro-batch each.
    for engine in ("generator", "discriminator"):
        params = [k for k in final[engine] if "running_" not in k and "num_batches" not in k]
        for a, b in (("ds_1x2", "ds_2x1"), ("single_1x2", "ds_2x1"), ("single_1x2", "ds_1x2")):
            diff = max((runs[a][engine][k] - runs[b][engine][k]).abs().max().item() for k in params)
            assert diff <= 1e-6, f"{engine}: {a} vs {b} differ by {diff}"
    for k, v in runs["ds_1x2"]["generator"].items():  # one rank, both micro-batches: the same running statistics
        torch.testing.assert_close(runs["single_1x2"]["generator"][k], v, rtol=0, atol=1e-6, msg=k)
