"""Pieces shared by the dataset preparation tools (``hptransfer data deepfashion|h36m|video``).

Every tool writes the benchmark layout (``images/``, ``annotations-{split}.csv``,
``pairs-{split}.csv``), one image at a time and atomically, keeps a small manifest
(``.prepare-manifest.json``: name -> keypoints of each finished image) so an interrupted run
resumes without redoing finished images, and ends by running the data check on its output.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from hptransfer.data.formats import atomic_write_bytes, atomic_write_text, write_annotations, write_pairs
from hptransfer.errors import PrepareError  # noqa: F401  (public name here)

log = logging.getLogger(__name__)

MANIFEST = ".prepare-manifest.json"


class Manifest:
    """Finished images of one output folder: ``{name: (18, 2) (y, x) list}``, saved atomically.

    ``writes`` counts images written by this process (tests use it to check resumability).
    """

    def __init__(self, out: Path, settings: dict):
        self.out = Path(out)
        self.path = self.out / MANIFEST
        self.settings = settings
        self.done: dict[str, list] = {}
        self.writes = 0
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("settings") != settings:
                # A different size/crop: finished images do not match; redo them all.
                log.warning("%s: settings changed (%s -> %s); redoing every image", self.path,
                            data.get("settings"), settings)
            else:
                self.done = data.get("done", {})
        self._dirty = 0

    def is_done(self, name: str) -> bool:
        """True when ``name`` was finished by an earlier run and its image still exists."""
        return name in self.done and (self.out / "images" / name).exists()

    def keypoints(self, name: str) -> np.ndarray:
        """(18, 2) float32 (y, x) of a finished image."""
        return np.asarray(self.done[name], dtype=np.float32)

    def add(self, name: str, image, kp: np.ndarray, quality: int = 95) -> None:
        """Write ``image`` (PIL) as ``images/<name>`` atomically and record its keypoints (18, 2) (y, x)."""
        buf = io.BytesIO()
        fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
        image.convert("RGB").save(buf, format=fmt, quality=quality)
        atomic_write_bytes(self.out / "images" / name, buf.getvalue())
        self.done[name] = np.asarray(kp, dtype=np.float32).round(2).tolist()
        self.writes += 1
        self._dirty += 1
        if self._dirty >= 50:
            self.save()

    def save(self) -> None:
        """Write the manifest atomically (called every 50 images and at the end)."""
        atomic_write_text(self.path, json.dumps({"settings": self.settings, "done": self.done}))
        self._dirty = 0


def progress(items: Iterable, total: Optional[int] = None, desc: str = ""):
    """tqdm progress over ``items`` (stderr), or the plain iterable when tqdm is absent."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc, unit="img", leave=False)


def write_split(out: Path, split: str, annotations: dict, pairs: list) -> None:
    """Write ``annotations-<split>.csv`` and ``pairs-<split>.csv`` (atomically)."""
    names = sorted(annotations)
    write_annotations(out / f"annotations-{split}.csv", {n: annotations[n] for n in names})
    write_pairs(out / f"pairs-{split}.csv", pairs)
    log.info("%s: %d images, %d pairs", split, len(names), len(pairs))


def all_pairs(names: list[str], max_pairs: Optional[int] = None, seed: int = 0) -> list[tuple[str, str]]:
    """Ordered pairs (a, b), a != b, of ``names``; at most ``max_pairs`` chosen reproducibly."""
    pairs = [(a, b) for a in names for b in names if a != b]
    if max_pairs is not None and len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(pairs), max_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    return pairs


def final_check(out: Path) -> int:
    """Run ``hptransfer data check`` on ``out``; log its report; return the number of problems."""
    from hptransfer.data.check import check_dataset, format_report

    report = check_dataset(out, decode=False)
    log.info("data check of %s:\n%s", out, format_report(report))
    bad = sum(len(r["problems"]) for r in report.values())
    if not report:
        log.error("%s: no split was written", out)
        return 1
    return bad


def mask_background(image, mask, fill=(255, 255, 255)):
    """Keep the person: pixels where ``mask`` (PIL L or bool (H, W)) is set, ``fill`` elsewhere."""
    from PIL import Image

    m = np.asarray(mask)
    m = m > (127 if m.dtype == np.uint8 else 0)
    arr = np.asarray(image.convert("RGB")).copy()
    if m.shape != arr.shape[:2]:
        raise PrepareError(f"mask size {m.shape[::-1]} differs from image size {arr.shape[1::-1]}")
    arr[~m] = fill
    return Image.fromarray(arr)


def bbox_crop_box(kp: np.ndarray, width: int, height: int, aspect: float, margin: float = 0.25):
    """Crop box (left, top, right, bottom) around visible (18, 2) (y, x) keypoints, enlarged by
    ``margin`` of the body height and widened to ``aspect`` = width / height; may leave the image
    (PIL pads such crops with black)."""
    vis = (kp >= 0).all(axis=1)
    if not vis.any():
        return 0, 0, width, height
    y0, x0 = kp[vis].min(axis=0)
    y1, x1 = kp[vis].max(axis=0)
    h = max(y1 - y0, 1.0) * (1 + 2 * margin)
    w = max(h * aspect, (x1 - x0) * (1 + 2 * margin))
    h = w / aspect
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    return int(round(cx - w / 2)), int(round(cy - h / 2)), int(round(cx + w / 2)), int(round(cy + h / 2))


def crop_resize(image, kp: np.ndarray, box, size: tuple[int, int]):
    """Crop ``image`` (PIL) to ``box`` and resize to ``size`` (H, W); keypoints (18, 2) (y, x) follow.

    Keypoints that leave the output become missing (-1)."""
    from PIL import Image

    left, top, right, bottom = box
    h, w = size
    out = image.crop(box).resize((w, h), Image.BICUBIC)
    kp = np.asarray(kp, dtype=np.float32)
    vis = (kp >= 0).all(axis=1)
    sy, sx = h / (bottom - top), w / (right - left)
    new = np.full_like(kp, -1)
    new[vis, 0] = (kp[vis, 0] - top) * sy
    new[vis, 1] = (kp[vis, 1] - left) * sx
    inside = vis & (new[:, 0] >= 0) & (new[:, 0] <= h - 1) & (new[:, 1] >= 0) & (new[:, 1] <= w - 1)
    new[~inside] = -1
    return out, new


def inside_only(kp: np.ndarray, height: int, width: int) -> np.ndarray:
    """(18, 2) (y, x) with keypoints outside a ``height`` x ``width`` image set to -1 (missing)."""
    kp = np.array(kp, dtype=np.float32)
    out = (kp[:, 0] < 0) | (kp[:, 1] < 0) | (kp[:, 0] > height - 1) | (kp[:, 1] > width - 1)
    kp[out] = -1
    return kp


def parse_size(text: str) -> tuple[int, int]:
    """'256x176' -> (256, 176) as (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise PrepareError(f"size {text!r} is not HxW, e.g. 256x176") from None
    return h, w
