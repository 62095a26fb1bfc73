"""PairDataset (fit, flip, errors) and make_loader (deterministic order, exact resume, sharding)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hptransfer.data import DataFormatError, PairDataset, make_loader, write_annotations, write_pairs
from hptransfer.pose import FLIP_PAIRS


def _make_dataset(root: Path, n: int = 6, h: int = 48, w: int = 32, seed: int = 0) -> dict:
    """n random-noise images (PNG: lossless) with random keypoints; pairs = all ordered pairs."""
    r = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    ann = {}
    for i in range(n):
        name = f"im{i}.png"
        Image.fromarray(r.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / name)
        kp = np.stack([r.integers(0, h, 18), r.integers(0, w, 18)], 1).astype(np.float32)
        kp[i % 18] = -1
        ann[name] = kp
    write_annotations(root / "annotations-train.csv", ann)
    write_pairs(root / "pairs-train.csv", [(a, b) for a in ann for b in ann if a != b])
    return ann


def test_item_shapes_and_pad_fit(tmp_path):
    ann = _make_dataset(tmp_path, h=48, w=32)
    ds = PairDataset(tmp_path, "train", 24, fit="pad")
    it = ds[0]
    assert it["reference"].shape == (3, 24, 24) and it["reference"].dtype == torch.float32
    assert it["kp_reference"].shape == (18, 2) and it["kp_reference"].dtype == torch.float32
    assert it["reference"].min() >= -1 and it["reference"].max() <= 1
    # 48x32 -> 24x16 placed at x offset 4: the 4 columns on each side are white (1.0).
    assert torch.all(it["reference"][:, :, :4] == 1) and torch.all(it["reference"][:, :, -4:] == 1)
    assert not torch.all(it["reference"][:, :, 4:20] == 1)
    a, _ = ds.pairs[0]
    src = ann[a]
    vis = (src >= 0).all(1)
    # Pixel-centre mapping, clamped into the image (a negative coordinate would read as missing).
    exp_y = np.clip((src[vis, 0] + 0.5) * 0.5 - 0.5, 0, 23)
    exp_x = np.clip((src[vis, 1] + 0.5) * 0.5 - 0.5 + 4, 0, 23)
    np.testing.assert_allclose(it["kp_reference"][vis, 0], exp_y, atol=1e-5)
    np.testing.assert_allclose(it["kp_reference"][vis, 1], exp_x, atol=1e-5)
    assert (it["kp_reference"][~vis] == -1).all()


def test_pad_fit_keypoint_lands_on_same_content(tmp_path):
    """A bright dot at a keypoint of a 64x44 image is still under the mapped keypoint at 32 px."""
    (tmp_path / "images").mkdir()
    a = np.zeros((64, 44, 3), np.uint8)
    a[38:42, 10:14] = 255  # dot centred at (39.5, 11.5)
    Image.fromarray(a).save(tmp_path / "images" / "a.png")
    kp = np.full((18, 2), -1.0, np.float32)
    kp[0] = (39.5, 11.5)
    write_annotations(tmp_path / "annotations-train.csv", {"a.png": np.rint(kp)})  # written as ints: (40, 12)
    write_pairs(tmp_path / "pairs-train.csv", [("a.png", "a.png")])
    for fit in ("pad", "resize"):
        it = PairDataset(tmp_path, "train", 32, fit=fit)[0]
        y, x = (int(round(float(v))) for v in it["kp_reference"][0])
        assert it["reference"][:, y, x].min() > 0.3, fit  # bright, not the black surround


def test_flip_semantics(tmp_path):
    _make_dataset(tmp_path)
    plain = PairDataset(tmp_path, "train", 24, flip=False)
    flipped = PairDataset(tmp_path, "train", 24, flip=True, seed=3)
    n_flipped = 0
    for i in range(len(plain)):
        p, f = plain[i], flipped[i]
        if torch.equal(p["reference"], f["reference"]):
            assert torch.equal(p["kp_reference"], f["kp_reference"]) and torch.equal(p["target"], f["target"])
            continue
        n_flipped += 1
        for img, kp in (("reference", "kp_reference"), ("target", "kp_target")):
            assert torch.equal(f[img], p[img].flip(-1))  # mirrored, both images of the pair together
            for a, b in FLIP_PAIRS + ((0, 0), (1, 1)):  # left/right swapped, x mirrored
                if (p[kp][a] >= 0).all():
                    assert f[kp][b, 0] == p[kp][a, 0] and f[kp][b, 1] == 23 - p[kp][a, 1]
                else:
                    assert (f[kp][b] == -1).all()
    assert 0 < n_flipped < len(plain)  # about half, seeded
    # same (seed, epoch, index) -> same flips; another epoch -> a different pattern
    again = PairDataset(tmp_path, "train", 24, flip=True, seed=3)
    assert all(torch.equal(again[i]["reference"], flipped[i]["reference"]) for i in range(len(plain)))
    pattern = lambda ds: [ds._flip_for(i) for i in range(len(ds))]  # noqa: E731
    p0 = pattern(flipped)
    flipped.set_epoch(1)
    assert pattern(flipped) != p0


def test_flip_twice_is_identity(tmp_path):
    from hptransfer.pose import flip_keypoints

    _make_dataset(tmp_path)
    plain = PairDataset(tmp_path, "train", 24, flip=False)
    flipped = PairDataset(tmp_path, "train", 24, flip=True, seed=3)
    i = next(i for i in range(len(plain)) if flipped._flip_for(i))
    p, f = plain[i], flipped[i]
    assert torch.equal(f["reference"].flip(-1), p["reference"])
    torch.testing.assert_close(flip_keypoints(f["kp_target"], 24), p["kp_target"], rtol=0, atol=1e-5)


def test_corrupt_image_named_and_skip_bad(tmp_path):
    _make_dataset(tmp_path, n=3)
    (tmp_path / "images" / "im1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataFormatError, match="im1.png"):
        PairDataset(tmp_path, "train", 16)  # header check at construction names the file
    ds = PairDataset(tmp_path, "train", 16, skip_bad=True)
    # im1's annotation row, then the 4 pairs naming im1; the 2 pairs of im0/im2 remain
    assert len(ds.problems) == 5 and "im1.png is unreadable" in ds.problems[0] and len(ds) == 2


def test_decode_failure_after_construction(tmp_path):
    _make_dataset(tmp_path, n=3)
    ds = PairDataset(tmp_path, "train", 16)
    ds_skip = PairDataset(tmp_path, "train", 16, skip_bad=True)
    data = (tmp_path / "images" / "im0.png").read_bytes()
    (tmp_path / "images" / "im0.png").write_bytes(data[: len(data) // 2])  # truncated: header reads, pixels don't
    with pytest.raises(DataFormatError, match="im0.png"):
        ds[0]
    item = ds_skip[0]  # skipped to the next readable pair
    assert item["index"] == 0 and ds_skip.decode_failures >= 1


def _order(loader):
    return [b["index"].tolist() for b in loader]


def test_loader_deterministic_and_exact_resume(tmp_path):
    _make_dataset(tmp_path, n=5)  # 20 pairs
    ds = PairDataset(tmp_path, "train", 16, flip=True)
    full = _order(make_loader(ds, 3, workers=0, seed=7, epoch=2))
    assert full == _order(make_loader(ds, 3, workers=0, seed=7, epoch=2))
    assert full != _order(make_loader(ds, 3, workers=0, seed=7, epoch=3))
    assert full != _order(make_loader(ds, 3, workers=0, seed=8, epoch=2))
    assert len(full) == 6 and len({i for b in full for i in b}) == 18  # drop_last, no repeats
    flips = lambda s: [ds._flip_for(i) for i in range(len(ds))]  # noqa: E731
    make_loader(ds, 3, workers=0, seed=7, epoch=2)
    f7 = flips(7)
    make_loader(ds, 3, workers=0, seed=8, epoch=2)
    assert flips(8) != f7  # the loader's seed also seeds the flips
    resumed = list(make_loader(ds, 3, workers=0, seed=7, epoch=2, skip_batches=4))
    assert [b["index"].tolist() for b in resumed] == full[4:]
    ref = list(make_loader(ds, 3, workers=0, seed=7, epoch=2))[4:]
    for a, b in zip(resumed, ref):
        assert torch.equal(a["reference"], b["reference"]) and torch.equal(a["kp_target"], b["kp_target"])


def test_loader_workers_match_in_process(tmp_path):
    _make_dataset(tmp_path, n=4)
    ds = PairDataset(tmp_path, "train", 16, flip=True)
    a = list(make_loader(ds, 4, workers=0, seed=1))
    b = list(make_loader(ds, 4, workers=2, seed=1))
    assert [x["index"].tolist() for x in a] == [x["index"].tolist() for x in b]
    assert all(torch.equal(x["reference"], y["reference"]) for x, y in zip(a, b))


def test_sharding_two_ranks_covers_split_once(tmp_path):
    _make_dataset(tmp_path, n=5)  # 20 pairs
    ds = PairDataset(tmp_path, "train", 16)
    shards = [[i for b in _order(make_loader(ds, 2, workers=0, seed=0, rank=r, world_size=2, drop_last=False))
               for i in b] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 10
    assert sorted(shards[0] + shards[1]) == list(range(20))
