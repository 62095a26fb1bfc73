"""Pose: heatmaps (eq. 1), local descriptors, crop geometry, format conversion and flips."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import random_keypoints
from hptransfer import ops, pose
from hptransfer.ops import gather_crops_reference


# ---------------------------------------------------------------- heatmaps

def test_heatmap_maxima_at_keypoints():
    # image 64 -> map 32: image pixel 2k + 0.5 is map pixel k exactly (pixel centres aligned)
    kp = torch.full((2, 18, 2), -1.0)
    cells = [(3, 5), (10, 20), (31, 0), (0, 31), (16, 16)]
    for i, (y, x) in enumerate(cells):
        kp[0, i] = torch.tensor([2 * y + 0.5, 2 * x + 0.5])
    kp[1, 7] = torch.tensor([2 * 7 + 0.5, 2 * 9 + 0.5])
    maps = ops.heatmaps(kp, (64, 64), (32, 32), impl="reference")
    assert maps.shape == (2, 18, 32, 32) and maps.dtype == torch.float32
    for i, (y, x) in enumerate(cells):
        assert divmod(int(maps[0, i].argmax()), 32) == (y, x)
        assert float(maps[0, i, y, x]) == pytest.approx(1.0)
    assert divmod(int(maps[1, 7].argmax()), 32) == (7, 9)
    # every keypoint not set above is missing: all-zero map
    assert maps[0, len(cells):].abs().max() == 0 and maps[1, :7].abs().max() == 0 and maps[1, 8:].abs().max() == 0


def test_missing_is_any_negative_coordinate():
    kp = torch.full((1, 18, 2), 10.0)
    kp[0, 0] = torch.tensor([-1.0, 5.0])
    kp[0, 1] = torch.tensor([5.0, -3.0])
    maps = ops.heatmaps(kp, (32, 32), (32, 32), impl="reference")
    assert maps[0, :2].abs().max() == 0 and maps[0, 2:].amax(dim=(1, 2)).min() > 0.99


@pytest.mark.parametrize("sigma", [1.5, 3.2, 5.0])
def test_sigma_honoured_fwhm(sigma):
    # the full width at half maximum of exp(-d^2 / 2 sigma^2) is 2 sqrt(2 ln 2) sigma
    kp = torch.full((1, 18, 2), -1.0)
    kp[0, 0] = torch.tensor([32.0, 32.0])
    m = ops.heatmaps(kp, (64, 64), (64, 64), sigma=sigma, impl="reference")[0, 0]
    row = m[32].double()
    xs = torch.arange(64, dtype=torch.float64)
    above = xs[row >= 0.5]
    # half-max crossing by linear interpolation on each side
    lo, hi = int(above.min()), int(above.max())
    left = lo - (row[lo] - 0.5) / (row[lo] - row[lo - 1])
    right = hi + (row[hi] - 0.5) / (row[hi] - row[hi + 1])
    fwhm = float(right - left)
    assert fwhm == pytest.approx(2 * math.sqrt(2 * math.log(2)) * sigma, rel=0.03)
    # exact value at a distance of 2 px
    assert float(m[32, 34]) == pytest.approx(math.exp(-4 / (2 * sigma * sigma)), rel=1e-5)


def test_default_sigma_scales_with_map():
    assert pose.default_sigma(32) == pytest.approx(3.2)
    assert pose.default_sigma(128) == pytest.approx(12.8)
    kp = torch.full((1, 18, 2), -1.0)
    kp[0, 0] = torch.tensor([64.0, 64.0])
    m = ops.heatmaps(kp, (128, 128), (128, 128), impl="reference")[0, 0]
    assert float(m[64, 64 + 10]) == pytest.approx(math.exp(-100 / (2 * 12.8 ** 2)), rel=1e-5)


def test_heatmaps_multi_matches_single(rng):
    kp = random_keypoints(2, 256, rng, missing=2)
    multi = ops.heatmaps_multi(kp, (256, 256), [(32, 32), (64, 64)], impl="reference")
    for m, s in zip(multi, (32, 64)):
        torch.testing.assert_close(m, ops.heatmaps(kp, (256, 256), (s, s), impl="reference"))
    with pytest.raises(ValueError, match=r"\(B, 18, 2\)"):
        ops.heatmaps(torch.zeros(1, 17, 2), (64, 64), (32, 32))


# ---------------------------------------------------------------- local descriptors

@pytest.mark.parametrize("resolution, count", [(64, 18), (128, 18), (256, 31), (512, 31), (1024, 44)])
def test_descriptor_counts_and_crop_size(resolution, count, rng):
    assert pose.descriptor_count(resolution) == count
    assert pose.crop_size(resolution) == resolution // 8
    centers, valid = pose.local_descriptors(random_keypoints(2, resolution, rng), resolution)
    assert centers.shape == (2, count, 2) and valid.shape == (2, count) and valid.all()


def test_descriptor_positions(rng):
    kp = random_keypoints(1, 1024, rng)
    c18, _ = pose.local_descriptors(kp, 64)
    torch.testing.assert_close(c18, kp)
    c31, _ = pose.local_descriptors(kp, 256)
    c44, _ = pose.local_descriptors(kp, 1024)
    torch.testing.assert_close(c31[:, :18], kp)
    # the neck (1) - nose (0) limb: midpoint at 31, thirds at 44 (from the neck)
    neck, nose = kp[0, 1], kp[0, 0]
    torch.testing.assert_close(c31[0, 18], (neck + nose) / 2)
    torch.testing.assert_close(c44[0, 18], neck + (nose - neck) / 3)
    torch.testing.assert_close(c44[0, 18 + 13], neck + 2 * (nose - neck) / 3)
    limbs = pose.DESCRIPTOR_LIMBS
    assert len(limbs) == 13 and len({frozenset(l) for l in limbs}) == 13
    for i, (a, b) in enumerate(limbs):
        torch.testing.assert_close(c31[0, 18 + i], (kp[0, a] + kp[0, b]) / 2)
        torch.testing.assert_close(c44[0, 18 + i], kp[0, a] + (kp[0, b] - kp[0, a]) / 3)
        torch.testing.assert_close(c44[0, 31 + i], kp[0, a] + 2 * (kp[0, b] - kp[0, a]) / 3)
    # every body keypoint but the face's (14-17) ends some limb
    assert set(range(14)) == {k for l in limbs for k in l}


def test_descriptors_invalid_when_limb_end_missing(rng):
    kp = random_keypoints(1, 256, rng)
    kp[0, 3] = -1  # right elbow
    centers, valid = pose.local_descriptors(kp, 256)
    bad = {3} | {18 + i for i, l in enumerate(pose.DESCRIPTOR_LIMBS) if 3 in l}
    assert bad == {3, 18 + 2, 18 + 3}
    assert {int(i) for i in torch.nonzero(~valid[0]).flatten()} == bad
    assert (centers[0, sorted(bad)] == -1).all()


# ---------------------------------------------------------------- crop geometry

def _image(H=16, W=16, C=2):
    return torch.arange(C * H * W, dtype=torch.float32).view(1, C, H, W) + 1  # no zeros inside


@pytest.mark.parametrize("size", [4, 5])
def test_crop_inside_equals_slice(size):
    img = _image()
    crops = gather_crops_reference(img, torch.tensor([[[7.4, 9.6]]]), size)  # rounds to (7, 10)
    top, left = 7 - size // 2, 10 - size // 2
    torch.testing.assert_close(crops[0], img[0, :, top:top + size, left:left + size])


def test_crop_partly_outside_is_zero_padded_not_shifted():
    img = _image()
    crops = gather_crops_reference(img, torch.tensor([[[1.0, 15.0]]]), 6)  # top-left (-2, 12)
    c = crops[0]
    assert (c[:, :2] == 0).all() and (c[:, :, 4:] == 0).all()  # rows above, columns right of the image
    torch.testing.assert_close(c[:, 2:, :4], img[0, :, 0:4, 12:16])


def test_crop_fully_outside_and_invalid_are_zero():
    img = _image()
    centers = torch.tensor([[[40.0, 40.0], [-1.0, 5.0], [5.0, -1.0], [8.0, 8.0]]])
    crops = gather_crops_reference(img, centers, 4)
    assert crops.shape == (4, 2, 4, 4)
    assert (crops[:3] == 0).all() and (crops[3] != 0).all()
    # round half up: 6.5 -> 7
    half = gather_crops_reference(img, torch.tensor([[[6.5, 6.5]]]), 2)
    torch.testing.assert_close(half[0], img[0, :, 6:8, 6:8])


# ---------------------------------------------------------------- formats and flips

def test_from_coco17_json(tmp_path):
    xyv = np.zeros((17, 3), dtype=np.float32)
    for i in range(17):
        xyv[i] = (10 + i, 100 + i, 2)  # x, y, visible
    xyv[9] = (0, 0, 0)  # COCO 9 = left wrist, not labelled
    p = tmp_path / "person.json"
    p.write_text(json.dumps({"annotations": [{"keypoints": xyv.flatten().tolist()}]}))
    kp = pose.read_coco17_json(p)
    assert kp.shape == (18, 2) and kp.dtype == np.float32
    assert tuple(kp[0]) == (100, 10)  # nose, (y, x)
    assert tuple(kp[5]) == (105, 15) and tuple(kp[2]) == (106, 16)  # COCO 5 = left, 6 = right shoulder
    assert tuple(kp[1]) == (105.5, 15.5)  # neck = shoulder midpoint
    assert tuple(kp[15]) == (101, 11) and tuple(kp[14]) == (102, 12)  # COCO 1 = left eye, 2 = right eye
    assert tuple(kp[10]) == (116, 26) and tuple(kp[13]) == (115, 25)  # ankles
    assert tuple(kp[7]) == (-1, -1)  # left wrist missing
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"keypoints": [1, 2, 3]}]))
    with pytest.raises(ValueError, match="bad.json"):
        pose.read_coco17_json(bad)


def test_from_body25_json(tmp_path):
    xyc = np.zeros((25, 3), dtype=np.float32)
    for i in range(25):
        xyc[i] = (200 + i, 300 + i, 0.9)
    xyc[4] = (0, 0, 0.0)  # right wrist undetected
    p = tmp_path / "frame_keypoints.json"
    p.write_text(json.dumps({"version": 1.3, "people": [{"pose_keypoints_2d": xyc.flatten().tolist()}]}))
    kp = pose.read_openpose_json(p)
    assert tuple(kp[1]) == (301, 201)  # neck
    assert tuple(kp[8]) == (309, 209)  # BODY_25 9 = right hip (8 is the mid-hip, dropped)
    assert tuple(kp[13]) == (314, 214)  # BODY_25 14 = left ankle
    assert tuple(kp[17]) == (318, 218)  # left ear
    assert tuple(kp[4]) == (-1, -1)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"people": []}))
    assert (pose.read_openpose_json(empty) == -1).all()
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"people": [{"pose_keypoints_2d": [0.0] * 60}]}))
    with pytest.raises(ValueError, match="wrong.json.*60"):
        pose.read_openpose_json(wrong)


def test_flip(rng):
    kp = random_keypoints(3, 64, rng)
    kp[0, 4] = -1
    once = pose.flip_keypoints(kp, 64)
    # left and right swap, x mirrors, y stays
    torch.testing.assert_close(once[1, 2], torch.stack([kp[1, 5, 0], 63 - kp[1, 5, 1]]))
    torch.testing.assert_close(once[1, 0], torch.stack([kp[1, 0, 0], 63 - kp[1, 0, 1]]))
    assert (once[0, 7] == -1).all()  # the missing right wrist is now the (missing) left wrist
    torch.testing.assert_close(pose.flip_keypoints(once, 64), kp)
    arr = kp[1].numpy()
    assert np.allclose(pose.flip_keypoints(pose.flip_keypoints(arr, 64), 64), arr)
    assert isinstance(pose.flip_keypoints(arr, 64), np.ndarray)


def _descriptors_by_limbs(kp, count):
    """The geometry written out limb by limb (the implementation before the linear map): the spec."""
    present = ~pose.is_missing(kp)
    centers, valid = [kp], [present]
    a = torch.tensor([limb[0] for limb in pose.DESCRIPTOR_LIMBS])
    b = torch.tensor([limb[1] for limb in pose.DESCRIPTOR_LIMBS])
    for t in pose.DESCRIPTOR_FRACTIONS[count]:
        centers.append(kp[:, a] + (kp[:, b] - kp[:, a]) * t)
        valid.append(present[:, a] & present[:, b])
    centers, valid = torch.cat(centers, 1), torch.cat(valid, 1)
    return torch.where(valid.unsqueeze(-1), centers, torch.full_like(centers, -1.0)), valid


@pytest.mark.parametrize("count", [18, 31, 44])
def test_descriptor_linear_map_equals_limb_geometry(count):
    g = torch.Generator().manual_seed(count)
    kp = torch.rand(5, 18, 2, generator=g) * 1023
    kp[0, 3] = -1  # a missing elbow: its limbs' descriptors are invalid
    kp[1, :] = -1  # nobody
    kp[2, 9, 1] = -1  # one negative coordinate is missing too
    centers, valid = pose.local_descriptors(kp, 1024, count)
    want_c, want_v = _descriptors_by_limbs(kp, count)
    assert torch.equal(valid, want_v)
    torch.testing.assert_close(centers, want_c, rtol=0, atol=2e-4)  # fp32 rounding of a 1024-px image
    assert (centers[~valid] == -1).all() and not valid[1].any()
    w = pose.descriptor_matrix(count)
    assert w.shape == (count, 18) and np.allclose(w.sum(1), 1.0)  # every descriptor is a convex combination
