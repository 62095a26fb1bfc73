"""Synthetic people in the DeepFashion pose-transfer benchmark format (``hptransfer data synth``).

Each identity is an articulated, human-like figure with its own garments (a high-frequency
texture: stripes, checks, dots, a print or knit, and a logo or text on the chest), skin, hair and
trouser colours, and its own background (plain, wall-and-floor or wallpaper). Each of its M poses comes from a 3-D kinematic skeleton with joint limits
(random angles within limits per joint, a body yaw giving front, three-quarter, side and back
views, global scale and translation, sometimes an upper-body crop), projected orthographically.
Body parts are drawn far to near (depth order), so limbs hide and reveal each other and the torso;
garment textures are mapped onto the torso and sleeves in the body's own frame, so the texture
moves with the body.

Keypoints are the exact projections of the skeleton's joints in OpenPose-18 order, (y, x) pixels,
``-1`` where a joint falls outside the image. Occluded joints stay annotated (the synthetic ground
truth knows where they are); note that OpenPose on real photos drops some occluded joints, so
real annotations have more ``-1`` entries.

Human parsing: every image gets an exact label map ``parsing/<stem>.png`` (8-bit, LIP's numbering
for the classes drawn: 0 background, 2 hair, 5 upper clothes (torso and sleeves), 9 pants, 13 face
(head skin, ears, neck), 14/15 left/right arm, 16/17 left/right leg, 18/19 left/right shoe; "left" is
the person's own left). ``garment_from=B`` renders a person wearing identity B's garment (shirt colour,
textures, sleeve length) in any of its own poses, and :func:`render_frontal` any person, in any garment,
in the pre-defined frontal pose: exact ground truth for virtual try-on.

Output: ``images/*.jpg`` (JPEG quality 95), ``parsing/*.png``, ``annotations-{train,test}.csv``,
``pairs-{train,test}.csv`` (all ordered pairs of different poses of an identity, or a capped random
subset); identities are split between train and test. The output is a function of the arguments
(same seed -> same bytes), whatever the number of worker processes.
"""
from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hptransfer.data.formats import atomic_write_bytes, atomic_write_text, write_annotations, write_pairs

log = logging.getLogger(__name__)

JPEG_QUALITY = 95
PARAMS_FILE = "synth.json"  # the generator's arguments, written beside the dataset (see body_masks)
MIN_SIZE, MAX_SIZE = 64, 1024

# Body proportions in units of standing height (pelvis at the origin, y up, facing +z; the
# person's right side is at -x, i.e. on the viewer's left when facing the camera).
SPINE, NECK_HEAD = 0.30, 0.085
UPPER_ARM, FOREARM, THIGH, SHIN = 0.165, 0.15, 0.245, 0.235
HEAD_RX, HEAD_RY = 0.062, 0.076
# Joint limits in degrees (low, high) and the spread of the "near rest" draw.
LIMITS = {
    "shoulder_flex": (-50, 170), "shoulder_abd": (-10, 150), "elbow": (0, 145), "forearm_twist": (-60, 90),
    "hip_flex": (-25, 85), "hip_abd": (-5, 35), "knee": (0, 120),
    "lean_fwd": (-10, 25), "lean_side": (-12, 12), "head_yaw": (-40, 40), "head_pitch": (-15, 20),
}
REST = {"shoulder_flex": 5, "shoulder_abd": 10, "elbow": 15, "forearm_twist": 0, "hip_flex": 5, "hip_abd": 5,
        "knee": 5, "lean_fwd": 0, "lean_side": 0, "head_yaw": 0, "head_pitch": 0}
VIEWS = {"front": 0.0, "three-quarter": 45.0, "side": 90.0, "back": 180.0}
VIEW_ORDER = ("front", "side", "back", "three-quarter")  # poses of an identity cycle through these
FRAMINGS = ("random", "centred")

SKIN = [(255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 92), (160, 102, 64), (110, 70, 45)]
# LIP label numbers of the classes drawn (hptransfer.data.parsing reads LIP, CIHP and ATR maps).
LABEL_HAIR, LABEL_UPPER, LABEL_PANTS, LABEL_FACE = 2, 5, 9, 13
LABEL_ARM = {"l": 14, "r": 15}
LABEL_LEG = {"l": 16, "r": 17}
LABEL_SHOE = {"l": 18, "r": 19}
PARSING_DIR = "parsing"
# What "wearing B's garment" swaps: the shirt (colour, front/back textures) and its sleeve length.
GARMENT_KEYS = ("shirt", "tex_front", "tex_back", "long_sleeves")
# The pre-defined frontal pose of the try-on pipeline: facing the camera, arms away from the torso
# and legs apart, so that nothing occludes the garment.
FRONTAL_POSE = {**{f"{s}_{j}": v for s in ("r", "l") for j, v in
                   (("shoulder_flex", 0.0), ("shoulder_abd", 28.0), ("elbow", 8.0), ("forearm_twist", 0.0),
                    ("hip_flex", 0.0), ("hip_abd", 8.0), ("knee", 0.0))},
                "lean_fwd": 0.0, "lean_side": 0.0, "head_yaw": 0.0, "head_pitch": 0.0, "yaw": 0.0}
HAIR = [(20, 16, 14), (60, 40, 25), (110, 75, 40), (185, 150, 95), (160, 60, 30), (120, 120, 120)]


def _rot(axis: str, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _colour(rng, lo=30, hi=230) -> tuple:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _contrast(c, rng) -> tuple:
    """A colour that stands out against ``c``."""
    for _ in range(20):
        d = _colour(rng, 0, 256)
        if sum(abs(a - b) for a, b in zip(c, d)) > 220:
            return d
    return tuple(255 - v for v in c)


# ---------------------------------------------------------------- identities and garments

def make_identity(rng: np.random.Generator, size: int) -> dict:
    """Colours, proportions and garment textures of one person (textures at ~1.2 x ``size`` px/unit)."""
    shirt = _colour(rng)
    ident = {
        # One background per identity, as in a photo shoot: the reference then shows the target's
        # background, which makes the task well-posed (DeepFashion's backgrounds are near constant).
        "background_seed": int(rng.integers(2**31)),
        "skin": SKIN[rng.integers(len(SKIN))], "hair": HAIR[rng.integers(len(HAIR))],
        "long_hair": bool(rng.random() < 0.4), "long_sleeves": bool(rng.random() < 0.5),
        "shorts": bool(rng.random() < 0.2), "trousers": _colour(rng, 20, 200), "shoes": _colour(rng, 0, 90),
        "shoulder": float(rng.uniform(0.085, 0.115)), "hip": float(rng.uniform(0.055, 0.075)),
        "girth": float(rng.uniform(0.9, 1.2)), "shirt": shirt,
    }
    ppu = 1.2 * size
    ident["tex_ppu"] = ppu
    front, back = _garment_textures(rng, shirt, int(round(0.8 * ppu)), ppu)
    ident["tex_front"], ident["tex_back"] = front, back
    ident["trouser_tex"] = _trouser_texture(rng, ident["trousers"], int(round(0.8 * ppu)), ppu)
    return ident


def _garment_textures(rng, base, n: int, ppu: float):
    """Front (with chest logo/text) and back garment textures, n x n px covering 0.8 x 0.8 units."""
    v, u = np.mgrid[0:n, 0:n].astype(np.float32) / ppu  # units
    c1 = np.array(base, np.float32)
    c2 = np.array(_contrast(base, rng), np.float32)
    c3 = np.array(_colour(rng), np.float32)
    kind = rng.choice(["stripes", "checks", "dots", "print", "knit"])
    period = float(rng.uniform(0.016, 0.045))
    img = np.empty((n, n, 3), np.float32)
    img[:] = c1
    if kind == "stripes":
        ang = math.radians(float(rng.choice([0, 90, 45, -45, rng.uniform(0, 180)])))
        t = (u * math.cos(ang) + v * math.sin(ang)) / period
        frac = t - np.floor(t)
        img[frac < 0.35] = c2
        if rng.random() < 0.5:
            img[(frac > 0.55) & (frac < 0.65)] = c3
    elif kind == "checks":
        a = np.floor(u / period).astype(int) % 2
        b = np.floor(v / period).astype(int) % 2
        img[(a + b) == 1] = (c1 + c2) / 2
        img[(a + b) == 2] = c2
    elif kind == "dots":
        row = np.floor(v / period)
        uu = u / period + 0.5 * (row % 2)
        d2 = (uu - np.floor(uu) - 0.5) ** 2 + (v / period - row - 0.5) ** 2
        img[d2 < float(rng.uniform(0.04, 0.1))] = c2
    elif kind == "knit":
        t = np.sin(u / period * 2 * math.pi) * np.sin(v / period * 4 * math.pi)
        img += (t[..., None] * 0.25) * (c2 - c1)
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if kind == "print":
        d = ImageDraw.Draw(img)
        r = max(2, int(period * ppu * 0.6))
        count = int(n * n / (period * ppu * 2.2) ** 2)
        xs, ys = rng.integers(0, n, count), rng.integers(0, n, count)
        cols = [tuple(int(x) for x in c2), tuple(int(x) for x in c3)]
        for i, (x, y) in enumerate(zip(xs.tolist(), ys.tolist())):
            c = cols[i % 2]
            d.ellipse((x - r, y - r, x + r, y + r), fill=c)
            d.ellipse((x - r // 3, y - r // 3, x + r // 3, y + r // 3), fill=tuple(int(x) for x in c1))
    back = img.copy()
    _draw_logo(img, rng, base, n, ppu)
    return img, back


def _draw_logo(img: Image.Image, rng, base, n: int, ppu: float) -> None:
    """A logo or a short text on the chest: 0.12 units below the neck, which maps to (n/2, 0.2n)."""
    d = ImageDraw.Draw(img)
    cx, cy = n / 2, 0.2 * n + 0.10 * ppu
    h = 0.05 * ppu
    col = _contrast(base, rng)
    box = rng.random() < 0.5
    if box:
        d.rectangle((cx - 1.3 * h, cy - 0.75 * h, cx + 1.3 * h, cy + 0.75 * h), fill=_colour(rng, 200, 256))
        col = _colour(rng, 0, 100)
    if rng.random() < 0.5:
        letters = "".join(chr(int(c)) for c in rng.integers(65, 91, int(rng.integers(2, 4))))
        font = ImageFont.load_default(size=max(6, int(h * 0.9)))
        d.text((cx, cy), letters, fill=col, font=font, anchor="mm")
    else:
        r = 0.6 * h
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=col)
        angles = [math.radians(90 + 144 * k) for k in range(5)]  # a five-pointed star
        pts = [(cx + 0.8 * r * math.cos(a), cy - 0.8 * r * math.sin(a)) for a in angles]
        d.polygon(pts, fill=tuple(255 - c for c in col))


def _trouser_texture(rng, base, n: int, ppu: float) -> Image.Image:
    """Trousers: denim-like grain, pinstripes or plain, lower contrast than the shirt."""
    v, u = np.mgrid[0:n, 0:n].astype(np.float32) / ppu
    img = np.empty((n, n, 3), np.float32)
    img[:] = base
    kind = rng.integers(3)
    if kind == 0:
        t = np.sin((u + v) / 0.006 * math.pi)
        img *= (1 + 0.08 * t)[..., None]
    elif kind == 1:
        t = (u / 0.03) % 1
        img[t < 0.12] = np.array(base) * 0.6 + 100
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------- poses

def sample_pose(rng: np.random.Generator, view: str) -> dict:
    """Joint angles (degrees) within limits: each joint near rest or anywhere in its range."""
    pose = {}
    for side in ("r", "l"):
        for j in ("shoulder_flex", "shoulder_abd", "elbow", "forearm_twist", "hip_flex", "hip_abd", "knee"):
            pose[f"{side}_{j}"] = _angle(rng, j, 0.25 if j.startswith(("hip", "knee")) else 0.7)
    for j in ("lean_fwd", "lean_side", "head_yaw", "head_pitch"):
        pose[j] = _angle(rng, j, 0.5)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    pose["yaw"] = sign * VIEWS[view] + float(rng.uniform(-15, 15))
    return pose


def _angle(rng, joint: str, p_free: float) -> float:
    lo, hi = LIMITS[joint]
    if rng.random() < p_free:
        return float(rng.uniform(lo, hi))
    return float(np.clip(REST[joint] + rng.normal(0, 12), lo, hi))


def skeleton(ident: dict, pose: dict) -> dict:
    """3-D joints (units, y up, +z towards the camera) of a posed identity: name -> (3,) array,
    plus the torso/head rotations used for drawing."""
    yaw = _rot("y", pose["yaw"])
    torso = yaw @ _rot("x", pose["lean_fwd"]) @ _rot("z", pose["lean_side"])
    j = {"pelvis": np.zeros(3)}
    sw, hw = ident["shoulder"], ident["hip"]
    j["neck"] = torso @ np.array([0, SPINE, 0])
    down = np.array([0.0, -1.0, 0.0])
    for side, sx in (("r", -1.0), ("l", 1.0)):
        sh = torso @ np.array([sx * sw, SPINE - 0.025, 0])
        arm = torso @ _rot("x", -pose[f"{side}_shoulder_flex"]) @ _rot("z", sx * pose[f"{side}_shoulder_abd"])
        elbow = sh + UPPER_ARM * (arm @ down)
        fore = arm @ _rot("y", sx * pose[f"{side}_forearm_twist"]) @ _rot("x", -pose[f"{side}_elbow"])
        wrist = elbow + FOREARM * (fore @ down)
        hip = yaw @ np.array([sx * hw, 0, 0])
        leg = yaw @ _rot("x", -pose[f"{side}_hip_flex"]) @ _rot("z", sx * pose[f"{side}_hip_abd"])
        knee = hip + THIGH * (leg @ down)
        shin = leg @ _rot("x", pose[f"{side}_knee"])
        ankle = knee + SHIN * (shin @ down)
        toe = ankle + 0.075 * (shin @ np.array([0, -0.35, 1.0]))
        j.update({f"{side}_shoulder": sh, f"{side}_elbow": elbow, f"{side}_wrist": wrist, f"{side}_hip": hip,
                  f"{side}_knee": knee, f"{side}_ankle": ankle, f"{side}_toe": toe,
                  f"{side}_hand": wrist + 0.035 * (fore @ down)})
    head_r = torso @ _rot("y", pose["head_yaw"]) @ _rot("x", pose["head_pitch"])
    hc = j["neck"] + torso @ np.array([0, NECK_HEAD, 0.01])
    j["head"] = hc
    r = np.array([HEAD_RX, HEAD_RY, HEAD_RX])
    for name, p in (("nose", (0, -0.15, 1.0)), ("r_eye", (-0.38, 0.15, 0.88)), ("l_eye", (0.38, 0.15, 0.88)),
                    ("r_ear", (-1.0, 0.05, -0.05)), ("l_ear", (1.0, 0.05, -0.05)), ("mouth", (0, -0.5, 0.85))):
        j[name] = hc + head_r @ (np.array(p) * r)
    j["_head_forward"] = head_r @ np.array([0, 0, 1.0])
    j["_torso"] = torso
    return j


OPENPOSE_JOINTS = ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
                   "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear")


# ---------------------------------------------------------------- drawing

class _Canvas:
    """The image, an optional body mask, an optional parsing label map, and projection from units to pixels."""

    def __init__(self, img: Image.Image, scale: float, origin: np.ndarray, with_mask: bool, with_labels: bool = False):
        self.img, self.draw = img, ImageDraw.Draw(img)
        self.mask = Image.new("L", img.size, 0) if with_mask else None
        self.mdraw = ImageDraw.Draw(self.mask) if with_mask else None
        self.labels = Image.new("L", img.size, 0) if with_labels else None
        self.ldraw = ImageDraw.Draw(self.labels) if with_labels else None
        self.S, self.origin = scale, origin
        self.outline = max(1, int(round(img.width / 200)))

    def px(self, p: np.ndarray) -> np.ndarray:
        """(3,) units -> (2,) (x, y) pixels."""
        return np.array([self.origin[0] + self.S * p[0], self.origin[1] - self.S * p[1]])

    def _shape(self, draw, kind, xy, fill):
        (draw.polygon if kind == "polygon" else draw.ellipse)(xy, fill=fill)

    def shapes(self, shapes, fill, texture=None, outline=True, label=0):
        """Fill shapes [(kind, xy)], flat colour or ``texture`` = (image, affine coefficients), with
        a dark outline (drawn first, grown by the outline width); the label map gets ``label`` on
        the same pixels (outline included: it belongs to the part)."""
        if outline:
            o = self.outline
            dark = tuple(int(c * 0.45) for c in fill)
            for kind, xy in shapes:
                self._shape(self.draw, kind, _grow(kind, xy, o), dark)
                if self.ldraw is not None:
                    self._shape(self.ldraw, kind, _grow(kind, xy, o), label)
        if self.ldraw is not None:
            for kind, xy in shapes:
                self._shape(self.ldraw, kind, xy, label)
        if texture is None:
            for kind, xy in shapes:
                self._shape(self.draw, kind, xy, fill)
        else:
            pts = np.concatenate([np.asarray(xy, np.float64).reshape(-1, 2) for _, xy in shapes])
            x0, y0 = np.floor(pts.min(0)).astype(int) - 1
            x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
            x0, y0 = max(x0, 0), max(y0, 0)
            x1, y1 = min(x1, self.img.width), min(y1, self.img.height)
            if x1 > x0 and y1 > y0:
                m = Image.new("L", (x1 - x0, y1 - y0), 0)
                md = ImageDraw.Draw(m)
                for kind, xy in shapes:
                    self._shape(md, kind, _shift(xy, -x0, -y0), 255)
                tex, (a, b, c, d, e, f) = texture
                coeffs = (a, b, c + a * x0 + b * y0, d, e, f + d * x0 + e * y0)
                patch = tex.transform((x1 - x0, y1 - y0), Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=fill)
                self.img.paste(patch, (x0, y0), m)
        if self.mdraw is not None:
            for kind, xy in shapes:
                self._shape(self.mdraw, kind, xy, 255)


def _grow(kind, xy, o):
    if kind == "ellipse":
        x0, y0, x1, y1 = xy
        return (x0 - o, y0 - o, x1 + o, y1 + o)
    pts = np.asarray(xy, np.float64)
    c = pts.mean(0)
    d = pts - c
    n = np.linalg.norm(d, axis=1, keepdims=True) + 1e-6
    return [tuple(p) for p in (c + d * (n + o) / n)]


def _shift(xy, dx, dy):
    pts = np.asarray(xy, np.float64).reshape(-1, 2) + (dx, dy)
    return [tuple(p) for p in pts] if len(xy) != 4 or not np.isscalar(xy[0]) else tuple(pts.ravel())


def _capsule(p0, p1, r0, r1):
    """Shapes of a limb from pixel p0 to p1 with end radii r0, r1: a trapezoid and two discs."""
    d = p1 - p0
    n = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9)
    quad = [tuple(p0 + n * r0), tuple(p1 + n * r1), tuple(p1 - n * r1), tuple(p0 - n * r0)]
    return [("polygon", quad), ("ellipse", (p0[0] - r0, p0[1] - r0, p0[0] + r0, p0[1] + r0)),
            ("ellipse", (p1[0] - r1, p1[1] - r1, p1[0] + r1, p1[1] + r1))]


def _affine(origin_px, axis_px, tex_origin, k_across, k_along):
    """PIL AFFINE coefficients mapping an output pixel p to texture coordinates
    (tx0 + k_across * <p - O, n>, ty0 + k_along * <p - O, a>), a = unit(axis), n = a rotated."""
    a = axis_px / (np.hypot(*axis_px) + 1e-9)
    n = np.array([a[1], -a[0]])  # image-right when the axis points down: text reads left to right
    ox, oy = origin_px
    tx0, ty0 = tex_origin
    return (k_across * n[0], k_across * n[1], tx0 - k_across * (n[0] * ox + n[1] * oy),
            k_along * a[0], k_along * a[1], ty0 - k_along * (a[0] * ox + a[1] * oy))


def _background(rng, size: int) -> Image.Image:
    kind = rng.integers(4)
    if kind <= 1:  # plain, light (as in most of DeepFashion)
        return Image.new("RGB", (size, size), _colour(rng, 200, 256))
    v, u = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c1, c2 = np.array(_colour(rng, 120, 250), np.float32), np.array(_colour(rng, 120, 250), np.float32)
    if kind == 2:  # wall and floor with a gradient
        horizon = float(rng.uniform(0.6, 0.85))
        t = np.where(v < horizon, v / horizon * 0.3, 0.6 + (v - horizon))
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    else:  # tiles / wallpaper stripes, low contrast
        p = float(rng.uniform(0.04, 0.12))
        t = ((np.floor(u / p) + np.floor(v / p * (rng.random() < 0.5))) % 2)[..., None]
        img = c1 * (1 - 0.25 * t) + c2 * 0.25 * t
    noise = rng.normal(0, 4, (size, size, 1)).astype(np.float32)
    return Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8))


def render(ident: dict, pose: dict, size: int, rng: np.random.Generator, with_mask: bool = False,
           framing: str = "random"):
    """Draw one posed identity. Returns (PIL RGB image, (18, 2) float32 (y, x) keypoints with -1
    outside the image, body mask (H, W) bool or None). :func:`render_parsed` also returns the labels.
    """
    img, kp, mask, _ = render_parsed(ident, pose, size, rng, with_mask, framing, with_labels=False)
    return img, kp, mask


def render_parsed(ident: dict, pose: dict, size: int, rng: np.random.Generator, with_mask: bool = False,
                  framing: str = "random", with_labels: bool = True):
    """:func:`render` plus the parsing label map ((H, W) uint8, LIP numbering; None without ``with_labels``).

    ``framing``: "random" (random scale and shift, sometimes an upper-body crop) or "centred" (the
    whole figure at a fixed scale, pelvis on the vertical centre line, as in DeepFashion's studio shots).
    """
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    j = skeleton(ident, pose)
    # Global placement: fit the figure, then a random scale/shift; sometimes an upper-body crop.
    pts = np.array([j[k] for k in j if not k.startswith("_")])
    lo, hi = pts[:, :2].min(0) - [0.05, 0.06], pts[:, :2].max(0) + [0.05, 0.09]
    extent = hi - lo
    # The random draws happen in both framings, so "random" output does not depend on the option.
    crop = rng.random() < 0.15
    S = size * float(rng.uniform(0.78, 0.95)) / max(extent[1], extent[0] / 0.95)
    if crop:
        S *= float(rng.uniform(1.4, 1.8))
    slack = size - S * extent
    ox = -S * lo[0] + slack[0] * float(rng.uniform(0.2, 0.8))
    if crop:
        oy = S * hi[1] + size * float(rng.uniform(0.02, 0.08))  # head near the top, legs cut off
    else:
        oy = S * hi[1] + slack[1] * float(rng.uniform(0.2, 0.8))
    if framing == "centred":
        # A fixed scale from the standing height (1 unit, head top +0.46 to feet -0.52 about the
        # pelvis), not from this pose's extent; a raised hand may leave the frame.
        S = size * 0.8
        ox = size / 2 - S * float(j["pelvis"][0])
        oy = size / 2 + S * (float(j["pelvis"][1]) - 0.03)
    bg_rng = np.random.default_rng(ident["background_seed"]) if "background_seed" in ident else rng
    c = _Canvas(_background(bg_rng, size), S, np.array([ox, oy]), with_mask, with_labels)
    z = {k: float(v[2]) for k, v in j.items() if not k.startswith("_")}
    P = {k: c.px(v) for k, v in j.items() if not k.startswith("_")}
    parts = []  # (depth, order, draw function)

    girth = ident["girth"]
    ppu = ident["tex_ppu"]
    k = ppu / S  # texture px per image px
    n_tex = ident["tex_front"].width
    skin, shirt, trousers = ident["skin"], ident["shirt"], ident["trousers"]
    fwd = j["_torso"] @ np.array([0, 0, 1.0])
    facing = fwd[2]  # >0: the chest faces the camera
    # Projected torso half-widths: a slab of width 2*w and depth 0.12 seen at this yaw.
    cosy, siny = abs(fwd[2]), abs(fwd[0])
    hw_sh = math.hypot((ident["shoulder"] + 0.02) * cosy, 0.065 * siny) * girth
    hw_hip = math.hypot((ident["hip"] + 0.035) * cosy, 0.06 * siny) * girth
    compress = max(hw_sh / ((ident["shoulder"] + 0.02) * girth), 0.35)

    def torso():
        neck, pel = P["neck"], P["pelvis"] + (P["pelvis"] - P["neck"]) * 0.08
        axis = pel - neck
        a = axis / (np.hypot(*axis) + 1e-9)
        n = np.array([-a[1], a[0]])
        top = neck + a * S * 0.01
        quad = [tuple(top + n * S * hw_sh), tuple(pel + n * S * hw_hip), tuple(pel - n * S * hw_hip),
                tuple(top - n * S * hw_sh)]
        tex = ident["tex_front"] if facing > 0 else ident["tex_back"]
        # Mirror the across-body axis for back views so the garment keeps its handedness.
        ka = k / compress * (1 if facing > 0 else -1)
        c.shapes([("polygon", quad)], shirt, (tex, _affine(neck, axis, (n_tex / 2, 0.2 * n_tex), ka, k)),
                 label=LABEL_UPPER)

    def pelvis_part():
        w = S * hw_hip * 1.05
        pel = P["pelvis"]
        up = P["neck"] - pel
        a = up / (np.hypot(*up) + 1e-9)
        n = np.array([-a[1], a[0]])
        quad = [tuple(pel + a * S * 0.05 + n * w), tuple(pel + n * w - a * S * 0.04),
                tuple(pel - n * w - a * S * 0.04), tuple(pel + a * S * 0.05 - n * w)]
        tex = (ident["trouser_tex"], _affine(pel, -up, (n_tex / 2, 0.3 * n_tex), k, k))
        c.shapes([("polygon", quad)], trousers, tex, label=LABEL_PANTS)

    def neck_part():
        top = P["head"] + (P["neck"] - P["head"]) * 0.3
        c.shapes(_capsule(P["neck"], top, S * 0.025 * girth, S * 0.022 * girth), skin, label=LABEL_FACE)

    parts += [(z["pelvis"] - 0.03, 0, torso), (z["pelvis"] - 0.031, 1, pelvis_part), (z["neck"] - 0.032, 2, neck_part)]

    for side in ("r", "l"):
        def upper_arm(side=side):
            p0, p1 = P[f"{side}_shoulder"], P[f"{side}_elbow"]
            tex = (ident["tex_front"], _affine(p0, p1 - p0, (0.15 * n_tex, 0.55 * n_tex), k, k))
            c.shapes(_capsule(p0, p1, S * 0.03 * girth, S * 0.025 * girth), shirt, tex, label=LABEL_UPPER)

        def forearm(side=side):
            p0, p1 = P[f"{side}_elbow"], P[f"{side}_wrist"]
            shapes = _capsule(p0, p1, S * 0.024 * girth, S * 0.019 * girth)
            if ident["long_sleeves"]:
                c.shapes(shapes, shirt, (ident["tex_front"], _affine(p0, p1 - p0, (0.85 * n_tex, 0.55 * n_tex), k, k)),
                         label=LABEL_UPPER)
            else:
                c.shapes(shapes, skin, label=LABEL_ARM[side])
            h = P[f"{side}_hand"]
            r = S * 0.026
            c.shapes([("ellipse", (h[0] - r, h[1] - r, h[0] + r, h[1] + r))], skin, label=LABEL_ARM[side])

        def thigh(side=side):
            p0, p1 = P[f"{side}_hip"], P[f"{side}_knee"]
            tex = (ident["trouser_tex"], _affine(p0, p1 - p0, (0.3 * n_tex, 0.1 * n_tex), k, k))
            c.shapes(_capsule(p0, p1, S * 0.045 * girth, S * 0.034 * girth), trousers, tex, label=LABEL_PANTS)

        def shin(side=side):
            p0, p1 = P[f"{side}_knee"], P[f"{side}_ankle"]
            shapes = _capsule(p0, p1, S * 0.032 * girth, S * 0.024 * girth)
            if ident["shorts"]:
                c.shapes(shapes, skin, label=LABEL_LEG[side])
            else:
                tex = (ident["trouser_tex"], _affine(p0, p1 - p0, (0.7 * n_tex, 0.1 * n_tex), k, k))
                c.shapes(shapes, trousers, tex, label=LABEL_PANTS)
            c.shapes(_capsule(P[f"{side}_ankle"], P[f"{side}_toe"], S * 0.024, S * 0.02), ident["shoes"],
                     label=LABEL_SHOE[side])

        parts += [
            (z[f"{side}_shoulder"] / 2 + z[f"{side}_elbow"] / 2, 10, upper_arm),
            (z[f"{side}_elbow"] / 2 + z[f"{side}_wrist"] / 2 + 0.005, 11, forearm),
            # thighs stay under the shirt's hem: always behind the torso
            (min(z[f"{side}_hip"] / 2 + z[f"{side}_knee"] / 2, z["pelvis"] - 0.04) - 0.04, 3, thigh),
            (z[f"{side}_knee"] / 2 + z[f"{side}_ankle"] / 2 - 0.04, 4, shin),
        ]

    head_forward = j["_head_forward"]

    def long_hair():
        h = P["head"]
        rx, ry = S * HEAD_RX * 1.15, S * HEAD_RY
        quad = [(h[0] - rx, h[1]), (h[0] + rx, h[1]), (h[0] + rx * 1.1, h[1] + ry * 2.2),
                (h[0] - rx * 1.1, h[1] + ry * 2.2)]
        c.shapes([("polygon", quad)], ident["hair"], label=LABEL_HAIR)

    if ident["long_hair"]:
        parts.append((z["head"] - 0.2 if head_forward[2] > 0 else z["head"] + 0.01, 5, long_hair))

    def head():
        h = P["head"]
        rx, ry = S * HEAD_RX, S * HEAD_RY
        fx, fz = head_forward[0], head_forward[2]
        for ear in ("r_ear", "l_ear"):
            e, re = P[ear], rx * 0.24
            c.shapes([("ellipse", (e[0] - re, e[1] - re * 1.3, e[0] + re, e[1] + re * 1.3))], skin, label=LABEL_FACE)
        hx, hy = h[0] - fx * 0.12 * rx, h[1] - 0.1 * ry
        c.shapes([("ellipse", (hx - rx * 1.06, hy - ry * 1.04, hx + rx * 1.06, hy + ry * 1.04))], ident["hair"],
                 label=LABEL_HAIR)
        if fz > -0.35:  # some face is visible
            w = rx * (0.55 + 0.4 * max(fz, 0))
            fxc, fyc = h[0] + fx * 0.35 * rx, h[1] + 0.12 * ry
            c.shapes([("ellipse", (fxc - w, fyc - ry * 0.82, fxc + w, fyc + ry * 0.82))], skin, outline=False,
                     label=LABEL_FACE)
        e_r = max(1.0, rx * 0.1)
        for name in ("r_eye", "l_eye"):
            if z[name] - z["head"] > 0.2 * HEAD_RX:
                e = P[name]
                c.draw.ellipse((e[0] - e_r, e[1] - e_r * 0.8, e[0] + e_r, e[1] + e_r * 0.8), fill=(25, 20, 20))
        if z["mouth"] - z["head"] > 0.3 * HEAD_RX:
            m = P["mouth"]
            c.draw.line((m[0] - rx * 0.25 * abs(fz), m[1], m[0] + rx * 0.25 * abs(fz), m[1]), fill=(150, 40, 50),
                        width=max(1, int(rx * 0.1)))
        if z["nose"] - z["head"] > 0.3 * HEAD_RX:
            nz, r = P["nose"], max(1.0, rx * 0.07)
            c.draw.ellipse((nz[0] - r, nz[1] - r, nz[0] + r, nz[1] + r), fill=tuple(int(v * 0.8) for v in skin))

    parts.append((z["head"], 6, head))
    for _, _, fn in sorted(parts, key=lambda t: (t[0], t[1])):
        fn()

    kp = np.array([[P[name][1], P[name][0]] for name in OPENPOSE_JOINTS], np.float32)
    r = np.rint(kp)
    kp[((r < 0) | (r > size - 1)).any(axis=1)] = -1
    mask = None if c.mask is None else np.asarray(c.mask) > 0
    labels = None if c.labels is None else np.asarray(c.labels, np.uint8).copy()
    return c.img, kp, mask, labels


# ---------------------------------------------------------------- dataset writer

def _view_for(identity: int, pose_index: int, views: tuple = VIEW_ORDER) -> str:
    return views[(identity + pose_index) % len(views)]


def _image_name(identity: int, pose_index: int, view: str) -> str:
    return f"person{identity:05d}_{pose_index:02d}_{view}.jpg"


def wearing(ident: dict, other: dict) -> dict:
    """``ident`` dressed in ``other``'s garment (:data:`GARMENT_KEYS`); body, hair, trousers unchanged."""
    return {**ident, **{k: other[k] for k in GARMENT_KEYS}}


def _identity(seed: int, identity: int, size: int, garment_from: Optional[int] = None):
    """(identity dict, its rng positioned after make_identity), optionally wearing another's garment."""
    rng = np.random.default_rng([seed, identity])
    ident = make_identity(rng, size)
    if garment_from is not None:
        ident = wearing(ident, make_identity(np.random.default_rng([seed, garment_from]), size))
    return ident, rng


def render_identity(seed: int, identity: int, poses: int, size: int, with_mask: bool = False,
                    views: tuple = VIEW_ORDER, framing: str = "random", with_labels: bool = False,
                    garment_from: Optional[int] = None):
    """All poses of one identity (a pure function of its arguments): list of (name, image, kp, mask),
    with the label map as a fifth element when ``with_labels``. ``garment_from``: the same poses,
    framing and background, worn in identity ``garment_from``'s garment (try-on ground truth)."""
    ident, rng = _identity(seed, identity, size, garment_from)
    out = []
    for p in range(poses):
        view = _view_for(identity, p, views)
        img, kp, mask, labels = render_parsed(ident, sample_pose(rng, view), size, rng, with_mask, framing,
                                              with_labels)
        out.append((_image_name(identity, p, view), img, kp, mask) + ((labels,) if with_labels else ()))
    return out


def render_frontal(seed: int, identity: int, size: int, garment_from: Optional[int] = None):
    """Identity ``identity`` (optionally in ``garment_from``'s garment) in :data:`FRONTAL_POSE`, centred
    framing, its own background: (image, kp, labels)."""
    ident, _ = _identity(seed, identity, size, garment_from)
    img, kp, _, labels = render_parsed(ident, FRONTAL_POSE, size, np.random.default_rng([seed, identity, 99]),
                                       framing="centred")
    return img, kp, labels


def frontal_keypoints(size: int) -> np.ndarray:
    """(18, 2) (y, x) keypoints of the pre-defined frontal pose at ``size`` px (average proportions,
    centred framing): the try-on pipeline's builtin frontal pose."""
    ident = {"shoulder": 0.1, "hip": 0.065}
    j = skeleton(ident, FRONTAL_POSE)
    S = size * 0.8  # render()'s centred framing
    ox, oy = size / 2 - S * float(j["pelvis"][0]), size / 2 + S * (float(j["pelvis"][1]) - 0.03)
    return np.array([[oy - S * j[n][1], ox + S * j[n][0]] for n in OPENPOSE_JOINTS], np.float32)


def write_label_png(path, labels: np.ndarray) -> None:
    """An 8-bit label PNG (mode L, one class number per pixel), written atomically."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(labels, np.uint8), mode="L").save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


def _write_identity(task):
    seed, identity, poses, size, image_dir, views, framing = task
    result = {}
    parsing_dir = Path(image_dir).parent / PARSING_DIR
    for name, img, kp, _, labels in render_identity(seed, identity, poses, size, views=views, framing=framing,
                                                     with_labels=True):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
        atomic_write_bytes(Path(image_dir) / name, buf.getvalue())
        write_label_png(parsing_dir / (Path(name).stem + ".png"), labels)
        result[name] = kp
    return identity, result


def synthesize(root, identities: int, poses: int, size: int, seed: int = 0, test_fraction: float = 0.2,
               max_pairs_per_identity: Optional[int] = None, workers: Optional[int] = None,
               views: tuple = VIEW_ORDER, framing: str = "random") -> dict:
    """Write a synthetic people dataset under ``root`` in the benchmark format; returns counts.

    ``identities`` are split between train and test (at least one each when there are two or
    more); pairs are all ordered pairs of different poses of an identity, or a random subset of
    ``max_pairs_per_identity`` of them. ``workers``: processes (default: up to 2 cores). The poses
    of an identity cycle through ``views``; ``framing`` is :func:`render`'s.
    """
    views = tuple(views)
    if not views or any(v not in VIEWS for v in views):
        raise ValueError(f"views must be a non-empty subset of {tuple(VIEWS)}, got {views}")
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    if identities < 1 or poses < 2:
        raise ValueError(f"need at least 1 identity and 2 poses per identity, got {identities} and {poses}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    root = Path(root)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / PARSING_DIR).mkdir(exist_ok=True)
    t0 = time.perf_counter()
    tasks = [(seed, i, poses, size, str(image_dir), views, framing) for i in range(identities)]
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    kps: dict[int, dict] = {}
    if workers > 1 and identities * poses >= 16:
        # fork: the children only need numpy/PIL; each task is a pure function of (seed, identity).
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for i, res in pool.imap_unordered(_write_identity, tasks, chunksize=max(1, identities // (8 * workers))):
                kps[i] = res
    else:
        for t in tasks:
            i, res = _write_identity(t)
            kps[i] = res
    rng = np.random.default_rng([seed, 1 << 20])
    order = rng.permutation(identities)
    n_test = 0
    if test_fraction > 0 and identities >= 2:
        n_test = min(identities - 1, max(1, round(identities * test_fraction)))
    split_of = {int(i): ("test" if r < n_test else "train") for r, i in enumerate(order)}
    counts = {}
    for split in ("train", "test"):
        ids = sorted(i for i, s in split_of.items() if s == split)
        ann, pairs = {}, []
        for i in ids:
            names = sorted(kps[i])
            for n in names:
                ann[n] = kps[i][n]
            ps = [(a, b) for a in names for b in names if a != b]
            if max_pairs_per_identity is not None and len(ps) > max_pairs_per_identity:
                pick = np.random.default_rng([seed, i, 7]).choice(len(ps), max_pairs_per_identity, replace=False)
                ps = [ps[int(x)] for x in sorted(pick)]
            pairs += ps
        write_annotations(root / f"annotations-{split}.csv", ann)
        write_pairs(root / f"pairs-{split}.csv", pairs)
        counts[split] = {"identities": len(ids), "images": len(ann), "pairs": len(pairs)}
    params = {"seed": seed, "identities": identities, "poses": poses, "size": size, "views": list(views),
              "framing": framing}
    atomic_write_text(root / PARAMS_FILE, json.dumps(params, indent=1) + "\n")
    dt = time.perf_counter() - t0
    log.info("wrote %d images (%d px) of %d identities to %s in %.1f s (%d workers)", identities * poses, size,
             identities, root, dt, workers)
    return {"splits": counts, "seconds": dt}


def body_masks(root, names) -> dict:
    """{image name: (size, size) bool body mask} for images of a dataset this module wrote, rendered
    again from its ``synth.json`` (the output is a pure function of those arguments)."""
    root = Path(root)
    path = root / PARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: body masks exist only for datasets written by "
                                "`hptransfer data synth` (or the demo)")
    p = json.loads(path.read_text())
    wanted, out = set(names), {}
    bad = [n for n in wanted if not (n.startswith("person") and n[6:11].isdigit())]
    if bad:
        raise ValueError(f"{path}: not names this generator writes (personNNNNN_PP_view.jpg): {sorted(bad)[:3]}")
    identities = sorted({int(n[6:11]) for n in wanted})
    for i in identities:
        for name, _, _, mask in render_identity(p["seed"], i, p["poses"], p["size"], with_mask=True,
                                                views=tuple(p["views"]), framing=p["framing"]):
            if name in wanted:
                out[name] = mask
    missing = wanted - out.keys()
    if missing:
        raise ValueError(f"{path}: these images are not the generator's output for its arguments: {sorted(missing)[:3]}")
    return out


# ---------------------------------------------------------------- CLI (hptransfer data synth)

def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--identities", type=int, default=50)
    parser.add_argument("--poses", type=int, default=6, help="images (poses) per identity")
    parser.add_argument("--size", type=int, default=256, help=f"image side in pixels ({MIN_SIZE}..{MAX_SIZE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of identities in the test split")
    parser.add_argument("--max-pairs", type=int, default=None, help="cap on pairs per identity (default: all)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    parser.add_argument("--views", default=",".join(VIEW_ORDER),
                        help=f"comma-separated views the poses cycle through (of {', '.join(VIEWS)})")
    parser.add_argument("--framing", choices=FRAMINGS, default="random",
                        help="random: random scale/shift and some upper-body crops; centred: whole figure, fixed scale")


def run(args) -> int:
    res = synthesize(args.out, args.identities, args.poses, args.size, seed=args.seed,
                     test_fraction=args.test_fraction, max_pairs_per_identity=args.max_pairs, workers=args.workers,
                     views=tuple(v.strip() for v in args.views.split(",") if v.strip()), framing=args.framing)
    for split, c in res["splits"].items():
        print(f"{split:5s}: {c['identities']} identities, {c['images']} images, {c['pairs']} pairs")
    n = sum(c["images"] for c in res["splits"].values())
    print(f"wrote {args.out} in {res['seconds']:.1f} s ({n / max(res['seconds'], 1e-9):.1f} images/s)")
    return 0
