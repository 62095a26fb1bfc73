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

import numpy as np
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


def test_the_shipped_base_is_the_papers_setting_and_the_fades_are_variants():
    """Section 3 injects the pose at the bottleneck only; section 3.3 grows without alpha blending. The
    fades (ours) live only in the pt_fade* overlays, which otherwise equal their paper rows."""
    base = load_config(BASE)
    assert base.model.pose_at_every_scale is False
    assert base.model.input_fade == 0 and base.model.output_fade is False
    for paper, ours in (("pt", "pt_fade"), ("pt_lpl", "pt_fade_lpl"), ("pt_lpl_ld", "pt_fade_lpl_ld")):
        a, b = load_config([BASE, overlay(paper)]), load_config([BASE, overlay(ours)])
        assert b.model.input_fade == 1.0 and b.model.output_fade is True
        b.model.input_fade, b.model.output_fade = a.model.input_fade, a.model.output_fade
        assert a.to_dict() == b.to_dict(), ours


def test_fade_variants_share_the_paper_trunks_only_where_the_trunk_never_grows(tmp_path):
    from hptransfer.ablate import plan
    from hptransfer.train import _build_generator, _fades

    finals, order = plan(str(BASE), ["pt", "pt_lpl", "pt_lpl_ld", "pt_fade", "pt_fade_lpl", "pt_fade_lpl_ld"], 1,
                         tmp_path, [])
    jobs = {j.name: j for j in order}
    trunk = {v: jobs[finals[v][0]].init_from for v in finals}
    assert trunk["pt_fade"] == trunk["pt"] and trunk["pt_fade_lpl"] == trunk["pt_lpl"] == trunk["pt_fade_lpl_ld"]
    assert trunk["pt"] != trunk["pt_lpl"]
    assert len(order) == 2 + 6
    top = jobs[finals["pt_fade"][0]].cfg
    assert top.model.input_fade == 1.0 and top.model.output_fade  # the fade happens at the growth, in the top job
    # why sharing is right: a trunk's one stage is trained from scratch, where the fade settings do nothing
    fresh = {"init_grown": False}
    assert not _fades(top, 0, fresh)
    g_fade, g_paper = (_build_generator(c, 64, fading=_fades(c, 0, fresh))
                       for c in (top, jobs[finals["pt"][0]].cfg))
    assert g_fade.state_dict().keys() == g_paper.state_dict().keys()
    # where the trunk itself grows (three stages: a 64 -> 128 trunk), the fades act inside it: no sharing
    three = ["stages=[{resolution: 64, iterations: 2, batch_size: 2}, {resolution: 128, iterations: 2, batch_size: 1},"
             " {resolution: 256, iterations: 2, batch_size: 1}]"]
    finals, order = plan(str(BASE), ["pt", "pt_fade"], 1, tmp_path, three)
    jobs = {j.name: j for j in order}
    assert jobs[finals["pt"][0]].init_from != jobs[finals["pt_fade"][0]].init_from
    # the pose heatmaps at every scale change the 64-px training: no sharing either
    finals, order = plan(str(BASE), ["pt", Path(overlay("pt"))], 1, tmp_path, [])
    a = plan(str(BASE), ["pt"], 1, tmp_path, ["model.pose_at_every_scale=true"])[1][0]
    assert a.name.startswith("trunk") and a.cfg.model.pose_at_every_scale
    from hptransfer.ablate import _trunk_key
    assert _trunk_key(a.cfg) != _trunk_key(order[0].cfg)


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


# ---------------------------------------------------------------- the report (issue 29)

def _row(values):
    from hptransfer.ablate import _mean_std

    m, sd = _mean_std(values)
    return {"mean": m, "std": sd, "values": values}


def test_report_verdict_is_the_pooled_t_test_at_5_percent():
    """The verdict agrees with scipy's two-sample t-test (equal variances) on random seeds, in both
    directions, for a higher-is-better and a lower-is-better column."""
    from scipy import stats

    from hptransfer.ablate import compare

    gen = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        a, b = gen.normal(0.5, 0.02, 3), gen.normal(0.5 + gen.normal(0, 0.04), gen.uniform(0.005, 0.04), 3)
        p = stats.ttest_ind(b, a, equal_var=True).pvalue
        for up in (True, False):
            c = compare(_row(list(a)), _row(list(b)), up)
            if p >= 0.05:
                want = "within noise"
            else:
                want = "better" if (b.mean() > a.mean()) == up else "worse"
            assert c["verdict"] == want, (a, b, p, c)
            seen.add(want)
            assert c["units"] == pytest.approx((b.mean() - a.mean()) / c["pooled_std"])
    assert seen == {"better", "worse", "within noise"}
    assert compare(_row([0.5]), _row([0.6, 0.7]), True) is None  # one seed: no verdict
    assert compare(_row([0.3, 0.3, 0.3]), _row([0.3, 0.3, 0.3]), True)["verdict"] == "within noise"


def test_report_pairs_table1_fades_and_a_descriptor_sweep():
    from hptransfer.ablate import default_pairs, format_report, make_variants

    rows = {v: {"ssim_gaussian": _row([0.5, 0.52, 0.51]), "vacated_l1": _row([0.2, 0.21, 0.22])}
            for v in ("baseline", "lpl", "pt", "pt_lpl", "pt_lpl_ld", "pt_fade", "pt_fade_lpl")}
    rows["copy_reference"] = {"ssim_gaussian": {"mean": 0.6, "std": 0.0, "values": []}}
    doc = {"rows": rows}
    assert default_pairs(doc) == [("baseline", "lpl"), ("baseline", "pt"), ("pt", "pt_lpl"), ("pt_lpl", "pt_lpl_ld"),
                                  ("lpl", "pt_lpl"), ("pt", "pt_fade"), ("pt_lpl", "pt_fade_lpl")]
    rows["pt_lpl"]["vacated_l1"] = _row([0.30, 0.31, 0.29])
    text = format_report(doc, [("baseline", "pt_fade")])
    assert text.startswith("Verdict rule:") and text.count("Verdict rule") == 1
    block = text.split("**PT → PT + LPL**")[1].split("**")[0]
    assert "| vacated L1 ↓ | 0.2100 ± 0.0100 | 0.3000 ± 0.0100 | +0.0900 | +9.00 (threshold 2.27) | worse |" in block
    assert "| SSIM ↑ |" in block and "within noise" in block
    assert "(`baseline` → `pt_fade`)" in text
    with pytest.raises(ConfigError, match="no row 'nope'.*baseline"):
        format_report(doc, [("baseline", "nope")])
    # a sweep: Table 1 pairs within a count, then each variant's counts in increasing order
    variants, skipped = make_variants(["pt", "pt_lpl", "pt_lpl_ld"], [0, 18, 44])
    assert list(skipped) == ["pt_lpl_ld_d0"] and "no local discriminator" in skipped["pt_lpl_ld_d0"]
    sweep = {"rows": {v.name: {"ssim_gaussian": _row([0.5, 0.5])} for v in variants},
             "variants": {v.name: {"kind": v.kind, "descriptors": v.descriptors, "label": v.label} for v in variants}}
    pairs = default_pairs(sweep)
    assert ("pt_d18", "pt_lpl_d18") in pairs and ("pt_lpl_d18", "pt_lpl_ld_d18") in pairs
    assert ("pt_lpl_d0", "pt_lpl_d18") in pairs and ("pt_lpl_d18", "pt_lpl_d44") in pairs
    assert ("pt_lpl_ld_d18", "pt_lpl_ld_d44") in pairs and not any("pt_lpl_ld_d0" in p for p in pairs)
    assert "PT + LPL, 18 descriptors → PT + LPL, 44 descriptors" in format_report(sweep)


def test_report_command_reads_the_table_and_refuses_training_options(tmp_path, capsys):
    from hptransfer import cli

    rows = {"pt": {"ssim_gaussian": _row([0.5, 0.52, 0.51])}, "pt_fade": {"ssim_gaussian": _row([0.6, 0.61, 0.62])}}
    (tmp_path / "table.json").write_text(json.dumps({"rows": rows}))
    assert cli.main(["ablate", "--out", str(tmp_path), "--report", "--pairs", "pt_fade:pt"]) == 0
    out = capsys.readouterr().out
    assert "**PT → PT, fades (ours)**" in out and "| better |" in out and "(`pt_fade` → `pt`)" in out
    assert out == (tmp_path / "report.md").read_text() + "\n"  # printed as written
    assert cli.main(["ablate", "--out", str(tmp_path), "--report", "--base", str(BASE)]) == 2
    assert cli.main(["ablate", "--out", str(tmp_path / "none"), "--report"]) == 2
    assert cli.main(["ablate", "--out", str(tmp_path), "--pairs", "a:b", "--base", str(BASE)]) == 2
    assert cli.main(["ablate", "--out", str(tmp_path), "--base", str(BASE), "--descriptors", "0,20"]) == 2
    assert "--descriptors: counts from" in capsys.readouterr().err


def test_chest_box_sits_between_neck_and_hips():
    from hptransfer.ablate import chest_box

    kp = torch.full((18, 2), -1.0)
    kp[1] = torch.tensor([30.0, 64.0])
    assert chest_box(kp, 128) is None  # no hip
    kp[8], kp[11] = torch.tensor([90.0, 54.0]), torch.tensor([90.0, 74.0])
    top, left, side = chest_box(kp, 128)
    assert side == 32 and (top + side / 2, left + side / 2) == (60, 64)
    kp[1] = torch.tensor([2.0, 2.0])
    kp[8], kp[11] = torch.tensor([4.0, 2.0]), torch.tensor([4.0, 2.0])
    assert chest_box(kp, 128)[:2] == (0, 0)  # kept inside the image


@pytest.mark.slow  # ~1-2 min on 2 shared cores: three one-stage jobs in subprocesses
def test_descriptor_sweep_skips_ld_at_zero_and_draws_fig4(tmp_path):
    from PIL import Image

    from hptransfer.ablate import ablate
    from hptransfer.data import synth

    data = tmp_path / "data"
    synth.synthesize(data, identities=3, poses=2, size=64, seed=0, views=("front",), framing="centred")
    table = ablate(str(BASE), ["pt_lpl", "pt_lpl_ld"], 1, tmp_path / "abl",
                   [f"data.root={data}", "model.width=0.03125", "model.disc_channels=4", "train.impl=reference",
                    "loss.disc_at_resolution=64", "stages=[{resolution: 64, iterations: 2, batch_size: 2}]"],
                   figure_pairs=2, descriptors=[0, 18])
    assert sorted(table["rows"]) == ["copy_reference", "pt_lpl_d0", "pt_lpl_d18", "pt_lpl_ld_d18"]
    assert "pt_lpl_ld_d0" in table["skipped"]
    terms = table["stages_and_terms"]
    assert terms["pt_lpl_d0"][-1]["local"] is False and terms["pt_lpl_d18"][-1]["local"] is True
    assert terms["pt_lpl_ld_d18"][-1]["adv"] is True
    assert "Skipped: pt_lpl_ld_d0" in (tmp_path / "abl" / "table.md").read_text()
    assert "(`pt_lpl_d0` → `pt_lpl_d18`)" in (tmp_path / "abl" / "report.md").read_text()
    with Image.open(tmp_path / "abl" / "figure_descriptors.png") as im:
        assert im.width >= 5 * 64 and im.height > 2 * 64  # truth, zoom, 3 rows' zooms; 2 pairs
