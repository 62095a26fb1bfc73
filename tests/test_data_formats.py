"""Benchmark-format readers/writers: round trip, the real files' quirks, every validation error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hptransfer.data import DataFormatError, read_annotations, read_pairs, write_annotations, write_pairs

HEADER = "name:keypoints_y:keypoints_x\n"


def _kp_line(name, ys, xs):
    return f"{name}: {list(ys)}: {list(xs)}\n"


def _ys_xs(seed=0, h=256, w=176):
    r = np.random.default_rng(seed)
    ys, xs = r.integers(0, h, 18).tolist(), r.integers(0, w, 18).tolist()
    ys[3], xs[3] = -1, -1
    return ys, xs


def test_round_trip(tmp_path):
    r = np.random.default_rng(1)
    mapping = {}
    for i in range(5):
        kp = r.integers(0, 256, (18, 2)).astype(np.float32)
        kp[r.integers(18)] = -1
        mapping[f"sub/img{i:03d}.jpg"] = kp
    write_annotations(tmp_path / "a.csv", mapping)
    back = read_annotations(tmp_path / "a.csv")
    assert list(back) == list(mapping)
    for k in mapping:
        np.testing.assert_array_equal(back[k], mapping[k])
        assert back[k].dtype == np.float32 and back[k].shape == (18, 2)
    pairs = [("sub/img000.jpg", "sub/img001.jpg"), ("sub/img001.jpg", "sub/img000.jpg")]
    write_pairs(tmp_path / "p.csv", pairs)
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "from,to"
    assert list(read_pairs(tmp_path / "p.csv", known_names=mapping)) == pairs


def test_written_text_is_benchmark_format(tmp_path):
    kp = np.full((18, 2), -1.0)
    kp[0] = (40.4, 128.6)
    write_annotations(tmp_path / "a.csv", {"img001.jpg": kp})
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0] == "name:keypoints_y:keypoints_x"
    assert lines[1] == "img001.jpg: [40" + ", -1" * 17 + "]: [129" + ", -1" * 17 + "]"


def test_reads_verbatim_real_benchmark_snippet(tmp_path):
    # As in fasion-resize-annotation-train.csv (256x176 images, spaces after colons) and
    # fasion-resize-pairs-train.csv (leading index column, header ",from,to").
    ann = tmp_path / "fasion-resize-annotation-train.csv"
    ann.write_text(
        "name:keypoints_y:keypoints_x\n"
        "fashionMENDenimid0000008001_1front.jpg: [32, 59, 60, 100, 139, 58, 97, 135, 134, 195, 251, 135, 195, 251, "
        "27, 28, 31, 33]: [89, 88, 63, 57, 53, 114, 120, 124, 71, 70, 66, 106, 109, 112, 83, 95, 75, 103]\n"
        "fashionMENDenimid0000008001_2side.jpg: [33, 58, -1, -1, -1, 58, 97, 134, 132, 193, 249, -1, -1, -1, "
        "-1, 27, -1, 33]: [99, 90, -1, -1, -1, 91, 93, 97, 86, 88, 87, -1, -1, -1, -1, 103, -1, 92]\n")
    pairs = tmp_path / "fasion-resize-pairs-train.csv"
    pairs.write_text(",from,to\n"
                     "0,fashionMENDenimid0000008001_1front.jpg,fashionMENDenimid0000008001_2side.jpg\n"
                     "1,fashionMENDenimid0000008001_2side.jpg,fashionMENDenimid0000008001_1front.jpg\n")
    a = read_annotations(ann, size=(256, 176))
    front = a["fashionMENDenimid0000008001_1front.jpg"]
    assert tuple(front[0]) == (32, 89) and tuple(front[13]) == (251, 112)
    side = a["fashionMENDenimid0000008001_2side.jpg"]
    assert (side[[2, 3, 4, 11, 12, 13, 14, 16]] == -1).all() and tuple(side[15]) == (27, 103)
    p = read_pairs(pairs, known_names=a)
    assert p == [("fashionMENDenimid0000008001_1front.jpg", "fashionMENDenimid0000008001_2side.jpg"),
                 ("fashionMENDenimid0000008001_2side.jpg", "fashionMENDenimid0000008001_1front.jpg")]


BAD_ANNOTATIONS = [
    ("a.jpg: [1, 2]\n", "3 ':'-separated fields"),
    ("a.jpg: [1, 2]: [3, 4]: [5]\n", "3 ':'-separated fields"),
    ("a.jpg: [1, x" + ", 1" * 16 + "]: [" + ", ".join(["1"] * 18) + "]\n", "not a list of numbers"),
    ("a.jpg: [" + ", ".join(["1"] * 17) + "]: [" + ", ".join(["1"] * 18) + "]\n", "17 values, expected 18"),
    ("/etc/a.jpg: [" + ", ".join(["1"] * 18) + "]: [" + ", ".join(["1"] * 18) + "]\n", "absolute"),
    ("../a.jpg: [" + ", ".join(["1"] * 18) + "]: [" + ", ".join(["1"] * 18) + "]\n", "'..'"),
    ("a.jpg: [" + ", ".join(["-5"] * 18) + "]: [" + ", ".join(["1"] * 18) + "]\n", "negative coordinate"),
]


@pytest.mark.parametrize("line,problem", BAD_ANNOTATIONS)
def test_annotation_errors_name_file_and_row(tmp_path, line, problem):
    ys, xs = _ys_xs()
    p = tmp_path / "ann.csv"
    p.write_text(HEADER + _kp_line("good.jpg", ys, xs) + line)
    with pytest.raises(DataFormatError) as e:
        read_annotations(p)
    assert str(p) in str(e.value) and "row 3" in str(e.value) and problem in str(e.value)
    res = read_annotations(p, skip_bad=True)
    assert list(res) == ["good.jpg"] and len(res.problems) == 1 and "row 3" in res.problems[0]


def test_bad_header(tmp_path):
    p = tmp_path / "ann.csv"
    p.write_text("name,y,x\n")
    with pytest.raises(DataFormatError, match="row 1: header"):
        read_annotations(p)


def test_coordinates_outside_image(tmp_path):
    ys, xs = _ys_xs(h=256, w=176)
    xs[5] = 250  # inside 256 but outside a 176-wide image
    p = tmp_path / "ann.csv"
    p.write_text(HEADER + _kp_line("a.jpg", ys, xs))
    assert "a.jpg" in read_annotations(p)  # size unknown: no check
    with pytest.raises(DataFormatError, match=r"row 2: keypoint outside the 256x176 image"):
        read_annotations(p, size=(256, 176))
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.new("RGB", (176, 256)).save(img_dir / "a.jpg")
    with pytest.raises(DataFormatError, match=r"ann.csv: row 2: keypoint outside the 256x176 image"):
        read_annotations(p, image_dir=img_dir)


def test_missing_and_unreadable_images(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.new("RGB", (176, 256)).save(img_dir / "ok.jpg")
    (img_dir / "broken.jpg").write_bytes(b"not an image at all")
    ys, xs = _ys_xs()
    p = tmp_path / "ann.csv"
    p.write_text(HEADER + _kp_line("ok.jpg", ys, xs) + _kp_line("gone.jpg", ys, xs) + _kp_line("broken.jpg", ys, xs))
    with pytest.raises(DataFormatError, match=r"row 3: image file .*gone.jpg is missing"):
        read_annotations(p, image_dir=img_dir)
    res = read_annotations(p, image_dir=img_dir, skip_bad=True)
    assert list(res) == ["ok.jpg"] and res.sizes["ok.jpg"] == (256, 176)
    assert len(res.problems) == 2 and "row 4" in res.problems[1] and "broken.jpg is unreadable" in res.problems[1]


@pytest.mark.parametrize("line,problem", [
    ("a.jpg,zzz.jpg\n", "'zzz.jpg' that has no annotation"),
    ("a.jpg\n", "expected 2 comma-separated fields, got 1"),
    ("a.jpg,b.jpg,c.jpg\n", "expected 2 comma-separated fields, got 3"),
    ("a.jpg,../../etc/passwd\n", "'..'"),
    ("/abs/a.jpg,b.jpg\n", "absolute"),
])
def test_pair_errors_name_file_and_row(tmp_path, line, problem):
    p = tmp_path / "pairs.csv"
    p.write_text("from,to\na.jpg,b.jpg\n" + line)
    with pytest.raises(DataFormatError) as e:
        read_pairs(p, known_names={"a.jpg", "b.jpg"})
    assert str(p) in str(e.value) and "row 3" in str(e.value) and problem in str(e.value)
    res = read_pairs(p, known_names={"a.jpg", "b.jpg"}, skip_bad=True)
    assert list(res) == [("a.jpg", "b.jpg")] and len(res.problems) == 1


def test_pairs_header_variants(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text("src,dst\na,b\n")
    with pytest.raises(DataFormatError, match="row 1: header"):
        read_pairs(p)
    p.write_text(",from,to\n0,a.jpg,b.jpg\n1,a.jpg\n")
    with pytest.raises(DataFormatError, match="row 3: expected 3"):
        read_pairs(p)


def test_skip_bad_counts_on_cli(tmp_path, capsys):
    """`hptransfer data check` exits non-zero and reports each problem with its file and row."""
    from hptransfer.cli import main

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    ys, xs = _ys_xs(h=64, w=64)
    for n in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "images" / n)
    (root / "annotations-train.csv").write_text(HEADER + _kp_line("a.jpg", ys, xs) + _kp_line("b.jpg", ys, xs)
                                                + "c.jpg: [1]: [2]\n" + _kp_line("d.jpg", ys, xs))
    (root / "pairs-train.csv").write_text("from,to\na.jpg,b.jpg\nb.jpg,a.jpg\na.jpg,c.jpg\n")
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "problems found: 3" in out
    assert "annotations-train.csv: row 4" in out and "annotations-train.csv: row 5" in out
    assert "pairs-train.csv: row 4" in out
    lines = {l.split()[0]: l.split()[1:] for l in out.splitlines() if l.strip()}
    assert lines["images"] == ["2"] and lines["pairs"] == ["2"]
    assert main(["data", "check", str(root), "--skip-bad"]) == 0
    assert "skipped 3 bad rows/images" in capsys.readouterr().out


def test_pairs_with_extra_columns_are_read_with_a_note(tmp_path, caplog):
    import logging

    p = tmp_path / "pairs.csv"
    p.write_text("split,from,score,to\ntest,a.jpg,0.9,b.jpg\ntest,b.jpg,0.1,a.jpg\n")
    with caplog.at_level(logging.INFO):
        assert list(read_pairs(p)) == [("a.jpg", "b.jpg"), ("b.jpg", "a.jpg")]
        read_pairs(p)  # noted once per file, not at every read
    notes = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert notes == [f"{p}: columns 'split', 'score' ignored (a pair is its 'from' and 'to' columns)"]
    p.write_text("source,target\na.jpg,b.jpg\n")
    with pytest.raises(DataFormatError, match="row 1: header must name one 'from' and one 'to' column"):
        read_pairs(p)
