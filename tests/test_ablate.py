"""Issue 17: config overlays, the Table 1 variants, loss.descriptors, the "in replacement" default,
``train --init-from`` and ``hptransfer ablate`` (plan, table, and a killed-and-resumed run)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hptransfer import losses, pose
from hptransfer.config import ConfigError, LossConfig, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "synth_ablation.yaml"
VARIANTS = ["baseline", "lpl", "pt", "pt_lpl", "pt_lpl_ld"]


def overlay(name: str) -> Path:
    return ROOT / "configs" / "ablation" / f"{name}.yaml"


# ---------------------------------------------------------------- config overlays

def test_overlays_merge_sections_and_later_files_win(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model: {width: 0.5, disc_channels: 8}\nloss: {adv_weight: 0.5}\n"
                 "stages: [{resolution: 64, iterations: 5, batch_size: 2}, {resolution: 128, iterations: 7, batch_size: 1}]\n")
    b.write_text("model: {width: 0.25}\nstages: [{resolution: 64, iterations: 3, batch_size: 4}]\n")
    cfg = load_config([a, b], ["loss.adv_weight=0.2"])
    assert cfg.model.width == 0.25 and cfg.model.disc_channels == 8  # merged key by key
    assert [(s.resolution, s.iterations) for s in cfg.stages] == [(64, 3)]  # lists are replaced whole
    assert cfg.loss.adv_weight == 0.2  # overrides last
    b.write_text("model: {no_such_key: 1}\n")
    with pytest.raises(ConfigError, match=r"b\.yaml.*no_such_key"):
        load_config([a, b])


def test_table1_variants_on_the_shipped_base():
    """Each overlay gives its Table 1 row: stages and which local terms run at each stage."""
    base = load_config(BASE)
    total = sum(s.iterations for s in base.stages)
    top = base.stages[-1].resolution
    rows = {}
    for v in VARIANTS:
        cfg = load_config([BASE, overlay(v)])
        rows[v] = [(s.resolution, s.iterations, losses.active_terms(cfg.loss, s.resolution)) for s in cfg.stages]
    off = {"local": False, "adv": False}
    assert rows["baseline"] == [(top, total, off)]
    assert rows["lpl"] == [(top, total, {"local": True, "adv": False})]
    assert [r[2] for r in rows["pt"]] == [off, off] and [r[0] for r in rows["pt"]] == [64, 128]
    assert [r[2] for r in rows["pt_lpl"]] == [{"local": True, "adv": False}] * 2
    # "in replacement": the discriminators replace the local perceptual loss at the top stage
    assert [r[2] for r in rows["pt_lpl_ld"]] == [{"local": True, "adv": False}, {"local": False, "adv": True}]


def test_progressive_false_is_idempotent_through_a_saved_config(tmp_path):
    cfg = load_config([BASE, overlay("baseline")])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.stages == cfg.stages and len(again.stages) == 1


def test_in_replacement_is_the_default_and_descriptors_setting():
    assert LossConfig().local_perceptual_at_top is False
    top = LossConfig(disc_at_resolution=64)
    assert losses.active_terms(top, 64) == {"local": False, "adv": True}
    assert losses.active_terms(LossConfig(disc_at_resolution=64, local_perceptual_at_top=True), 64) == \
        {"local": True, "adv": True}
    # no discriminator weight: the local perceptual loss stays at the top stage
    assert losses.active_terms(LossConfig(disc_at_resolution=64, adv_weight=0.0), 64) == {"local": True, "adv": False}
    # 0 descriptors: no local term of either kind
    assert losses.active_terms(LossConfig(disc_at_resolution=64, descriptors=0), 64) == {"local": False, "adv": False}
    assert losses.descriptors_at(LossConfig(), 128) == 18 and losses.descriptors_at(LossConfig(), 1024) == 44
    assert losses.descriptors_at(LossConfig(descriptors=44), 64) == 44
    with pytest.raises(ConfigError, match="loss.descriptors"):
        load_config(None, ["loss.descriptors=20"])


@pytest.mark.slow  # 30-46 s on 2 shared cores
def test_descriptors_setting_reaches_the_local_loss_and_the_discriminator_pairs(tiny_cfg, rng):
    from conftest import random_keypoints
    from hptransfer import ops
    from hptransfer.models import Generator, LocalDiscriminator, VGG16Features

    R = 64
    torch.manual_seed(0)
    vgg = VGG16Features(weights="random", layers=("relu1_2",)).eval()
    g = Generator(tiny_cfg, R)
    ref, tgt = (torch.rand(2, 3, R, R, generator=rng) * 2 - 1 for _ in range(2))
    kp_r, kp_t = random_keypoints(2, R, rng), random_keypoints(2, R, rng)
    fake = g(ref, kp_t)
    cfg = LossConfig(descriptors=44, local_min_crop=8, local_perceptual_at_top=True, disc_at_resolution=R)
    geometry = losses.step_geometry(cfg, kp_r, kp_t, R)
    out = losses.generator_loss(fake, tgt, geometry, vgg, cfg, "l2", reference=ref,
                                discriminator=LocalDiscriminator(tiny_cfg, 44, R // 8), impl="reference")
    want = ops.local_perceptual_loss(fake, tgt, *pose.local_descriptors(kp_t, R, 44), vgg, "l2", impl="reference",
                                     local_min_crop=8)
    default = ops.local_perceptual_loss(fake, tgt, *pose.local_descriptors(kp_t, R), vgg, "l2", impl="reference",
                                        local_min_crop=8)
    torch.testing.assert_close(out["local"], want)
    assert not torch.allclose(want, default)  # 44 descriptors, not the 18 of the rule at 64 px
    assert geometry.count == 44 and losses.local_discriminator_pairs(ref, tgt, geometry, "reference").shape[1] == 44


# ---------------------------------------------------------------- --init-from

@pytest.mark.slow  # 30-46 s on 2 shared cores
def test_init_from_loads_weights_and_grows(tmp_path):
    from hptransfer import checkpoint as ckpt
    from hptransfer.data import synth
    from hptransfer.train import _init_from, train

    data = tmp_path / "data"
    synth.synthesize(data, identities=3, poses=2, size=64, seed=0)
    common = ["model.width=0.03125", "model.disc_channels=4", "loss.vgg_weights=random", "loss.layers=[relu1_2]",
              "train.impl=reference", "train.tensorboard=false", "data.workers=0", f"data.root={data}",
              "train.sample_every=0", "train.checkpoint_every=100"]
    cfg64 = load_config(None, common + [f"train.out_dir={tmp_path / 'a'}",
                                        "stages=[{resolution: 64, iterations: 2, batch_size: 2}]"])
    state64 = train(cfg64)["generator_state"]
    cfg128 = load_config(None, common + [f"train.out_dir={tmp_path / 'b'}",
                                         "stages=[{resolution: 128, iterations: 1, batch_size: 1}]"])
    for source in (tmp_path / "a", ckpt.read_latest(tmp_path / "a" / "checkpoints"), tmp_path / "a" / "export"):
        g = _init_from(cfg128, str(source))
        assert g.resolution == 128
        have = g.state_dict()
        for k, v in state64.items():  # every trained 64-px weight but the replaced to-RGB/from-RGB
            if not k.startswith(("to_rgb", "from_rgb")):
                torch.testing.assert_close(have[k], v, msg=k)
    with pytest.raises(ConfigError, match="no export"):
        _init_from(cfg128, str(tmp_path / "nothing_here"))
    # a fresh run starts at step 0 from the loaded weights
    result = train(cfg128, init_from=str(tmp_path / "a"))
    assert result["global_step"] == 1 and "--init-from" in (tmp_path / "b" / "train.log").read_text()
    with pytest.raises(ConfigError, match="cannot start"):  # a 128-px generator into a 64-px first stage
        _init_from(cfg64, str(tmp_path / "b"))
    # with model.input_fade the grown first stage fades as a progressive run's grown stage does, and a
    # branch stopped inside the fade resumes exactly (the checkpoint remembers that it grew)
    fade = ["model.input_fade=1.0", "train.deterministic=true", "stages=[{resolution: 128, iterations: 3, batch_size: 1}]"]
    alphas = []
    full = train(load_config(None, common + fade + [f"train.out_dir={tmp_path / 'c'}"]), init_from=str(tmp_path / "a"),
                 callback=lambda info: alphas.append((info["fade_alpha"], any(k.startswith("from_rgb.64.") for k in
                                                                            info["generator"].state_dict()))))
    assert alphas == [(0.0, True), (0.5, True), (1.0, True)]
    stopped_cfg = load_config(None, common + fade + [f"train.out_dir={tmp_path / 'd'}"])
    assert train(stopped_cfg, init_from=str(tmp_path / "a"), stop_at_step=1)["stopped"]
    resumed = train(stopped_cfg, init_from=str(tmp_path / "a"), resume="auto")
    for k, v in full["generator_state"].items():
        torch.testing.assert_close(resumed["generator_state"][k], v, rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------- the ablation

def test_plan_shares_the_trunk_of_pt_lpl_and_pt_lpl_ld(tmp_path):
    from hptransfer.ablate import plan

    finals, order = plan(str(BASE), VARIANTS, 2, tmp_path, [])
    jobs = {j.name: j for j in order}
    assert set(finals) == set(VARIANTS) and all(set(s) == {0, 1} for s in finals.values())
    for seed in (0, 1):
        a, b, c = (jobs[finals[v][seed]] for v in ("pt_lpl", "pt_lpl_ld", "pt"))
        assert a.init_from == b.init_from is not None  # one trunk for both
        assert c.init_from not in (None, a.init_from)  # PT has no local loss in its trunk: its own
        assert jobs[finals["baseline"][seed]].init_from is None
        assert [s.resolution for s in jobs[a.init_from].cfg.stages] == [64]
        assert [s.resolution for s in a.cfg.stages] == [128]
        assert jobs[a.init_from].cfg.train.seed == seed
    # trunks: 2 per seed (pt, pt_lpl[+ld]); finals: 5 per seed
    assert len(order) == 2 * (2 + 5)
    # a trunk comes before the jobs started from it; seed 0 entirely before seed 1
    pos = {j.name: i for i, j in enumerate(order)}
    assert all(pos[j.init_from] < pos[j.name] for j in order if j.init_from)
    assert max(pos[n] for n in finals_for(finals, 0)) < min(pos[n] for n in finals_for(finals, 1))


def finals_for(finals, seed):
    return [by_seed[seed] for by_seed in finals.values()]


def test_summary_mean_and_sample_std():
    from hptransfer.ablate import format_markdown, summarize

    scores = {"pt": {0: {"ssim_gaussian": 0.5, "copy_reference/ssim_gaussian": 0.4},
                     1: {"ssim_gaussian": 0.7, "copy_reference/ssim_gaussian": 0.4}}}
    rows = summarize(scores, 3)
    assert rows["pt"]["ssim_gaussian"]["mean"] == pytest.approx(0.6)
    assert rows["pt"]["ssim_gaussian"]["std"] == pytest.approx(0.1414213, rel=1e-5)  # ddof 1
    assert rows["pt"]["seeds_done"] == [0, 1]
    md = format_markdown(rows, 3)
    assert "| PT | 2/3 | 0.6000 ± 0.1414 |" in md and "copy the reference" in md


@pytest.mark.slow
def test_ablate_two_variants_two_seeds_killed_and_resumed(tmp_path):
    """End to end through the command line: the ablation is killed (with its training subprocess)
    while a job has a checkpoint but is unfinished; the rerun resumes that job, does not retrain the
    finished ones, and writes the table and the figure."""
    from hptransfer.data import synth

    data = tmp_path / "data"
    synth.synthesize(data, identities=4, poses=2, size=128, seed=0, views=("front",), framing="centred")
    out = tmp_path / "abl"
    args = [sys.executable, "-m", "hptransfer", "ablate", "--base", str(BASE), "--variants", "pt_lpl,pt_lpl_ld",
            "--seeds", "2", "--out", str(out), "--figure-pairs", "2",
            f"data.root={data}", "model.width=0.03125", "model.disc_channels=4", "train.impl=reference",
            "train.checkpoint_every=2", "train.log_every=1",
            "stages=[{resolution: 64, iterations: 2, batch_size: 2}, {resolution: 128, iterations: 6, batch_size: 1}]"]
    env = {**os.environ, "HPTRANSFER_NO_BAR": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed_job = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            for run in sorted((out / "runs").glob("*_seed0")) if (out / "runs").is_dir() else []:
                if not run.name.startswith("trunk") and (run / "checkpoints" / "latest").is_file() \
                        and not (run / "done.json").is_file():
                    killed_job = run
                    break
            if killed_job:
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the ablation and its training subprocess, as a crash would
        proc.wait()
    assert killed_job is not None, "no job was caught mid-training"
    trunk_done = json.loads((out / "runs" / "trunk_pt_lpl_seed0" / "done.json").read_text())
    assert not (killed_job / "done.json").is_file()

    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "runs" / "trunk_pt_lpl_seed0" / "done.json").read_text()) == trunk_done  # not retrained
    assert "resuming from" in (killed_job / "subprocess.log").read_text()  # before train.log is opened
    assert json.loads((killed_job / "done.json").read_text())["resumed"] is True
    # one trunk per seed shared by both variants, started with --init-from
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        [f"{v}_seed{s}" for v in ("pt_lpl", "pt_lpl_ld") for s in (0, 1)] + ["trunk_pt_lpl_seed0", "trunk_pt_lpl_seed1"])
    assert "--init-from" in (out / "runs" / "pt_lpl_ld_seed1" / "train.log").read_text()
    table = json.loads((out / "table.json").read_text())
    for v in ("pt_lpl", "pt_lpl_ld"):
        row = table["rows"][v]
        assert row["seeds_done"] == [0, 1]
        assert len(row["ssim_gaussian"]["values"]) == 2 and 0 < row["ssim_gaussian"]["mean"] < 1
        assert "vacated_l1" in row  # synthetic data: the pose-following errors
    assert table["stages_and_terms"]["pt_lpl_ld"][-1]["adv"] is True
    assert table["stages_and_terms"]["pt_lpl_ld"][-1]["local"] is False
    md = (out / "table.md").read_text()
    assert "| PT + LPL + LD | 2/2 |" in md and "±" in md
    from PIL import Image
    with Image.open(out / "figure.png") as im:
        assert im.width >= 4 * 128 and im.height > 2 * 128  # 2 pairs x (reference, truth, 2 variants)
