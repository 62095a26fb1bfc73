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
