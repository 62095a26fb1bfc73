"""DALI loader (CPU-only mode) against the torch loader: same batch dicts, order, flips, sharding,
resume and errors. Tiny 64 px datasets in tmp dirs; pipelines are built per iteration, so tests
iterate few batches."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: E402,F401  (a pinned dependency: a missing install must fail, not skip)

from hptransfer.data import PairDataset, make_loader, write_annotations, write_pairs  # noqa: E402
from hptransfer.data.dali import (make_dali_loader, make_dali_loader_from_dataset,  # noqa: E402
                                  make_loader_for_config, resolve_loader)
from hptransfer.data.formats import DataFormatError  # noqa: E402
from hptransfer.pose import FLIP_PERMUTATION  # noqa: E402

R = 64
N_PAIRS = 12
# Image sizes (H, W): portrait (padded left/right), landscape (top/bottom), square, an odd one that
# needs upscaling, and one exactly R x R (no resize at all).
SIZES = [(96, 64), (48, 80), (128, 128), (37, 23), (64, 64), (100, 70)]

# Tolerances for DALI vs PIL in uint8 units (1 unit = 1/127.5 in [-1, 1]). Both decode with
# libjpeg-turbo and quantise to uint8 after the same antialiased triangle filter; DALI's float
# weights vs PIL's fixed-point ones round differently. Measured on these images at 32/64/100 px:
# max 2 units, mean 0.10-0.12. Bounds leave one unit of headroom on the max and ~3x on the mean; a
# wrong filter (nearest / no antialias), offset or pad is off by tens of units and fails.
MAX_ABS_UNITS = 3
MEAN_ABS_UNITS = 0.35


def _image(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth image with a distinct left/right structure (so a missed mirror shows)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 1, (3, 3)).astype(np.float32)
    img = np.stack([255 * (c[k, 0] * xx / w + c[k, 1] * yy / h + c[k, 2] * np.sin(xx / 5 + k)) / 3 + 60
                    for k in range(3)], axis=-1)
    img[: h // 3, : w // 4] = (20, 200, 40)  # an asymmetric block
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_dataset(root, n_images: int = 8, n_pairs: int = N_PAIRS, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    ann = {}
    for i in range(n_images):
        h, w = SIZES[i % len(SIZES)]
        name = f"p{i:02d}.jpg"
        Image.fromarray(_image(h, w, rng)).save(root / "images" / name, quality=95)
        kp = np.stack([rng.integers(0, h, 18), rng.integers(0, w, 18)], 1).astype(np.float32)
        kp[rng.random(18) < 0.2] = -1
        ann[name] = kp
    names = sorted(ann)
    pairs = [(names[i % n_images], names[(i * 3 + 1) % n_images]) for i in range(n_pairs)]
    write_annotations(root / "annotations-train.csv", ann)
    write_pairs(root / "pairs-train.csv", pairs)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return _make_dataset(tmp_path_factory.mktemp("dali") / "ds")


def _all(loader) -> list[dict]:
    return list(loader)


def _torch_batches(root, batch, *, flip=False, seed=0, epoch=0, rank=0, world_size=1, skip=0, shuffle=True):
    ds = PairDataset(root, "train", R, flip=flip, seed=seed)
    return _all(make_loader(ds, batch, workers=0, seed=seed, rank=rank, world_size=world_size, epoch=epoch,
                            skip_batches=skip, shuffle=shuffle, pin_memory=False))


@pytest.fixture(scope="module")
def flipped(data_root):
    """One epoch with flips from both loaders (shared: pipeline builds are the slow part)."""
    dali = _all(make_dali_loader(data_root, "train", R, 4, seed=3, epoch=1, flip=True, device="cpu", num_threads=1))
    ref = _torch_batches(data_root, 4, flip=True, seed=3, epoch=1)
    return dali, ref


def test_batch_dict_keys_dtypes_shapes_ranges(flipped):
    dali, ref = flipped
    assert len(dali) == len(ref) == N_PAIRS // 4
    for d, t in zip(dali, ref):
        assert set(d) == set(t) == {"reference", "target", "kp_reference", "kp_target", "index"}
        for k in d:
            assert d[k].dtype == t[k].dtype, (k, d[k].dtype, t[k].dtype)
            assert d[k].shape == t[k].shape, (k, d[k].shape, t[k].shape)
        assert d["reference"].shape == (4, 3, R, R) and d["kp_reference"].shape == (4, 18, 2)
        assert d["index"].dtype == torch.int64 and d["index"].shape == (4,)
        for k in ("reference", "target"):
            assert d[k].min() >= -1.0 and d[k].max() <= 1.0
            assert d[k].std() > 0.1  # not a blank image


def _check_close(d, t, what=""):
    for k in ("reference", "target"):
        diff = (d[k] - t[k]).abs() * 127.5  # uint8 units
        assert diff.max() <= MAX_ABS_UNITS, f"{what}{k}: max |DALI - PIL| = {diff.max():.2f} units"
        assert diff.mean() <= MEAN_ABS_UNITS, f"{what}{k}: mean |DALI - PIL| = {diff.mean():.3f} units"


def test_flips_match_torch_loader(flipped):
    """Same order, same flip decisions, keypoints bit-exact, images within resize/decoder rounding."""
    dali, ref = flipped
    flips = 0
    for d, t in zip(dali, ref):
        assert torch.equal(d["index"], t["index"])
        assert torch.equal(d["kp_reference"], t["kp_reference"])
        assert torch.equal(d["kp_target"], t["kp_target"])
        _check_close(d, t)
    flips = sum(1 for b in ref for i in b["index"].tolist() if _flip(i, seed=3, epoch=1))
    assert 0 < flips < N_PAIRS  # the epoch really exercised both branches


def _flip(index, *, seed, epoch):
    return bool(np.random.default_rng([seed, epoch, index]).random() < 0.5)


def test_flip_semantics(data_root):
    """A flipped sample = the unflipped one mirrored, keypoints mirrored and left/right swapped."""
    seed, epoch = 3, 1
    plain = _all(make_dali_loader(data_root, "train", R, 4, seed=seed, epoch=epoch, flip=False, device="cpu",
                                  num_threads=1))
    flipped = _all(make_dali_loader(data_root, "train", R, 4, seed=seed, epoch=epoch, flip=True, device="cpu",
                                    num_threads=1))
    perm = list(FLIP_PERMUTATION)
    seen = {True: 0, False: 0}
    for p, f in zip(plain, flipped):
        assert torch.equal(p["index"], f["index"])
        for j, idx in enumerate(p["index"].tolist()):
            fl = _flip(idx, seed=seed, epoch=epoch)
            seen[fl] += 1
            for img, kp in (("reference", "kp_reference"), ("target", "kp_target")):
                if not fl:
                    assert torch.equal(p[img][j], f[img][j]) and torch.equal(p[kp][j], f[kp][j])
                    continue
                assert torch.equal(f[img][j], p[img][j].flip(-1))
                exp = p[kp][j][perm].clone()
                vis = (exp >= 0).all(-1)  # pose.is_missing: any negative coordinate = missing
                exp[vis, 1] = R - 1 - exp[vis, 1]
                exp[~vis] = -1
                assert torch.equal(f[kp][j], exp)
                # left and right really swapped: r-shoulder (2) of the flip is the l-shoulder (5) mirrored
                if (p[kp][j][5] >= 0).all():
                    assert f[kp][j][2, 1] == R - 1 - p[kp][j][5, 1]
    assert seen[True] and seen[False]


def test_no_augmentation_equals_torch_without_shuffle(data_root):
    dali = _all(make_dali_loader_from_dataset(PairDataset(data_root, "train", R), 3, seed=0, shuffle=False,
                                              device="cpu", num_threads=2))
    ref = _torch_batches(data_root, 3, shuffle=False)
    assert [b["index"].tolist() for b in dali] == [list(range(i, i + 3)) for i in range(0, N_PAIRS, 3)]
    for d, t in zip(dali, ref):
        assert torch.equal(d["kp_reference"], t["kp_reference"]) and torch.equal(d["kp_target"], t["kp_target"])
        _check_close(d, t)
    # The padding is white (1.0) where PairDataset pads: a portrait image's left column.
    first = dali[0]["reference"][0]  # p00: 96 x 64 portrait -> padded left/right
    assert torch.all(first[:, :, 0] == 1.0)


@pytest.mark.parametrize("resolution,fit", [(32, "pad"), (128, "pad"), (48, "resize")])
def test_other_stages_and_fits_match_torch(data_root, resolution, fit):
    """A grown stage (down- and upscaling) and the anisotropic fit give PairDataset's batches too."""
    ds = PairDataset(data_root, "train", resolution, fit=fit, flip=True, seed=2)
    dali = _all(make_dali_loader_from_dataset(ds, 6, seed=2, epoch=3, device="cpu", num_threads=2))
    ref = _all(make_loader(ds, 6, workers=0, seed=2, epoch=3, pin_memory=False))
    assert len(dali) == len(ref) == N_PAIRS // 6
    for d, t in zip(dali, ref):
        assert d["reference"].shape == (6, 3, resolution, resolution)
        assert torch.equal(d["index"], t["index"]) and torch.equal(d["kp_reference"], t["kp_reference"])
        _check_close(d, t, f"{resolution} px {fit}: ")


def test_sharding_two_ranks_covers_split_once(data_root):
    seen = []
    for rank in range(2):
        batches = _all(make_dali_loader(data_root, "train", R, 2, seed=5, epoch=2, rank=rank, world_size=2,
                                        device="cpu", num_threads=1))
        ref = _torch_batches(data_root, 2, seed=5, epoch=2, rank=rank, world_size=2)
        assert [b["index"].tolist() for b in batches] == [b["index"].tolist() for b in ref]
        seen += [i for b in batches for i in b["index"].tolist()]
    assert sorted(seen) == list(range(N_PAIRS))


def test_resume_skip_batches(data_root):
    full = _torch_batches(data_root, 2, seed=7, epoch=0)
    resumed = make_dali_loader(data_root, "train", R, 2, seed=7, epoch=0, skip_batches=4, device="cpu",
                               num_threads=1)
    assert len(resumed) == len(full) - 4
    got = _all(resumed)
    assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in full[4:]]
    assert torch.equal(got[0]["kp_target"], full[4]["kp_target"])


def _broken_copy(data_root, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(data_root, root)
    return root


def test_truncated_image_error_names_file(data_root, tmp_path):
    root = _broken_copy(data_root, tmp_path)
    ds = PairDataset(root, "train", R)  # images checked (headers) at construction
    victim = root / "images" / ds.pairs[0][0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # header intact, body cut
    with pytest.raises(DataFormatError, match=str(victim)):
        _all(make_dali_loader_from_dataset(ds, 4, seed=0, shuffle=False, device="cpu", num_threads=1))


def test_missing_image_error_names_file(data_root, tmp_path):
    root = _broken_copy(data_root, tmp_path)
    ds = PairDataset(root, "train", R)
    victim = root / "images" / ds.pairs[1][1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=str(victim)):
        _all(make_dali_loader_from_dataset(ds, 4, seed=0, shuffle=False, device="cpu", num_threads=1))


def test_undecodable_image_error_names_file(data_root, tmp_path):
    """Header and markers fine, so only DALI's decoder fails: its error is re-raised naming the file."""
    root = _broken_copy(data_root, tmp_path)
    ds = PairDataset(root, "train", R)
    victim = root / "images" / ds.pairs[0][1]
    data = bytearray(victim.read_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 11] = 0  # first component's sampling factors 0x0: PIL's lazy open accepts, libjpeg refuses
    victim.write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match=str(victim)) as exc:
        _all(make_dali_loader_from_dataset(ds, 4, seed=0, shuffle=False, device="cpu", num_threads=1))
    assert "DALI" in str(exc.value) and exc.value.__cause__ is not None  # the decoder's error, re-raised


def test_skip_bad_replaces_pair_like_torch(data_root, tmp_path):
    root = _broken_copy(data_root, tmp_path)
    ds = PairDataset(root, "train", R, skip_bad=True)
    victim = root / "images" / ds.pairs[0][0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # corrupted after the dataset checked the headers
    loader = make_dali_loader_from_dataset(ds, 4, seed=0, shuffle=False, device="cpu", num_threads=1)
    got = _all(loader)
    ref = _all(make_loader(ds, 4, workers=0, seed=0, shuffle=False, pin_memory=False))
    assert loader.skipped >= 1
    assert len(got) == len(ref)
    for d, t in zip(got, ref):
        assert torch.equal(d["index"], t["index"]) and torch.equal(d["kp_reference"], t["kp_reference"])
        _check_close(d, t)
    assert ds.decode_failures >= 1  # the torch loader really replaced the same pair


def test_loader_choice_for_config(data_root):
    from hptransfer.config import DataConfig

    assert resolve_loader("auto", "cpu") == "torch"
    assert resolve_loader("dali", "cpu") == "dali"
    with pytest.raises(ValueError):
        resolve_loader("fast", "cpu")
    ds = PairDataset(data_root, "train", R)
    torch_loader = make_loader_for_config(DataConfig(loader="auto", workers=0), ds, 4, device="cpu", seed=0)
    assert isinstance(torch_loader, torch.utils.data.DataLoader)
    dali_loader = make_loader_for_config(DataConfig(loader="dali", workers=1), ds, 4, device="cpu", seed=0,
                                         skip_batches=1)
    assert len(dali_loader) == len(torch_loader) - 1


# nvJPEG (GPU decode) may upsample chroma and round its IDCT differently from libjpeg-turbo, so the
# GPU path gets looser bounds than the CPU path: still far below what a wrong filter/offset gives.
GPU_MAX_ABS_UNITS = 12
GPU_MEAN_ABS_UNITS = 1.5


@pytest.mark.cuda
def test_gpu_decode_matches_torch_loader(data_root):
    ds = PairDataset(data_root, "train", R, flip=True, seed=1)
    dali = _all(make_dali_loader_from_dataset(ds, 4, seed=1, epoch=0, device="gpu", num_threads=2))
    ref = _all(make_loader(ds, 4, workers=0, seed=1, epoch=0, pin_memory=False))
    assert len(dali) == len(ref) > 0
    for d, t in zip(dali, ref):
        assert d["reference"].is_cuda and d["target"].is_cuda and not d["kp_reference"].is_cuda
        assert torch.equal(d["index"], t["index"]) and torch.equal(d["kp_target"], t["kp_target"])
        for k in ("reference", "target"):
            diff = (d[k].cpu() - t[k]).abs() * 127.5
            assert diff.max() <= GPU_MAX_ABS_UNITS and diff.mean() <= GPU_MEAN_ABS_UNITS, (k, diff.max(), diff.mean())
