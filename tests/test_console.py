"""What a person sees while training: log lines above one live tqdm bar (never glued to it), one
counter, the bar's losses current at every step (not the last log step's), a log line at each L2 -> L1
switch, and sample grids whose columns are named."""
from __future__ import annotations

import logging
import re
import sys

import numpy as np
import torch
from PIL import Image

from hptransfer import report
from hptransfer.config import load_config
from hptransfer.train import train

ITERS = 4  # steps 0, 1 L2; 2, 3 L1; logged: 0 and 3 (train.log_every is larger)


def test_log_lines_above_one_bar_with_current_values(tmp_path, capsys, monkeypatch):
    import tqdm as tqdm_module

    from hptransfer.data import synth

    class EveryStep(tqdm_module.tqdm):  # draw at every update, so every step's values can be checked
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, "mininterval": 0, "miniters": 1})

    monkeypatch.setattr(tqdm_module, "tqdm", EveryStep)
    monkeypatch.setattr(report, "BAR_REFRESH_S", 0.0)
    monkeypatch.delenv("HPTRANSFER_NO_BAR", raising=False)
    synth.synthesize(tmp_path / "data", identities=3, poses=2, size=64, seed=0, workers=1)
    cfg = load_config(None, ["model.width=0.03125", "loss.vgg_weights=random", "loss.layers=[relu1_2]",
                             "train.impl=reference", "train.tensorboard=false", "train.log_every=100",
                             "train.sample_every=0", "data.workers=0", f"data.root={tmp_path / 'data'}",
                             f"train.out_dir={tmp_path / 'run'}",
                             f"stages=[{{resolution: 64, iterations: {ITERS}, batch_size: 2}}]"])
    console = logging.StreamHandler(sys.stderr)  # what `hptransfer train` has: logging.basicConfig on stderr
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.root.addHandler(console)
    terms = []
    try:
        train(cfg, callback=lambda info: terms.append(info["terms"]))
    finally:
        logging.root.removeHandler(console)
    err = capsys.readouterr().err
    logged = [ln for ln in err.split("\n") if "hptransfer.train:" in ln]
    assert any("step 4/4 (global 4 of 4)" in ln for ln in logged)
    for ln in logged:  # tqdm.write clears the bar first: after the last \r, the line is the log record alone
        assert ln.split("\r")[-1].startswith(("INFO ", "WARNING ")), repr(ln[-200:])
    switches = [ln for ln in logged if "criterion L2 -> L1" in ln]
    assert len(switches) == 1 and "stage 0 step 2:" in switches[0] and "did not diverge" in switches[0]
    renders = [x for x in re.split(r"[\r\n]", err) if "it/s" in x or "s/it" in x]
    assert renders and all(len(re.findall(r"\b\d+/\d+\b", x)) == 1 for x in renders), renders  # one counter
    for k in range(1, ITERS + 1):  # after step k the bar shows step k's losses, logged or not
        want = f"global={report._fmt(terms[k - 1]['global'])}"
        assert any(f" {k}/{ITERS} " in x and want in x for x in renders), (k, want, [x for x in renders if
                                                                                   f" {k}/{ITERS} " in x])
    assert len({t["global"] for t in terms}) == ITERS  # the values do change from step to step


def test_sample_grid_names_its_columns(tmp_path):
    torch.manual_seed(0)
    R = 64
    img = torch.rand(2, 3, R, R) * 2 - 1
    kp = torch.rand(2, 18, 2) * (R - 1)
    report.save_sample_grid(tmp_path / "g.png", img, kp, img, img)
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
    strip = grid.shape[0] - (2 * R + 2)
    assert 8 <= strip <= 30, grid.shape  # a strip of text above the two rows
    for j in range(4):  # dark text in each column's part of the strip, white between the columns
        cell = grid[:strip, j * (R + 2): j * (R + 2) + R]
        assert (cell < 100).sum() > 10, f"column {j} ({report.SAMPLE_COLUMNS[j]}) has no label"
    assert report.SAMPLE_COLUMNS == ("reference", "target pose", "generated", "ground truth")
