"""OpenPose-18 keypoints: names, flip and limb pairs, format conversion, heatmap sigma, local descriptors and a
step's descriptor geometry. Pure geometry: nothing here dispatches to a kernel (the heatmaps are ``ops.heatmaps``).

Keypoints are tensors (B, 18, 2) holding (y, x) in pixels of the image they belong to;
a missing keypoint is (-1, -1) (any negative coordinate counts as missing).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from hptransfer.errors import InputError

KEYPOINT_NAMES = (
    "nose", "neck",
    "r_shoulder", "r_elbow", "r_wrist",
    "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle",
    "l_hip", "l_knee", "l_ankle",
    "r_eye", "l_eye", "r_ear", "l_ear",
)
NUM_KEYPOINTS = 18
MISSING = -1

# Left/right pairs swapped by a horizontal flip.
FLIP_PAIRS = ((2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17))
FLIP_PERMUTATION = list(range(NUM_KEYPOINTS))
for _a, _b in FLIP_PAIRS:
    FLIP_PERMUTATION[_a], FLIP_PERMUTATION[_b] = _b, _a
FLIP_PERMUTATION = tuple(FLIP_PERMUTATION)

# OpenPose's 17 limbs (for drawing skeletons).
LIMB_PAIRS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)

# The 13 body limbs along which local descriptors are interpolated (no face-internal limbs:
# the face is already covered by nose/eyes/ears; hands and feet have no keypoints).
DESCRIPTOR_LIMBS = (
    (1, 0),                       # neck - nose
    (1, 2), (2, 3), (3, 4),       # right arm
    (1, 5), (5, 6), (6, 7),       # left arm
    (1, 8), (8, 9), (9, 10),      # neck - right hip, right leg
    (1, 11), (11, 12), (12, 13),  # neck - left hip, left leg
)
# Fractions along each limb: 31 = 18 keypoints + 13 midpoints; 44 = 18 + 13 x {1/3, 2/3}.
DESCRIPTOR_FRACTIONS = {18: (), 31: (0.5,), 44: (1.0 / 3.0, 2.0 / 3.0)}

# COCO-17 order -> OpenPose-18 index (neck is the midpoint of the shoulders).
COCO17_TO_OPENPOSE18 = {0: 0, 1: 15, 2: 14, 3: 17, 4: 16, 5: 5, 6: 2, 7: 6, 8: 3, 9: 7, 10: 4,
                        11: 11, 12: 8, 13: 12, 14: 9, 15: 13, 16: 10}
# BODY_25 index -> OpenPose-18 index (BODY_25 adds mid-hip 8 and feet 19..24).
BODY25_TO_OPENPOSE18 = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 9: 8, 10: 9, 11: 10,
                        12: 11, 13: 12, 14: 13, 15: 14, 16: 15, 17: 16, 18: 17}


def descriptor_count(resolution: int, setting: int | str = "auto") -> int:
    """Descriptors per image at ``resolution``: with ``setting`` "auto" the paper's rule (section 3.4):
    18 at 64/128 px, 31 at 256/512 px, 44 at 1024 px; otherwise ``setting`` itself (0, 18, 31 or 44:
    ``loss.descriptors``, Fig. 4)."""
    if setting != "auto":
        if setting not in (0, *DESCRIPTOR_FRACTIONS):
            raise ValueError(f"descriptor count must be auto, 0, 18, 31 or 44, got {setting!r}")
        return int(setting)
    if resolution <= 128:
        return 18
    if resolution <= 512:
        return 31
    return 44


def crop_size(resolution: int) -> int:
    """Local region side: one eighth of the image resolution (section 3.2)."""
    return max(resolution // 8, 1)


def is_missing(kp: torch.Tensor) -> torch.Tensor:
    """(..., 2) -> (...) bool: a keypoint with any negative coordinate is missing."""
    return (kp < 0).any(dim=-1)


def flip_keypoints(kp: torch.Tensor | np.ndarray, width: int):
    """Mirror (..., 18, 2) (y, x) keypoints of an image ``width`` px wide and swap left/right."""
    is_np = isinstance(kp, np.ndarray)
    t = torch.as_tensor(kp).clone()
    missing = is_missing(t)
    t[..., 1] = width - 1 - t[..., 1]
    t[missing] = MISSING
    t = t[..., list(FLIP_PERMUTATION), :]
    return t.numpy() if is_np else t


# ---------------------------------------------------------------- heatmap width (eq. 1; the maps are ops.heatmaps)

def default_sigma(map_size: int, bottleneck_sigma: float = 3.2, bottleneck_size: int = 32) -> float:
    """The paper's sigma=3.2 is read as pixels of the 32x32 bottleneck grid; it scales with the map."""
    return bottleneck_sigma * map_size / bottleneck_size


# ---------------------------------------------------------------- local descriptors (section 3.2)

def descriptor_matrix(count: int) -> np.ndarray:
    """(count, 18) weights: descriptor d = sum_k W[d, k] * keypoint k. The first 18 rows are the identity;
    then per fraction t of :data:`DESCRIPTOR_FRACTIONS` one row per limb (a, b) with 1 - t at a and t at b."""
    if count not in DESCRIPTOR_FRACTIONS:
        raise ValueError(f"descriptor count must be one of {sorted(DESCRIPTOR_FRACTIONS)}, got {count}")
    rows = [np.eye(NUM_KEYPOINTS)]
    for t in DESCRIPTOR_FRACTIONS[count]:
        limb_rows = np.zeros((len(DESCRIPTOR_LIMBS), NUM_KEYPOINTS))
        for i, (a, b) in enumerate(DESCRIPTOR_LIMBS):
            limb_rows[i, a], limb_rows[i, b] = 1.0 - t, t
        rows.append(limb_rows)
    return np.concatenate(rows)


@functools.lru_cache(maxsize=32)
def _descriptor_constants(count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights (N, 18) float32 and their support (N, 18) float32 on ``device``, made once per device
    (so a training step copies nothing from the host)."""
    w = torch.from_numpy(descriptor_matrix(count)).to(torch.float32)
    return w.to(device), (w != 0).to(torch.float32).to(device)


def local_descriptors(kp: torch.Tensor, resolution: int, count: Optional[int] = None):
    """Descriptor centres for the local losses.

    Returns ``(centers (B, N, 2) float (y, x) pixels, valid (B, N) bool)`` with N = 18 / 31 / 44 by
    resolution (or ``count``). The first 18 are the keypoints; the rest lie on
    :data:`DESCRIPTOR_LIMBS` at :data:`DESCRIPTOR_FRACTIONS` (midpoints for 31; thirds for 44).
    A descriptor is invalid when a keypoint it is made from is missing; invalid centres are -1.
    Computed as one linear map, :func:`descriptor_matrix` (a per-device constant): no host sync.
    """
    n = count if count is not None else descriptor_count(resolution)
    if n not in DESCRIPTOR_FRACTIONS:
        raise ValueError(f"descriptor count must be one of {sorted(DESCRIPTOR_FRACTIONS)}, got {n}")
    kp = kp.to(torch.float32)
    weights, support = _descriptor_constants(n, kp.device)
    missing = is_missing(kp).to(torch.float32)  # (B, 18)
    valid = (missing.unsqueeze(1) * support).sum(-1) == 0  # no missing keypoint among a descriptor's endpoints
    # missing keypoints are (-1, -1): zeroed first so an invalid descriptor's arithmetic stays finite.
    # A broadcast product and sum, not torch.matmul: TF32 matmuls would move centres by up to ~1 px at 1024.
    present_kp = torch.where(missing.bool().unsqueeze(-1), torch.zeros_like(kp), kp)
    centers = (weights.unsqueeze(0).unsqueeze(-1) * present_kp.unsqueeze(1)).sum(2)
    centers = torch.where(valid.unsqueeze(-1), centers, torch.full_like(centers, MISSING))
    return centers, valid


@dataclasses.dataclass(frozen=True)
class StepGeometry:
    """A training step's local geometry, built once from the keypoints and handed to every local term.

    ``target_centers`` / ``target_valid``: the target pose's descriptors (B, N, 2) / (B, N), where the
    generated and target images are cropped. ``reference_centers`` / ``reference_valid``: where the
    reference image is cropped for the discriminator pairs: the reference's own descriptors (the same
    body part), or the target's with ``reference_at="target"``. ``crop``: the crop side, R / 8.
    N = 0 (``loss.descriptors: 0``) gives empty tensors.
    """

    resolution: int
    crop: int
    target_centers: torch.Tensor
    target_valid: torch.Tensor
    reference_centers: torch.Tensor
    reference_valid: torch.Tensor

    @property
    def count(self) -> int:
        return self.target_centers.shape[1]

    @property
    def pair_valid(self) -> torch.Tensor:
        """(B, N) bool: descriptor d usable for a discriminator pair (valid in both poses)."""
        return self.reference_valid & self.target_valid

    @classmethod
    def from_keypoints(cls, kp_reference: torch.Tensor, kp_target: torch.Tensor, resolution: int,
                       count: Optional[int] = None, reference_at: str = "reference",
                       device: Optional[torch.device] = None) -> "StepGeometry":
        """From (B, 18, 2) (y, x) keypoints at ``resolution`` (moved to ``device`` once when given);
        ``count`` descriptors per image (default: the paper's rule at ``resolution``)."""
        if reference_at not in ("reference", "target"):
            raise ValueError(f"reference_at must be 'reference' or 'target', got {reference_at!r}")
        if device is not None:
            kp_reference, kp_target = kp_reference.to(device), kp_target.to(device)
        n = descriptor_count(resolution) if count is None else count
        if n == 0:
            empty = kp_target.new_zeros(kp_target.shape[0], 0, 2, dtype=torch.float32)
            none = empty.new_zeros(empty.shape[:2], dtype=torch.bool)
            return cls(resolution, crop_size(resolution), empty, none, empty, none)
        centers_t, valid_t = local_descriptors(kp_target, resolution, n)
        if reference_at == "target":
            centers_r, valid_r = centers_t, valid_t
        else:
            centers_r, valid_r = local_descriptors(kp_reference, resolution, n)
        return cls(resolution, crop_size(resolution), centers_t, valid_t, centers_r, valid_r)


# ---------------------------------------------------------------- conversion from other formats

def _empty(num: int = NUM_KEYPOINTS) -> np.ndarray:
    return np.full((num, 2), MISSING, dtype=np.float32)


def from_coco17(xyv: np.ndarray, min_confidence: float = 0.0) -> np.ndarray:
    """COCO-17 keypoints (17, 3) as (x, y, visibility/score) -> OpenPose-18 (18, 2) (y, x).

    The neck is the midpoint of both shoulders when both are present.
    """
    xyv = np.asarray(xyv, dtype=np.float32).reshape(17, -1)
    out = _empty()
    for c, o in COCO17_TO_OPENPOSE18.items():
        x, y = xyv[c, 0], xyv[c, 1]
        v = xyv[c, 2] if xyv.shape[1] > 2 else 1.0
        if v > min_confidence and x >= 0 and y >= 0:
            out[o] = (y, x)
    if (out[2] >= 0).all() and (out[5] >= 0).all():
        out[1] = (out[2] + out[5]) / 2
    return out


def from_body25(xyc: np.ndarray, min_confidence: float = 0.0) -> np.ndarray:
    """OpenPose BODY_25 (25, 3) (x, y, confidence) -> OpenPose-18 (18, 2) (y, x)."""
    xyc = np.asarray(xyc, dtype=np.float32).reshape(25, 3)
    out = _empty()
    for b, o in BODY25_TO_OPENPOSE18.items():
        x, y, c = xyc[b]
        if c > min_confidence:
            out[o] = (y, x)
    return out


def from_openpose18(xyc: np.ndarray, min_confidence: float = 0.0) -> np.ndarray:
    """OpenPose COCO-18 (18, 3) (x, y, confidence) -> (18, 2) (y, x)."""
    xyc = np.asarray(xyc, dtype=np.float32).reshape(18, 3)
    out = _empty()
    keep = xyc[:, 2] > min_confidence
    out[keep] = xyc[keep][:, [1, 0]]
    return out


def read_openpose_json(path: str | Path, person: int = 0, min_confidence: float = 0.05) -> np.ndarray:
    """Read a JSON file as OpenPose writes it (``people[i].pose_keypoints_2d``, COCO-18 or BODY_25).

    Returns (18, 2) (y, x); all missing when the file holds no person.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read OpenPose JSON: {e}") from None
    people = data.get("people") if isinstance(data, dict) else None
    if people is None:
        raise InputError(f"{path}: no 'people' list; is this an OpenPose JSON file?")
    if len(people) <= person:
        return _empty()
    flat = people[person].get("pose_keypoints_2d") or people[person].get("pose_keypoints")
    if flat is None:
        raise InputError(f"{path}: people[{person}] has no 'pose_keypoints_2d'")
    n = len(flat) // 3
    if len(flat) % 3 or n not in (18, 25):
        raise InputError(f"{path}: pose_keypoints_2d has {len(flat)} numbers; expected 54 (COCO-18) or 75 (BODY_25)")
    arr = np.asarray(flat, dtype=np.float32).reshape(n, 3)
    return from_openpose18(arr, min_confidence) if n == 18 else from_body25(arr, min_confidence)


def read_coco17_json(path: str | Path, person: int = 0, min_confidence: float = 0.0) -> np.ndarray:
    """Read COCO-style keypoints: a COCO annotation dict/list with ``keypoints`` (51 numbers)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read COCO JSON: {e}") from None
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or len(data) <= person or "keypoints" not in data[person]:
        raise InputError(f"{path}: expected a COCO annotation with 'keypoints' (person {person})")
    flat = data[person]["keypoints"]
    if len(flat) != 51:
        raise InputError(f"{path}: 'keypoints' has {len(flat)} numbers; COCO-17 has 51")
    return from_coco17(np.asarray(flat, dtype=np.float32).reshape(17, 3), min_confidence)


# MediaPipe Pose (33 landmarks) index -> OpenPose-18 index; the neck is the shoulders' midpoint.
MEDIAPIPE33_TO_OPENPOSE18 = {0: 0, 12: 2, 14: 3, 16: 4, 11: 5, 13: 6, 15: 7, 24: 8, 26: 9, 28: 10,
                             23: 11, 25: 12, 27: 13, 5: 14, 2: 15, 8: 16, 7: 17}
# MediaPipe's hip landmarks sit lower than OpenPose's (about 20 px on a 256 px full-body image, roughly
# a quarter of the shoulder-hip distance): each hip moves this fraction of the way to its shoulder.
MEDIAPIPE_HIP_SHIFT = 0.25


def from_mediapipe33(landmarks, image_size: Sequence[int], min_visibility: float = 0.5,
                     hip_shift: float = MEDIAPIPE_HIP_SHIFT) -> np.ndarray:
    """MediaPipe Pose landmarks -> OpenPose-18 (18, 2) float32 (y, x) pixels; -1 = missing.

    ``landmarks``: (33, >=2) array of normalised (x, y[, z[, visibility]]) in [0, 1], or
    mediapipe's landmark list (objects with ``.x .y .visibility``). ``image_size``: (H, W).
    A landmark with visibility < ``min_visibility`` or outside the image is missing. Hips are
    corrected toward the shoulders by ``hip_shift`` of the shoulder-hip vector (see above).
    """
    if hasattr(landmarks, "landmark"):
        landmarks = landmarks.landmark
    if len(landmarks) and hasattr(landmarks[0], "x"):
        landmarks = [(p.x, p.y, getattr(p, "z", 0.0), getattr(p, "visibility", 1.0)) for p in landmarks]
    lm = np.asarray(landmarks, dtype=np.float32)
    if lm.ndim != 2 or lm.shape[0] != 33 or lm.shape[1] < 2:
        raise ValueError(f"expected 33 MediaPipe landmarks (33, >=2), got shape {lm.shape}")
    h, w = image_size
    vis = lm[:, 3] if lm.shape[1] > 3 else np.ones(33, np.float32)
    out = _empty()
    for m, o in MEDIAPIPE33_TO_OPENPOSE18.items():
        y, x = lm[m, 1] * h, lm[m, 0] * w
        if vis[m] >= min_visibility and 0 <= y <= h - 1 and 0 <= x <= w - 1:
            out[o] = (y, x)
    for hip, shoulder in ((8, 2), (11, 5)):
        if (out[hip] >= 0).all() and (out[shoulder] >= 0).all():
            out[hip] = out[hip] + hip_shift * (out[shoulder] - out[hip])
    if (out[2] >= 0).all() and (out[5] >= 0).all():
        out[1] = (out[2] + out[5]) / 2
    return out
