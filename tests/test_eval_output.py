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
