"""hptransfer eval output: an unavailable metric is one short table line (the long "where the weights
go" text once, in the log); --json prints machine-readable results on stdout."""
import json
import logging

import numpy as np
import torch
from PIL import Image

from hptransfer.cli import main


def _folders(tmp_path, n=3, size=64):
    rng = np.random.default_rng(0)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for i in range(n):
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(a).save(gt / f"{i}.png")
        Image.fromarray(np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)).save(
            pred / f"{i}.png")
    return pred, gt


def _no_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for v in ("HPTRANSFER_ALEXNET", "HPTRANSFER_INCEPTION", "HPTRANSFER_VGG16"):
        monkeypatch.delenv(v, raising=False)


def test_unavailable_metric_is_one_short_line(tmp_path, monkeypatch, capsys, caplog):
    _no_weights(monkeypatch, tmp_path)
    pred, gt = _folders(tmp_path)
    with caplog.at_level(logging.INFO):
        assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    for metric, name in (("lpips", "alexnet"), ("fid", "inception")):
        assert f"hptransfer weights fetch {name}" in rows[metric]
        assert len(rows[metric]) < 100, rows[metric]  # short: no list of places in the table
        assert "looked at" not in rows[metric]
        logged = [r.getMessage() for r in caplog.records]
        long = [m for m in logged if "looked at" in m and f"{name} ImageNet" in m]
        assert len(long) == 1  # the long explanation: once, in the log
    assert "ssim_gaussian" in rows


def test_json_on_stdout(tmp_path, monkeypatch, capsys):
    _no_weights(monkeypatch, tmp_path)
    pred, gt = _folders(tmp_path)
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--device", "cpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # stdout is the JSON document alone
    m = doc["metrics"]
    assert 0 < m["ssim_gaussian"]["value"] < 1 and m["ssim_gaussian"]["n"] == 3
    assert "hptransfer weights fetch alexnet" in m["lpips"]["unavailable"]
    assert doc["source"] == {"pred": str(pred), "gt": str(gt)}


def test_different_sets_are_refused_or_restricted_with_a_count(tmp_path, capsys, caplog):
    """One name in common out of three: no silent n=1 score. Refused, naming both sides; --intersection
    scores the common name and says what it dropped."""
    pred, gt = _folders(tmp_path)
    (pred / "1.png").rename(pred / "x.png")  # a prediction without ground truth
    (pred / "2.png").unlink()  # a ground truth without prediction
    argv = ["eval", "--pred", str(pred), "--gt", str(gt), "--device", "cpu", "--metrics", "ssim"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "1 predictions have no ground truth (first: x.png)" in err
    assert "2 ground-truth images have no prediction (first: 1.png)" in err and "--intersection" in err
    with caplog.at_level(logging.WARNING):
        assert main(argv + ["--intersection", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["images"] == 1 and doc["metrics"]["ssim_gaussian"]["n"] == 1
    assert doc["left_out"] == {"predictions": ["x.png"], "ground_truth": ["1.png", "2.png"]}
    assert any("scoring the 1 common names" in r.getMessage() for r in caplog.records)
    assert main(["eval", "--pred", str(gt), "--gt", str(gt), "--device", "cpu", "--metrics", "ssim"]) == 0
    assert capsys.readouterr().out.startswith(f"3 images: {gt} against {gt}")  # n stated above the table


def test_local_ssim_without_annotation_rows_says_why_instead_of_nan(tmp_path, capsys, caplog):
    from hptransfer.data import write_annotations

    pred, gt = _folders(tmp_path, n=3)
    data = tmp_path / "data"
    kp = np.array([[10 + 2 * i, 12 + 2 * i] for i in range(18)], np.float32)
    write_annotations(data / "annotations-test.csv", {"0.png": kp})  # 1.png, 2.png have no row
    argv = ["eval", "--pred", str(pred), "--gt", str(gt), "--data", str(data), "--device", "cpu",
            "--metrics", "local_ssim"]
    with caplog.at_level(logging.WARNING):
        assert main(argv + ["--json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]["local_ssim"]
    assert m["n"] == 1 and m["left_out"] == 2 and "annotations-test.csv" in m["why"] and 0 < m["value"] <= 1
    assert any("2 of 3 ground-truth images have no row" in r.getMessage() and "first: 1.png" in r.getMessage()
               for r in caplog.records)
    assert main(argv) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("local_ssim"))
    assert "2 images left out: no row in annotations-test.csv" in row and "nan" not in row
    # no row for any image: a reason, never nan (and an error when the metric was asked for explicitly)
    write_annotations(data / "annotations-test.csv", {"other.png": kp})
    assert main(argv) == 2
    assert "local_ssim: not defined for any of the 3 images: no row in annotations-test.csv" in capsys.readouterr().err
    assert main(argv[:-2]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("local_ssim"))
    assert "unavailable (not defined for any of the 3 images" in row and "nan" not in row.lower()
