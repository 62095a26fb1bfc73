"""Garment transfer end to end at toy size: the trainer's garment_flow task, the pipeline's CLI (synthetic
and file inputs, --steps, --back-to-pose), bad inputs, the try-on evaluation and its baselines."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hptransfer.cli import main


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from hptransfer.config import ModelConfig
    from hptransfer.data import read_annotations, synth
    from hptransfer.export import export_generator
    from hptransfer.flow_task import export_flow
    from hptransfer.models import AppearanceFlow, Generator

    root = tmp_path_factory.mktemp("garment")
    synth.synthesize(root / "data", identities=4, poses=2, size=64, test_fraction=0.5, workers=1,
                     views=("front",), framing="centred")
    torch.manual_seed(0)
    export_generator(Generator(ModelConfig(width=1 / 32), 64).eval(), root / "transfer")
    export_flow(AppearanceFlow(64, levels=3, channels=8).eval(), root / "flow")
    names = sorted(read_annotations(root / "data" / "annotations-test.csv"))
    return {"root": root, "data": root / "data", "names": names}


def _args(toy, person, garment, *extra):
    return ["garment", "--person", str(toy["data"] / "images" / person), "--garment",
            str(toy["data"] / "images" / garment), "--transfer", str(toy["root"] / "transfer"),
            "--flow", str(toy["root"] / "flow"), *extra]


def test_pipeline_on_synthetic_inputs_writes_result_and_steps(toy, tmp_path, capsys):
    a, b = toy["names"][0], toy["names"][-1]
    out, steps = tmp_path / "o.png", tmp_path / "steps"
    rc = main(_args(toy, a, b, "--synthetic", str(toy["data"]), "--out", str(out), "--steps", str(steps),
                    "--back-to-pose"))
    assert rc == 0 and Image.open(out).size == (64, 64)
    names = sorted(p.name for p in steps.glob("*.png"))
    for part in ("person_frontal", "region", "garment_mask", "flow", "warped", "alpha", "composite", "result"):
        assert any(part in n for n in names), part
    # the untrained flow is the identity warp: the warped mask is the garment's own mask
    wm = np.asarray(Image.open(next(steps.glob("*_warped_mask.png"))))[..., 0]
    gm = np.asarray(Image.open(next(steps.glob("*_garment_mask.png"))))[..., 0]
    assert np.array_equal(wm, gm)
    assert "back in the person pose" in capsys.readouterr().out


def test_pipeline_with_files_and_transported_region(toy, tmp_path):
    """No synthetic shortcut: poses from the CSV, parsing PNGs, P's region carried to the frontal pose."""
    a, b = toy["names"][0], toy["names"][-1]
    ann = toy["data"] / "annotations-test.csv"
    parse = lambda n: str(toy["data"] / "parsing" / n.replace(".jpg", ".png"))  # noqa: E731
    out = tmp_path / "o.png"
    rc = main(_args(toy, a, b, "--person-pose", f"{ann}:{a}", "--garment-pose", f"{ann}:{b}",
                    "--person-parsing", parse(a), "--garment-parsing", parse(b), "--out", str(out)))
    assert rc == 0 and out.is_file()


def test_bad_inputs_name_the_file(toy, tmp_path, capsys):
    a, b = toy["names"][0], toy["names"][-1]
    ann = toy["data"] / "annotations-test.csv"
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((64, 64), np.uint8), mode="L").save(empty)
    no_garment = tmp_path / "nogarment.png"
    lab = np.zeros((64, 64), np.uint8)
    lab[10:20, 10:20] = 13  # a face only
    Image.fromarray(lab, mode="L").save(no_garment)
    nopose = tmp_path / "nopose.json"
    nopose.write_text(json.dumps({"people": [{"pose_keypoints_2d": [0.0] * 54}]}))
    common = ["--person-pose", f"{ann}:{a}", "--garment-pose", f"{ann}:{b}", "--out", str(tmp_path / "o.png")]
    cases = [(["--garment-parsing", str(empty), "--person-parsing", str(empty)],
              "empty.png: the parsing map is all background"),
             (["--garment-parsing", str(no_garment)], "nogarment.png: no upper garment")]
    for extra, message in cases:
        assert main(_args(toy, a, b, *common, *extra)) == 2
        assert message in capsys.readouterr().err
    rc = main(_args(toy, a, b, "--person-pose", str(nopose), "--garment-pose", f"{ann}:{b}", "--synthetic",
                    str(toy["data"]), "--out", str(tmp_path / "o.png")))
    assert rc == 2
    err = capsys.readouterr().err
    assert a in err and "no usable person pose" in err


def test_transport_labels_follows_the_pose():
    from hptransfer.data.synth import frontal_keypoints
    from hptransfer.garment import transport_labels

    kp = frontal_keypoints(64)
    mask = np.zeros((64, 64), bool)
    mask[20:34, 26:38] = True  # a torso block
    assert np.array_equal(transport_labels(mask, kp, kp), mask)
    shifted = kp.copy()
    shifted[:, 1] += 5  # the whole person 5 px to the right
    moved = transport_labels(mask, kp, shifted)
    assert np.array_equal(moved[:, 5:], mask[:, :-5])


def test_affine_fit_recovers_a_scaled_shifted_mask():
    import torch.nn.functional as F

    from hptransfer.garment_eval import fit_affine, mask_iou

    src = torch.zeros(64, 64)
    src[16:40, 20:36] = 1
    tgt = torch.zeros(64, 64)
    tgt[24:54, 10:30] = 1  # another size and place
    theta = fit_affine(src, tgt, steps=60)
    grid = F.affine_grid(theta[None], [1, 1, 64, 64], align_corners=False)
    warped = F.grid_sample(src[None, None], grid, align_corners=False)
    assert float(mask_iou(warped, tgt[None, None])) > 0.9
    assert float(mask_iou(src[None, None], tgt[None, None])) < 0.3


@pytest.mark.slow
def test_tryon_evaluation_scores_three_methods(toy, tmp_path):
    from hptransfer.export import load_generator
    from hptransfer.flow_task import load_flow
    from hptransfer.garment_eval import METHODS, evaluate_tryon, format_table, masked_ssim, save_figure

    res = evaluate_tryon(load_generator(toy["root"] / "transfer"), load_flow(toy["root"] / "flow"), toy["data"],
                         count=2)
    assert set(res["scores"]) == set(METHODS) and res["pairs"] == 2
    for s in res["scores"].values():
        assert 0 <= s["l1"] <= 1 and -1 <= s["ssim"] <= 1 and 0 <= s["iou"] <= 1 and "l1_pose" in s
    # the ground truth scores perfectly against itself; the methods do not
    gt, m = res["tensors"]["gt"], res["tensors"]["gt_mask"]
    assert float(masked_ssim(gt, gt, m).min()) == pytest.approx(1.0)
    assert res["scores"]["ours"]["ssim"] < 0.99
    assert "(a) flow (ours)" in format_table(res["scores"])
    assert save_figure(res, tmp_path / "fig.png").is_file()


def test_garment_flow_task_trains_with_the_trainer(toy, tmp_path):
    from hptransfer.config import load_config
    from hptransfer.flow_task import is_flow_export, load_flow
    from hptransfer.train import train

    cfg = load_config("configs/garment_flow.yaml", [f"data.root={toy['data']}", f"train.out_dir={tmp_path / 'run'}",
                                                    "stages.0.iterations=2", "stages.0.batch_size=2",
                                                    "flow.channels=8", "flow.levels=3", "train.tensorboard=false"])
    seen = []
    result = train(cfg, callback=lambda info: seen.append(info["terms"]))
    assert result["global_step"] == 2 and result["skipped"] == 0
    assert {"l1", "mask", "tv", "perceptual", "total"} <= set(seen[-1])
    assert is_flow_export(result["export"]) and load_flow(result["export"]).resolution == 64
    assert sorted((tmp_path / "run" / "samples").glob("stage64_*.png"))
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_garment_demo_end_to_end(tmp_path, capsys):
    """`make demo-garment` at toy size from nothing: data with parsing maps, a stand-in transfer network,
    the flow network, the pipeline with --steps, the table and the figure."""
    out = tmp_path / "garment"
    rc = main(["demo", "--garment", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "no_demo"),
               "--garment-out", str(out), "--identities", "10", "--poses", "3", "--size", "64",
               "--transfer-iterations", "2", "--flow-iterations", "2", "--pairs", "2", "stages.0.batch_size=2"])
    assert rc == 0
    metrics = json.loads((out / "garment_metrics.json").read_text())
    assert set(metrics["scores"]) == {"ours", "affine", "transfer_only"} and metrics["pairs"] == 2
    assert (out / "garment_grid.png").is_file() and (out / "tryon.png").is_file()
    assert len(list((out / "steps").glob("*.png"))) >= 10
    printed = capsys.readouterr().out
    assert "stand-in" in printed and "(a) flow (ours)" in printed


def test_garment_flow_task_resumes_exactly(toy, tmp_path):
    """Stop at step 2, resume: the same weights as 4 uninterrupted steps (checkpoint + RNG + data position)."""
    from hptransfer.config import load_config
    from hptransfer.train import train

    def cfg(out):
        return load_config("configs/garment_flow.yaml", [f"data.root={toy['data']}", f"train.out_dir={out}",
                                                         "stages.0.iterations=4", "stages.0.batch_size=2",
                                                         "flow.channels=8", "flow.levels=3", "train.tensorboard=false",
                                                         "train.checkpoint_every=2", "train.sample_every=0"])

    full = train(cfg(tmp_path / "a"))["generator_state"]
    assert train(cfg(tmp_path / "b"), stop_at_step=2)["stopped"]
    resumed = train(cfg(tmp_path / "b"), resume="auto")["generator_state"]
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert not all(torch.equal(full[k], v) for k, v in train(cfg(tmp_path / "c"), stop_at_step=2)
                   ["generator_state"].items())  # 2 steps differ from 4: the comparison can fail


@pytest.mark.slow
@pytest.mark.distributed
def test_garment_flow_task_under_deepspeed_two_ranks(toy, tmp_path):
    """The flow task through the deepspeed launcher (2 CPU ranks, gloo, ZeRO-2 bf16): trains, checkpoints
    on every rank and exports a loadable flow network."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from hptransfer.flow_task import load_flow

    root = Path(__file__).resolve().parents[1]
    launcher = Path(sys.executable).with_name("deepspeed")
    launcher = launcher if launcher.exists() else shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not installed in this environment"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = dict(os.environ, HPTRANSFER_NO_BAR="1", OMP_NUM_THREADS="1")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(port), str(root / "hptransfer" / "train.py"),
           "--config", str(root / "configs" / "garment_flow.yaml"), "--deepspeed_config",
           str(root / "configs" / "ds" / "zero2_bf16.json"), f"data.root={toy['data']}", f"train.out_dir={out}",
           "stages.0.iterations=3", "stages.0.batch_size=2", "flow.channels=8", "flow.levels=3",
           "train.checkpoint_every=2", "train.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert load_flow(out / "export").levels == 3
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert "mask=" in (out / "train.log").read_text()


def test_flow_pairs_flip_images_masks_and_keypoints_together(toy):
    from hptransfer.data.garment_pairs import GarmentFlowDataset
    from hptransfer.pose import flip_keypoints

    plain = GarmentFlowDataset(toy["data"], "train", 64)
    flipping = GarmentFlowDataset(toy["data"], "train", 64, flip=True, seed=3)
    flipped = [i for i in range(len(plain)) if flipping.pairs_ds._flip_for(i)]
    assert flipped and len(flipped) < len(plain)
    i = flipped[0]
    a, b = plain[i], flipping[i]
    for k in ("source", "target", "source_mask", "target_mask", "target_region", "garment"):
        assert torch.equal(b[k], a[k].flip(-1)), k
    assert torch.equal(b["kp_source"], flip_keypoints(a["kp_source"], 64))
    assert a["source_mask"].sum() > 0 and torch.equal(a["garment"], a["source"] * a["source_mask"])
    # the garment lies inside the region it may occupy (clothes and arms)
    assert ((a["target_mask"] > 0) & (a["target_region"] > 0)).sum() == a["target_mask"].sum()


@pytest.mark.slow  # two tiny flow trainings and their evaluations: ~20 s quiet, minutes on shared cores
def test_garment_study_curves_seeds_rounds_and_resume(toy, tmp_path):
    """hptransfer garment-study at toy size: every seed evaluated at the same steps (rounds), the
    untrained flow (identity warp) at step 0, the affine paste once; a rerun trains and scores nothing
    again; other settings in the same folder are refused."""
    from hptransfer.config import ConfigError
    from hptransfer.garment_study import study, summary

    out = tmp_path / "study"
    args = dict(seeds=2, iterations=2, eval_every=1, pairs=2, resolutions=(64,), round_every=1,
                overrides=["stages.0.batch_size=2", "train.log_every=1"])
    doc = study(toy["data"], out, **args)
    assert sorted(doc["seeds"]) == ["0", "1"]
    for s in ("0", "1"):
        assert sorted(doc["seeds"][s], key=int) == ["0", "1", "2"]
        per_pair = doc["seeds"][s]["2"]["64"]
        assert set(per_pair) == {"l1", "ssim", "iou"} and len(per_pair["l1"]) == 2
    assert doc["seeds"]["0"]["0"] == doc["seeds"]["1"]["0"]  # the identity warp does not depend on the seed
    assert doc["seeds"]["0"]["2"] != doc["seeds"]["1"]["2"]  # trained with their own seeds
    assert len(doc["affine"]["64"]["ssim"]) == 2
    text = (out / "summary.md").read_text()
    assert text == summary(doc) and "| affine paste |" in text and "/4 |" in text  # wins out of 2 seeds x 2 pairs
    assert (out / "curves.png").stat().st_size > 0
    stamp = (out / "flow_seed1" / "checkpoints").stat().st_mtime_ns
    assert study(toy["data"], out, **args) == doc
    assert (out / "flow_seed1" / "checkpoints").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="other settings"):
        study(toy["data"], out, **{**args, "pairs": 3})
    # --report: the summary and the plot from curves.json, nothing trained; at a step every seed has
    (out / "summary.md").unlink()
    assert main(["garment-study", "--out", str(out), "--report"]) == 0
    assert (out / "summary.md").read_text() == text and "flow (ours), step 2" in text
    assert main(["garment-study", "--out", str(tmp_path / "none"), "--report"]) == 2
