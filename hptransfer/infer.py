"""``hptransfer infer``: one image of the reference person in a target pose, and the pose readers
that ``hptransfer video`` shares.

Pose sources (all become OpenPose-18 (18, 2) (y, x) pixels of the pose's own image):

- our annotation CSV: ``poses.csv --pose-name NAME`` or ``poses.csv:NAME``;
- an OpenPose JSON (COCO-18 or BODY_25) or a COCO-17 keypoint JSON;
- an image: pose estimated with the optional ``mediapipe`` extra (``pip install "hptransfer[mediapipe]"``).

The reference image is fitted to the generator's R x R input exactly as in training
(:func:`hptransfer.data.dataset.fit_image`, white padding); the pose is mapped by the same transform
from its image size: the estimated image's size, ``--pose-size HxW``, or else the reference's size.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def mediapipe_to_openpose18(landmarks, height: int, width: int, **kw) -> np.ndarray:
    """(33, 3|4) MediaPipe landmarks of an H x W image -> (18, 2) (y, x): the shared mapping
    :func:`hptransfer.pose.from_mediapipe33` (neck = shoulder midpoint, hips moved toward the
    shoulders by ``pose.MEDIAPIPE_HIP_SHIFT``), the same one the video-dataset preparation uses."""
    from hptransfer.pose import from_mediapipe33

    return from_mediapipe33(landmarks, (height, width), **kw)


def estimate_pose(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (18, 2) (y, x) with MediaPipe Pose (all missing when no person is found)."""
    try:
        import mediapipe as mp
    except ImportError:
        raise ImportError('pose estimation from images needs MediaPipe: pip install "hptransfer[mediapipe]"') from None
    h, w = image.shape[:2]
    with mp.solutions.pose.Pose(static_image_mode=True, model_complexity=2) as pose:
        res = pose.process(np.ascontiguousarray(image))
    if res.pose_landmarks is None:
        return np.full((18, 2), -1, np.float32)
    lm = np.array([(p.x, p.y, p.z, p.visibility) for p in res.pose_landmarks.landmark], np.float32)
    return mediapipe_to_openpose18(lm, h, w)


def parse_size(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``"256x176"`` -> (256, 176) (height x width)."""
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--pose-size must be HxW (e.g. 256x176), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"--pose-size must be positive, got {text!r}")
    return h, w


def _read_json_pose(path: Path, person: int = 0) -> np.ndarray:
    import json

    from hptransfer import pose

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON: {e}") from None
    if isinstance(data, dict) and "people" in data:
        return pose.read_openpose_json(path, person)
    return pose.read_coco17_json(path, person)


def read_pose(source: str, pose_name: Optional[str] = None, person: int = 0):
    """Read one pose. Returns ``(kp (18, 2) float32 (y, x), image_size (H, W) or None)``; the size is
    known only when the pose was estimated from an image."""
    from hptransfer.data import read_annotations

    path = Path(source)
    if not path.exists() and ":" in source:
        head, _, name = source.rpartition(":")
        if head.lower().endswith(".csv"):
            path, pose_name = Path(head), name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pose file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        if not pose_name:
            raise ValueError(f"{path}: an annotation CSV needs --pose-name NAME (or {path}:NAME)")
        ann = read_annotations(path)
        if pose_name not in ann:
            raise KeyError(f"{path}: no row named {pose_name!r}")
        return np.asarray(ann[pose_name], np.float32), None
    if suffix == ".json":
        return _read_json_pose(path, person), None
    if suffix in IMAGE_SUFFIXES:
        from hptransfer.data.dataset import load_image
        img = np.asarray(load_image(path))
        return estimate_pose(img), img.shape[:2]
    raise ValueError(f"{path}: unknown pose source (expected .csv, .json or an image)")


def fit_reference(path: str | Path, resolution: int):
    """Reference image file -> ((3, R, R) float32 in [-1, 1], original (H, W)), fitted as in training."""
    from hptransfer.data.dataset import fit_image, load_image, to_tensor

    img = load_image(Path(path))
    return to_tensor(fit_image(img, resolution)), (img.height, img.width)


def fit_pose(kp: np.ndarray, pose_size: tuple[int, int], resolution: int) -> torch.Tensor:
    """(18, 2) (y, x) of a pose_size image -> (18, 2) float32 tensor at R, by training's fit transform."""
    from hptransfer.data.dataset import fit_keypoints

    kp = np.asarray(kp, np.float32)
    bad = (kp >= 0).all(axis=1) & ((kp[:, 0] > pose_size[0] + 0.5) | (kp[:, 1] > pose_size[1] + 0.5))
    if bad.any():
        log.warning("pose has keypoints outside its %dx%d image (%d of them); pass --pose-size HxW if the pose "
                    "comes from an image of another size", pose_size[0], pose_size[1], int(bad.sum()))
    return torch.from_numpy(fit_keypoints(kp, pose_size[0], pose_size[1], resolution))


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """(3, H, W) float in [-1, 1] or uint8 -> image file, written atomically."""
    from PIL import Image

    from hptransfer.metrics import to_uint8

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(image.detach().cpu()[None])[0].permute(1, 2, 0).numpy()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(arr).save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="export directory (model.safetensors + config.json)")
    p.add_argument("--reference", required=True, help="image of the person (any size; fitted as in training)")
    p.add_argument("--pose", required=True, help="pose: CSV (+ --pose-name, or CSV:NAME), OpenPose/COCO JSON, or image")
    p.add_argument("--pose-name", default=None, help="row name in an annotation CSV")
    p.add_argument("--pose-size", default=None, help="HxW of the image the pose coordinates belong to "
                   "(default: the estimated image's size, else the reference's size)")
    p.add_argument("--person", type=int, default=0, help="which person in a multi-person JSON")
    p.add_argument("--out", required=True, help="output image (.png)")
    p.add_argument("--device", default=None, help="default: cuda when present")


def run(args) -> int:
    from hptransfer.export import generate, load_generator

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = load_generator(args.checkpoint, device=device)
    R = g.resolution
    ref, ref_size = fit_reference(args.reference, R)
    kp, est_size = read_pose(args.pose, args.pose_name, args.person)
    pose_size = parse_size(args.pose_size) or est_size or ref_size
    kp_r = fit_pose(kp, pose_size, R)
    if (kp_r < 0).any(dim=1).all():
        print(f"error: {args.pose}: no keypoint found")
        return 1
    out = generate(g, ref[None], kp_r[None])[0]
    save_image(out, args.out)
    print(f"wrote {args.out} ({R}x{R})")
    return 0
