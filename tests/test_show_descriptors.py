"""``hptransfer data show --descriptors`` (Fig. 4, left): descriptor centres with their R/8 boxes."""
from __future__ import annotations

import numpy as np
from PIL import Image

from hptransfer.cli import main
from hptransfer.data.check import draw_descriptors


def test_draw_descriptors_boxes_at_the_interpolated_centres():
    kp = np.full((18, 2), -1.0)
    kp[1] = (20, 40)  # neck
    kp[2] = (20, 20)  # right shoulder: the neck-shoulder limb's midpoint is (20, 30)
    img = Image.new("RGB", (64, 64), "white")
    draw_descriptors(img, kp, 64, count=31)
    a = np.asarray(img)
    blue = (a[..., 2] > 200) & (a[..., 0] < 60)  # interpolated descriptors are blue
    red = (a[..., 0] > 200) & (a[..., 2] < 60)  # keypoint descriptors red
    ys, xs = np.nonzero(blue)
    # one midpoint: its 8-px box (R/8 at 64 px) spans x 26..34, y 16..24 around (20, 30)
    assert xs.min() >= 25 and xs.max() <= 35 and ys.min() >= 15 and ys.max() <= 25
    assert red[:, 36:45].any() and red[:, 16:25].any()  # boxes around the two keypoints
    plain = Image.new("RGB", (64, 64), "white")
    draw_descriptors(plain, kp, 64, count=18)  # 18: keypoints only, nothing blue
    assert not ((np.asarray(plain)[..., 2] > 200) & (np.asarray(plain)[..., 0] < 60)).any()


def test_data_show_descriptors_command(tmp_path):
    from hptransfer.data import synth

    synth.synthesize(tmp_path / "d", identities=2, poses=2, size=64, seed=0)
    out = tmp_path / "desc.png"
    assert main(["data", "show", str(tmp_path / "d"), "--descriptors", "44", "--n", "2", "--out", str(out),
                 "--cell", "64"]) == 0
    a = np.asarray(Image.open(out).convert("RGB"))
    assert ((a[..., 2] > 200) & (a[..., 0] < 60)).sum() > 50  # limb descriptors drawn
