"""``hptransfer compare`` (Table 2 as a command): several methods in one table, scikit-image's SSIM
reproduced, and ``--crop`` applied to every metric (LPIPS included), keypoints shifted with it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from hptransfer.cli import main
from hptransfer.compare import compare
from hptransfer.evaluate import crop_batches

SK = {"gaussian": dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False),
      "uniform51": dict(win_size=51)}


def _folders(tmp_path, n=3, size=(64, 72)):
    rng = np.random.default_rng(0)
    dirs = {k: tmp_path / k for k in ("gt", "a", "b")}
    for d in dirs.values():
        d.mkdir()
    arrays = {k: [] for k in dirs}
    for i in range(n):
        base = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3)).astype(np.uint8)
        gt = np.asarray(Image.fromarray(base).resize(size[::-1], Image.BILINEAR))
        a = np.clip(gt + rng.normal(0, 12, gt.shape), 0, 255).astype(np.uint8)
        b = np.clip(gt * 0.7 + rng.normal(0, 30, gt.shape), 0, 255).astype(np.uint8)
        for k, arr in (("gt", gt), ("a", a), ("b", b)):
            Image.fromarray(arr).save(dirs[k] / f"img{i}.png")
            arrays[k].append(arr)
    return dirs, arrays


@pytest.mark.parametrize("crop", [None, (4, 60)])
def test_compare_reproduces_skimage_ssim_for_every_method(tmp_path, crop):
    dirs, arrays = _folders(tmp_path)
    out = tmp_path / "table.json"
    argv = ["compare", "--gt", str(dirs["gt"]), "--method", f"A={dirs['a']}", "--method", f"B={dirs['b']}",
            "--metrics", "ssim", "--out", str(out), "--md", str(tmp_path / "table.md"), "--device", "cpu"]
    if crop:
        argv += ["--crop", f"{crop[0]}:{crop[1]}"]
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    x0, x1 = crop or (0, 72)
    for name, key in (("A", "a"), ("B", "b")):
        for protocol, kw in SK.items():
            want = np.mean([structural_similarity(g[:, x0:x1], p[:, x0:x1], channel_axis=-1, data_range=255, **kw)
                            for g, p in zip(arrays["gt"], arrays[key])])
            got = results[name][f"ssim_{protocol}"]
            assert got["n"] == 3
            assert got["value"] == pytest.approx(want, abs=1e-6), (name, protocol)
    md = (tmp_path / "table.md").read_text()
    assert "| A | 3 |" in md and "| B | 3 |" in md
    assert results["A"]["ssim_gaussian"]["value"] > results["B"]["ssim_gaussian"]["value"]


def test_crop_applies_to_lpips_too(tmp_path):
    """With --crop the LPIPS inputs are the cropped images (before, only SSIM/MS-SSIM were cropped)."""
    from hptransfer.metrics import LPIPSMetric

    dirs, arrays = _folders(tmp_path, n=2)
    torch.manual_seed(0)
    got = compare(dirs["gt"], [("A", dirs["a"])], crop=(8, 56), metrics={"lpips"}, lpips_weights="random",
                  device="cpu")["results"]["A"]["lpips_alex"]["value"]
    torch.manual_seed(0)  # the same random backbone ("random": plumbing only, the numbers mean nothing)
    metric = LPIPSMetric("alex", "random", device="cpu")
    to_t = lambda arrs: torch.stack([torch.from_numpy(np.array(a)).permute(2, 0, 1) for a in arrs])  # noqa: E731
    pred, gt = to_t(arrays["a"]), to_t(arrays["gt"])
    want_cropped = float(metric(pred[..., 8:56], gt[..., 8:56]).mean())
    want_whole = float(metric(pred, gt).mean())
    assert got == pytest.approx(want_cropped, rel=1e-6)
    assert abs(want_whole - want_cropped) > 1e-6


def test_crop_shifts_keypoints_and_drops_those_outside():
    pred = torch.zeros(1, 3, 8, 20, dtype=torch.uint8)
    kp = torch.full((1, 18, 2), -1.0)
    kp[0, 0] = torch.tensor([3.0, 10.0])  # inside: x 10 -> 6
    kp[0, 1] = torch.tensor([3.0, 2.0])  # left of the crop
    kp[0, 2] = torch.tensor([3.0, 16.0])  # right of it (columns 4..15 kept)
    (p, g, k), = list(crop_batches([(pred, pred, kp)], (4, 16)))
    assert p.shape[-1] == 12 and g.shape[-1] == 12
    assert k[0, 0].tolist() == [3.0, 6.0]
    assert k[0, 1].tolist() == [-1.0, -1.0] and k[0, 2].tolist() == [-1.0, -1.0] and k[0, 3].tolist() == [-1.0, -1.0]


def test_method_argument_errors(tmp_path):
    dirs, _ = _folders(tmp_path, n=1)
    assert main(["compare", "--gt", str(dirs["gt"]), "--method", str(dirs["a"])]) == 2  # no NAME=
    assert main(["compare", "--gt", str(dirs["gt"]), "--method", f"A={dirs['a']}", "--method", f"A={dirs['b']}"]) == 2


def test_eval_crop_applies_to_every_metric_not_only_ssim():
    """Images equal inside the kept columns and different outside: every metric that runs says 'equal'."""
    from hptransfer.evaluate import evaluate

    g = torch.Generator().manual_seed(0)
    gt = (torch.rand(2, 3, 64, 64, generator=g) * 255).to(torch.uint8)
    pred = gt.clone()
    pred[..., :8] = 255 - pred[..., :8]  # columns 0..7 differ; 8..63 are kept
    kp = torch.full((2, 18, 2), -1.0)
    kp[:, :4] = torch.tensor([[10.0, 4.0], [20.0, 30.0], [40.0, 40.0], [50.0, 20.0]])  # the first outside
    wanted = {"ssim", "local_ssim"}
    whole = evaluate([(pred, gt, kp)], ["gaussian"], None, set(wanted), True, torch.device("cpu"))
    kept = evaluate([(pred, gt, kp)], ["gaussian"], (8, 64), set(wanted), True, torch.device("cpu"))
    assert whole["ssim_gaussian"]["value"] < 0.99 and whole["local_ssim"]["value"] < 0.99
    assert kept["ssim_gaussian"]["value"] == pytest.approx(1.0) and kept["local_ssim"]["value"] == pytest.approx(1.0)


def test_every_method_is_scored_on_the_same_images_and_the_dropped_are_named(tmp_path, caplog):
    """A covers img0..img2, B img1..img3 (img3 has no ground truth): both are scored on img1 and img2."""
    import logging

    dirs, arrays = _folders(tmp_path, n=3)
    (dirs["b"] / "img0.png").rename(dirs["b"] / "img3.png")
    out = tmp_path / "t.json"
    with caplog.at_level(logging.WARNING):
        assert main(["compare", "--gt", str(dirs["gt"]), "--method", f"A={dirs['a']}", "--method", f"B={dirs['b']}",
                     "--metrics", "ssim", "--out", str(out), "--md", str(tmp_path / "t.md"), "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    assert doc["images"] == 2 and doc["dropped"] == {"A": ["img0.png"], "B": ["img3.png"]}
    assert doc["ground_truth_unused"] == 1
    for name, key in (("A", "a"), ("B", "b")):
        want = np.mean([structural_similarity(arrays["gt"][i], arrays[key][i], channel_axis=-1, data_range=255,
                                              **SK["gaussian"]) for i in (1, 2)])
        got = doc["results"][name]["ssim_gaussian"]
        assert got["n"] == 2 and got["value"] == pytest.approx(want, abs=1e-6), name
    md = (tmp_path / "t.md").read_text()
    assert "every method on the same 2 ground-truth images" in md and "A 1, B 1" in md
    assert any("predictions left out: A 1 (first: img0.png), B 1 (first: img3.png)" in r.getMessage()
               for r in caplog.records)
