"""Pictures for people: float images to uint8, and the one skeleton drawer.

Shared by the training report's sample grids, the video writer's side-by-side frames, the metrics (which
score the uint8 images as they would be saved) and ``hptransfer data show``. Bottom layer: imports
numpy, torch, PIL and ``hptransfer.pose`` only.
"""
from __future__ import annotations

import colorsys
from typing import Optional, Sequence

import numpy as np
import torch

from hptransfer.pose import LIMB_PAIRS, NUM_KEYPOINTS

RGB = tuple[int, int, int]

# Limb colours, one per pose.LIMB_PAIRS entry. OpenPose's (as its demo draws them): the dataset check's.
OPENPOSE_COLOURS: tuple[RGB, ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170))
# Hues i / n at saturation 0.9: the training report's sample grids (on black).
HUE_COLOURS: tuple[RGB, ...] = tuple(
    tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / len(LIMB_PAIRS), 0.9, 1.0)) for i in range(len(LIMB_PAIRS)))
# A cosine rainbow, lighter: the video writer's skeleton panel (on white).
RAINBOW_COLOURS: tuple[RGB, ...] = tuple(
    tuple(int(255 * (0.5 + 0.5 * np.cos(2 * np.pi * (i / len(LIMB_PAIRS) + k / 3)))) for k in range(3))
    for i in range(len(LIMB_PAIRS)))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (B, 3, H, W) -> uint8 (B, 3, H, W) on the same device, as they would be
    saved to PNG (clamped, ``round((x + 1) * 127.5)``); uint8 images are returned as they are. For a
    (H, W, 3) array (PIL, imageio): ``to_uint8(x)[i].permute(1, 2, 0).cpu().numpy()``."""
    if images.dtype == torch.uint8:
        return images
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def draw_skeleton(kp, image, *, background: RGB = (0, 0, 0), limb_colours: Sequence[RGB] = HUE_COLOURS,
                  joint_colours: RGB | Sequence[RGB] = (255, 255, 255), joint_outline: Optional[RGB] = None,
                  width: Optional[int] = None, joint_radius: Optional[int] = None) -> np.ndarray:
    """Draw the OpenPose limbs and the joints of ``kp`` (18, 2) (y, x) pixels (numpy or torch; a negative
    coordinate = missing: its joint and limbs are left out).

    ``image``: a PIL image, drawn on in place, or an int R for a new R x R canvas of ``background``.
    Limb i has colour ``limb_colours[i]`` and line ``width`` (default ``max(1, image width // 64)``);
    joints are discs of ``joint_radius`` (default ``width``) filled with ``joint_colours`` (one colour,
    or one per joint, cycled) and outlined with ``joint_outline``. Returns the picture as an
    (H, W, 3) uint8 array.
    """
    from PIL import Image, ImageDraw

    if isinstance(image, (int, np.integer)):
        image = Image.new("RGB", (int(image), int(image)), background)
    if isinstance(kp, torch.Tensor):
        kp = kp.detach().float().cpu().numpy()
    pts = np.asarray(kp, dtype=np.float64).reshape(-1, 2).tolist()
    if len(pts) != NUM_KEYPOINTS:
        raise ValueError(f"kp must be ({NUM_KEYPOINTS}, 2) (y, x), got {np.shape(kp)}")
    width = max(1, image.width // 64) if width is None else width
    radius = width if joint_radius is None else joint_radius
    per_joint = not isinstance(joint_colours[0], (int, np.integer))
    visible = [y >= 0 and x >= 0 for y, x in pts]
    draw = ImageDraw.Draw(image)
    for (a, b), colour in zip(LIMB_PAIRS, limb_colours):
        if visible[a] and visible[b]:
            (ya, xa), (yb, xb) = pts[a], pts[b]
            draw.line([(xa, ya), (xb, yb)], fill=tuple(colour), width=width)
    for j, (y, x) in enumerate(pts):
        if visible[j]:
            fill = joint_colours[j % len(joint_colours)] if per_joint else joint_colours
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=tuple(fill), outline=joint_outline)
    return np.asarray(image)


def _fitting_font(labels: Sequence[str], width: int):
    """The default (FreeType) font at the largest size <= 14 px whose widest line of ``labels`` fits in
    ``width`` px, and the labels broken into lines (a label that fits at no size >= 7 px is wrapped at
    its spaces)."""
    from PIL import ImageFont

    lines = [[label] for label in labels]
    for wrap in (False, True):
        if wrap:
            lines = [label.split(" ") if " " in label else [label] for label in labels]
        for size in range(min(14, max(7, width // 5)), 6, -1):
            font = ImageFont.load_default(size=size)
            if all(font.getlength(line) <= width - 2 for ls in lines for line in ls):
                return font, lines
    return ImageFont.load_default(size=7), lines


def save_grid(path, rows: Sequence[Sequence[np.ndarray]], labels: Optional[Sequence[str]] = None,
              pad: int = 2) -> "Path":
    """Write rows of equal-size (H, W, 3) uint8 cells as one PNG with white gaps, atomically; with
    ``labels`` (one per column) a white strip above the first row names the columns. Returns the path."""
    import os
    from pathlib import Path

    from PIL import Image, ImageDraw

    H, W = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (H + pad) - pad, cols * (W + pad) - pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, c in enumerate(r):
            grid[i * (H + pad): i * (H + pad) + H, j * (W + pad): j * (W + pad) + W] = c
    if labels:
        font, lines = _fitting_font(labels, W)
        line_h = font.getbbox("Ag")[3] + 2
        strip = Image.new("RGB", (grid.shape[1], line_h * max(len(ls) for ls in lines) + 3), (255, 255, 255))
        draw = ImageDraw.Draw(strip)
        for j, ls in enumerate(lines):
            for k, line in enumerate(ls):
                draw.text((j * (W + pad) + W / 2, 1 + k * line_h), line, fill=(0, 0, 0), font=font, anchor="ma")
        grid = np.concatenate([np.asarray(strip), grid])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
