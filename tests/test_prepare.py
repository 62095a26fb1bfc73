"""Dataset preparation tools (hptransfer data deepfashion | h36m | video) on tiny fixtures made here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hptransfer.data.check import check_dataset
from hptransfer.data.formats import read_annotations, read_pairs
from hptransfer.data.prepare_common import PrepareError


def _dot_image(h, w, y, x, r=3):
    arr = np.full((h, w, 3), 255, np.uint8)
    arr[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = (255, 0, 0)
    return Image.fromarray(arr)


def _find_dot(path):
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (arr[..., 0] > 180) & (arr[..., 1] < 90) & (arr[..., 2] < 90)
    ys, xs = np.nonzero(red)
    assert len(ys), f"no dot in {path}"
    return ys.mean(), xs.mean()


def _kp_list(values):
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def _write_ann(path, rows):
    lines = ["name:keypoints_y:keypoints_x"]
    for name, kp in rows.items():
        lines.append(f"{name}: {_kp_list(kp[:, 0])}: {_kp_list(kp[:, 1])}")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- deepfashion

SOURCES = ["MEN/Denim/id_00000080/01_1_front.jpg", "MEN/Denim/id_00000080/01_2_side.jpg",
           "WOMEN/Dresses/id_00000002/02_4_full.jpg", "WOMEN/Dresses/id_00000002/02_1_front.jpg"]
FLAT = ["fashionMENDenimid0000008001_1front.jpg", "fashionMENDenimid0000008001_2side.jpg",
        "fashionWOMENDressesid0000000202_4full.jpg", "fashionWOMENDressesid0000000202_1front.jpg"]


def _inshop(tmp_path, coords="256x176", index_col=False, highres=False):
    """A fake In-shop tree: square 256x256 img/ (or 150x220 'high-res') with one red dot per image,
    plus benchmark CSVs whose keypoint 0 is the dot (in ``coords``)."""
    img = tmp_path / ("img_highres" if highres else "img")
    ann = tmp_path / "ann"
    ann.mkdir()
    rows = {}
    for i, (rel, flat) in enumerate(zip(SOURCES, FLAT)):
        sy, sx = 60 + 30 * i, 100 + 10 * i  # dot in the 256x256 source
        p = img / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if highres:
            # 150x220 (W x H); canvas height 256 -> scale 256/220, width 174.5 centred in 176
            hy, hx = int(sy * 220 / 256), int((sx - 40) * 220 / 256)
            _dot_image(220, 150, hy, hx, r=2).save(p, quality=98)
            cy, cx = hy * 256 / 220, hx * 256 / 220 + (176 - 150 * 256 / 220) / 2
        else:
            _dot_image(256, 256, sy, sx).save(p, quality=98)
            cy, cx = sy, sx - 40
        kp = np.full((18, 2), -1.0)
        kp[0] = (cy, cx if coords == "256x176" else cx + 40)
        kp[1] = (cy + 20, (cx if coords == "256x176" else cx + 40))
        kp[4] = (cy, 160 if coords == "256x176" else 200)  # a wrist far right: max x tells the frame
        rows[flat] = kp
    _write_ann(ann / "fasion-resize-annotation-train.csv", {k: rows[k] for k in FLAT[:3]})
    _write_ann(ann / "fasion-resize-annotation-test.csv", {FLAT[3]: rows[FLAT[3]]})
    head = ",from,to\n" if index_col else "from,to\n"
    pr = lambda i, a, b: (f"{i}," if index_col else "") + f"{a},{b}\n"  # noqa: E731
    (ann / "fasion-resize-pairs-train.csv").write_text(head + pr(0, FLAT[0], FLAT[1]) + pr(1, FLAT[1], FLAT[2]))
    (ann / "fasion-resize-pairs-test.csv").write_text(head + pr(0, FLAT[3], FLAT[3]))
    return img, ann, rows


def test_flatten_name_matches_benchmark():
    from hptransfer.data.prepare_deepfashion import flatten_name

    assert flatten_name("img/MEN/Denim/id_00000080/01_1_front.jpg") == "fashionMENDenimid0000008001_1front.jpg"
    assert flatten_name("WOMEN/Blouses_Shirts/id_00000001/02_7_additional.jpg") == \
        "fashionWOMENBlouses_Shirtsid0000000102_7additional.jpg"
    with pytest.raises(PrepareError, match="GENDER"):
        flatten_name("a/b.jpg")


@pytest.mark.parametrize("coords,index_col,size,highres", [
    ("256x176", False, (256, 176), False),
    ("256x256", True, (256, 176), False),
    ("256x176", True, (512, 352), False),
    ("256x256", False, (256, 256), False),
    ("256x176", False, (256, 176), True),
])
def test_deepfashion_names_sizes_keypoints(tmp_path, coords, index_col, size, highres, caplog):
    from hptransfer.data.prepare_deepfashion import prepare

    img, ann, rows = _inshop(tmp_path, coords, index_col, highres)
    out = tmp_path / "out"
    caplog.set_level("INFO")
    s = prepare(img, ann, out, size=size)
    assert s["problems"] == 0 and not s["missing_images"] and s["written"] == 4
    assert f"{coords} coordinates" in caplog.text
    got = read_annotations(out / "annotations-train.csv")
    assert sorted(got) == sorted(FLAT[:3])
    assert read_pairs(out / "pairs-train.csv") == [(FLAT[0], FLAT[1]), (FLAT[1], FLAT[2])]
    for name, kp in got.items():
        im = Image.open(out / "images" / name)
        assert (im.height, im.width) == size
        dy, dx = _find_dot(out / "images" / name)
        # the keypoint on the dot in the source lands on the dot in the output
        assert abs(kp[0, 0] - dy) <= 1.5 and abs(kp[0, 1] - dx) <= 1.5, (name, kp[0], (dy, dx))
        assert kp[[2, 3] + list(range(5, 18))].max() == -1


def test_deepfashion_resume_missing_and_cli(tmp_path):
    from hptransfer.data.dataset import PairDataset
    from hptransfer.data.prepare_deepfashion import prepare

    img, ann, _ = _inshop(tmp_path)
    (img / SOURCES[2]).unlink()  # a row without its image
    out = tmp_path / "out"
    s = prepare(img, ann, out)
    assert s["missing_images"] == [FLAT[2]] and s["dropped_pairs"] == 1 and s["written"] == 3
    s2 = prepare(img, ann, out)
    assert s2["written"] == 0  # nothing redone
    assert not any(r["problems"] for r in check_dataset(out).values())
    ds = PairDataset(out, "train", 64)
    assert len(ds) == 1 and ds[0]["reference"].shape == (3, 64, 64)
    r = subprocess.run([sys.executable, "-m", "hptransfer", "data", "deepfashion", "--images", str(img),
                        "--annotations", str(ann), "--out", str(tmp_path / "cli"), "--size", "256x256"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote 3 images" in r.stdout
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fasion-resize-annotation-train.csv").write_text("name:keypoints_y:keypoints_x\nx.jpg: [1, 2]: [3]\n")
    (bad / "fasion-resize-pairs-train.csv").write_text("from,to\n")
    with pytest.raises(PrepareError, match="row 2"):
        prepare(img, bad, tmp_path / "o2")
