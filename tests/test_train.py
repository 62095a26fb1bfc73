"""The progressive trainer, single process on the CPU: the stage schedule (L2 -> L1, discriminators at
their stage), exact resume, forced non-finite losses, export round trip, checkpoint helpers, the CLI.

One tiny run (64 -> 128 px, 3 + 3 steps, discriminators at 128) is shared by several tests.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hptransfer import checkpoint as ckpt
from hptransfer.config import load_config
from hptransfer.models import Generator
from hptransfer.train import train

ITERS = 3  # per stage: steps 0 (L2), 1, 2 (L1) since L2 holds while step < 1.5


def make_dataset(root: Path) -> Path:
    """A few synthetic identities at 64 px in the benchmark format."""
    from hptransfer.data import synth

    synth.synthesize(root, identities=4, poses=3, size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synth"))


def tiny_cfg(data_root: Path, out: Path, *extra: str):
    return load_config(None, [
        "model.width=0.03125", "model.disc_channels=4", "loss.vgg_weights=random", "loss.layers=[relu1_2,relu2_2]",
        "loss.disc_at_resolution=128", "train.impl=reference", "train.tensorboard=false", "train.deterministic=true",
        "train.sample_every=2", "train.checkpoint_every=100", "train.log_every=1", "data.workers=0",
        f"data.root={data_root}", f"train.out_dir={out}",
        f"stages=[{{resolution: 64, iterations: {ITERS}, batch_size: 2}}, "
        f"{{resolution: 128, iterations: {ITERS}, batch_size: 2}}]", *extra])


@pytest.fixture(scope="module")
def full_run(data_root, tmp_path_factory):
    os.environ["HPTRANSFER_NO_BAR"] = "1"
    out = tmp_path_factory.mktemp("full")
    infos = []

    def record(info):
        infos.append({k: v for k, v in info.items() if not k.startswith(("generator", "discriminator"))})

    result = train(tiny_cfg(data_root, out), callback=record)
    return out, result, infos


def test_schedule_l2_then_l1_and_discriminator_at_its_stage(full_run):
    _, result, infos = full_run
    assert [(i["resolution"], i["step_in_stage"]) for i in infos] == \
        [(64, s) for s in range(ITERS)] + [(128, s) for s in range(ITERS)]
    for i in infos:
        expected = "l2" if 2 * i["step_in_stage"] < ITERS else "l1"
        assert i["criterion"] == expected == i["terms"]["criterion"]
        on = i["resolution"] == 128
        assert i["disc_active"] == on
        assert ("d" in i["terms"]) == on  # a discriminator loss only where the discriminators train
        assert (i["terms"]["adv"] > 0) == on
        assert i["terms"]["global"] > 0
        assert (i["terms"]["local"] > 0) != on  # at the discriminator stage they replace the local loss
    assert result["global_step"] == 2 * ITERS and result["skipped"] == 0


def test_run_writes_config_log_samples_checkpoints_export(full_run):
    out, result, _ = full_run
    cfg = load_config(out / "config.yaml")  # the resolved config, loadable again
    assert cfg.stages[1].resolution == 128 and cfg.train.out_dir == str(out)
    log_text = (out / "train.log").read_text()
    assert "stage 1 step 3/3" in log_text and "summary" in log_text
    # the backend status heads the log: what each fast path ran, and the versions
    assert "fast paths and versions" in log_text and "local_perceptual_loss on cpu" in log_text
    assert log_text.index("fast paths and versions") < log_text.index("stage 0")
    names = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert names == ["stage128_step5.png", "stage128_step6.png", "stage64_step2.png", "stage64_step3.png"]
    from PIL import Image
    grid = Image.open(out / "samples" / "stage128_step6.png")
    assert grid.width > 4 * 128 and grid.height >= 128  # 4 columns of 128 px
    latest = ckpt.read_latest(out / "checkpoints")
    assert latest is not None and latest.name == "step_00000006"
    assert {"meta.json", "generator.pt", "discriminator.pt", "rng_rank0.pt"} <= {p.name for p in latest.iterdir()}
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["state"]["stage"] == 1 and meta["state"]["step"] == ITERS and meta["arch"]["resolution"] == 128
    state = torch.load(latest / "generator.pt", weights_only=True)  # no pickled code in our checkpoints
    assert not any(k.startswith("vgg") for k in state["model"])  # VGG is not checkpointed
    assert not list(out.glob("checkpoints/.tmp-*"))
    assert "| 1     | 128" in result["summary"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("stop_at", [2, 4])  # inside stage 64; inside stage 128 after the growth
def test_exact_resume(full_run, data_root, tmp_path, stop_at):
    _, full, _ = full_run
    cfg = tiny_cfg(data_root, tmp_path)
    first = train(cfg, stop_at_step=stop_at)
    assert first["stopped"] and first["global_step"] == stop_at
    assert ckpt.read_latest(tmp_path / "checkpoints").name == f"step_{stop_at:08d}"
    resumed = train(cfg, resume="auto")
    assert resumed["global_step"] == 2 * ITERS
    assert _max_diff(full["generator_state"], resumed["generator_state"]) == 0.0


def test_warmup_ramps_every_stage_and_resumes_exactly(data_root, tmp_path):
    """train.warmup_iterations: both optimisers' lr ramp (step + 1) / N at the start of every stage (the
    discriminators' too, which start at 128); a run stopped inside the 128-px ramp resumes exactly."""
    cfg = tiny_cfg(data_root, tmp_path / "full", f"train.warmup_iterations={ITERS}")
    seen = []

    def record(info):
        g_lr = [g["lr"] for g in info["generator_engine"].optimizer.param_groups]
        d_lr = ([g["lr"] for g in info["discriminator_engine"].optimizer.param_groups]
                if info["discriminator_engine"] is not None else None)
        seen.append((info["resolution"], info["lr_factor"], g_lr, d_lr))

    result = train(cfg, callback=record)
    ramp = [(s + 1) / ITERS for s in range(ITERS)]
    assert [(r, f) for r, f, _, _ in seen] == [(64, f) for f in ramp] + [(128, f) for f in ramp]
    for r, f, g_lr, d_lr in seen:
        assert g_lr == [pytest.approx(cfg.train.lr * f)] * len(g_lr)
        assert d_lr is None if r == 64 else d_lr == [pytest.approx(cfg.loss.disc_lr * f)] * len(d_lr)
    stopped_cfg = tiny_cfg(data_root, tmp_path / "stopped", f"train.warmup_iterations={ITERS}")
    assert train(stopped_cfg, stop_at_step=ITERS + 1)["stopped"]
    resumed = train(stopped_cfg, resume="auto")
    assert _max_diff(result["generator_state"], resumed["generator_state"]) == 0.0


@pytest.mark.parametrize("output_fade", [False, True])
def test_input_fade_schedule_resume_and_export(full_run, data_root, tmp_path, output_fade):
    """model.input_fade: alpha 1 at the first stage, 0 -> 1 over the share of the grown stage; a run
    stopped inside the fade resumes exactly; the export leaves the fade's from-RGB (and with
    model.output_fade its to-RGB) out."""
    from hptransfer.errors import CheckpointError
    from hptransfer.export import load_any, load_generator

    _, full, _ = full_run
    fade = ("model.input_fade=1.0", f"model.output_fade={str(output_fade).lower()}")
    cfg = tiny_cfg(data_root, tmp_path / "full", *fade)
    alphas = []
    result = train(cfg, callback=lambda info: alphas.append((info["resolution"], info["fade_alpha"])))
    window = ITERS  # input_fade 1.0: the fade spans the stage, alpha 0 at its first step, exactly 1 at its last
    assert alphas == [(64, 1.0)] * ITERS + [(128, min(1.0, s / (window - 1))) for s in range(ITERS)]
    assert alphas[ITERS][1] == 0.0 and 0 < alphas[ITERS + 1][1] < 1 and alphas[ITERS + window - 1][1] == 1.0
    assert any(k.startswith("from_rgb.64.") for k in result["generator_state"])
    assert any(k.startswith("to_rgb.64.") for k in result["generator_state"]) == output_fade
    # the fade changes training: not the same weights as the run without it
    assert _max_diff({k: full["generator_state"][k] for k in full["generator_state"]},
                     {k: result["generator_state"][k] for k in full["generator_state"]}) > 0
    loaded = load_generator(tmp_path / "full" / "export")
    assert loaded.resolution == 128 and not loaded.fading
    # the last checkpoint (alpha 1, fade modules still held) exports as the stage-end export does
    x, kp = torch.rand(2, 3, 128, 128) * 2 - 1, torch.rand(2, 18, 2) * 127
    with torch.no_grad():
        assert torch.equal(load_any(tmp_path / "full" / "checkpoints")(x, kp), loaded(x, kp))
    stopped_cfg = tiny_cfg(data_root, tmp_path / "stopped", *fade)
    assert train(stopped_cfg, stop_at_step=ITERS + 1)["stopped"]
    with pytest.raises(CheckpointError, match=r"inside the input fade \(alpha 0\.\d+\)"):
        load_any(tmp_path / "stopped" / "checkpoints")  # alpha < 1: no export of a network not trained
    resumed = train(stopped_cfg, resume="auto")
    assert _max_diff(result["generator_state"], resumed["generator_state"]) == 0.0


def test_nonfinite_loss_skips_step_and_weights_stay(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "stages=[{resolution: 64, iterations: 3, batch_size: 2}]")
    snaps = {}

    def poison(terms, info):
        if info["global_step"] == 1:
            terms = dict(terms, total=terms["total"] * float("nan"))
        return terms

    def snap(info):
        snaps[info["global_step"]] = {k: v.detach().clone() for k, v in info["generator"].state_dict().items()}

    result = train(cfg, callback=snap, loss_hook=poison)
    assert result["skipped"] == 1
    assert _max_diff(snaps[0], snaps[1]) == 0.0  # the NaN step changed nothing, BatchNorm stats included
    assert _max_diff(snaps[1], snaps[2]) > 0  # the next step trains again
    assert all(torch.isfinite(v.float()).all() for v in result["generator_state"].values())
    assert "| 0     | 64  | 3     |" in result["summary"] and " 1       |" in result["summary"]


def test_export_round_trip(full_run, data_root):
    out, result, _ = full_run
    from hptransfer.export import load_generator

    loaded = load_generator(out / "export")
    assert loaded.resolution == 128 and not loaded.training
    # every finished stage keeps its own export; the top level is the last one's (the same files)
    assert sorted(p.name for p in (out / "export").iterdir()) == ["128px", "64px", "config.json", "model.safetensors"]
    assert load_generator(out / "export" / "64px").resolution == 64
    for name in ("config.json", "model.safetensors"):
        assert (out / "export" / name).read_bytes() == (out / "export" / "128px" / name).read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".export")]  # no temporary directory left
    ref = Generator.from_arch(loaded.arch())
    ref.load_state_dict(result["generator_state"])
    ref.eval()
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    kp = torch.rand(2, 18, 2) * 127
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, kp), ref(x, kp), rtol=0, atol=1e-6)


def test_cli_entry_point(data_root, tmp_path, capsys):
    from hptransfer.cli import main

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(f"model: {{width: 0.03125}}\nloss: {{vgg_weights: random, layers: [relu1_2]}}\n"
                        f"data: {{root: {data_root}, workers: 0}}\ntrain: {{impl: reference, tensorboard: false}}\n"
                        "stages: [{resolution: 64, iterations: 1, batch_size: 2}]\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg_path), "--out", str(out), "train.log_every=1"]) == 0
    assert (out / "export").is_dir() and ckpt.read_latest(out / "checkpoints").name == "step_00000001"
    assert main(["train", "--config", str(cfg_path), "--out", str(out), "train.no_such_key=1"]) == 2
    assert "unknown key 'train.no_such_key'" in capsys.readouterr().err


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_rng(tmp_path, 0)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.load_rng(tmp_path, 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_checkpoint_latest_pointer_and_pruning(tmp_path):
    for step in (1, 2, 3, 4):
        tmp = ckpt.begin(tmp_path, step, True)
        (tmp / "x.pt").write_bytes(b"x")
        ckpt.finish(tmp_path, tmp, {"state": {"global_step": step}}, keep=2, is_main=True)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert ckpt.read_latest(tmp_path).name == "step_00000004"
    assert ckpt.resolve("auto", tmp_path.parent / "none") is None
    assert ckpt.resolve(str(tmp_path), tmp_path).name == "step_00000004"
    # A crash before finish() leaves a .tmp- directory that `latest` never points at.
    ckpt.begin(tmp_path, 5, True)
    assert ckpt.read_latest(tmp_path).name == "step_00000004"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.resolve(str(tmp_path / "missing"), tmp_path)


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    paper = {"deepfashion_256": 256, "deepfashion_512": 512, "h36m_1024": 1024, "youtube_1024": 1024}
    for name, top in paper.items():
        cfg = load_config(root / f"{name}.yaml")
        assert cfg.model.width == 1.0 and cfg.train.lr == 2e-4 and cfg.train.weight_decay == 5e-4
        assert cfg.stages[0].resolution == 64 and cfg.stages[-1].resolution == top
        assert all(s.iterations == 700_000 for s in cfg.stages)
    demo = load_config(root / "synth_demo.yaml")
    assert [s.resolution for s in demo.stages] == [64, 128] and demo.loss.disc_at_resolution == 128
    for path in sorted((root / "ds").glob("*.json")):
        assert json.loads(path.read_text())["zero_optimization"]["stage"] in (1, 2, 3)
    assert len(list((root / "ds").glob("zero*_*.json"))) == 7  # zero{1,2,3}_{bf16,fp16} and zero1g_zero2d_bf16


def test_trains_with_the_dali_loader(data_root, tmp_path, monkeypatch):
    """data.loader=dali on the CPU (DALI's CPU-only mode): the trainer runs on DALI's batches, which
    match the torch loader's within resize rounding, so the first step's losses agree closely."""
    from hptransfer.data import dali

    built = []
    real = dali.make_dali_loader_from_dataset
    monkeypatch.setattr(dali, "make_dali_loader_from_dataset", lambda *a, **k: built.append(1) or real(*a, **k))
    losses = {}
    for loader in ("dali", "torch"):
        seen = []
        cfg = tiny_cfg(data_root, tmp_path / loader, f"data.loader={loader}",
                       "stages=[{resolution: 64, iterations: 2, batch_size: 2}]")
        result = train(cfg, callback=lambda info: seen.append(info["terms"]))
        assert result["global_step"] == 2 and result["skipped"] == 0
        losses[loader] = seen[0]["global"]
    assert built, "the DALI loader was not used"
    assert losses["dali"] == pytest.approx(losses["torch"], rel=0.05)
