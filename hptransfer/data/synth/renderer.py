"""The renderer: framing, the figure's parts as a table (:data:`PARTS`) and one function that draws a part.

Parts are drawn far to near (their depth, then their layer), so limbs hide and reveal each other and
the torso. Garment textures are mapped onto the torso and sleeves in the body's own frame, so the
texture moves with the body. Each part's shape comes from a small geometry function (:data:`SHAPES`);
everything else about it (keypoints, widths, layer, colour, texture, label) is a row of the table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from hptransfer.data.synth.appearance import background
from hptransfer.data.synth.canvas import Canvas, affine, capsule, disc
from hptransfer.data.synth.skeleton import FRONTAL_POSE, HEAD_RX, HEAD_RY, OPENPOSE_JOINTS, skeleton

FRAMINGS = ("random", "centred")
# LIP label numbers of the classes drawn (hptransfer.data.parsing reads LIP, CIHP and ATR maps).
LABEL_HAIR, LABEL_UPPER, LABEL_PANTS, LABEL_FACE = 2, 5, 9, 13
LABEL_ARM = {"l": 14, "r": 15}
LABEL_LEG = {"l": 16, "r": 17}
LABEL_SHOE = {"l": 18, "r": 19}


@dataclass(frozen=True)
class Part:
    """One drawn piece of the figure. Its depth is the mean z of ``depth_of`` plus ``depth_offset``."""
    shape: str                                # key of SHAPES
    layer: int                                # order between parts at equal depth
    depth_of: tuple                           # joints whose mean z places the part
    colour: Union[str, tuple]                 # identity key ("skin", "shirt", ...) or an RGB tuple
    label: Optional[int]                      # LIP label; None: painted on the image only (face features)
    joints: tuple = ()                        # pixel points the shape spans (capsule ends, disc centre)
    widths: tuple = ()                        # radii at those points, units of standing height
    girth: bool = True                        # radii scale with the identity's girth
    depth_offset: float = 0.0
    depth_cap: Optional[float] = None         # depth at most z(pelvis) + this
    depth_away: Optional[float] = None        # depth offset instead when the head faces away
    shade: Optional[float] = None             # colour multiplied by this
    texture: Optional[str] = None             # identity texture key; "chest": front or back by facing
    tex_origin: tuple = ()                    # texture point at the shape's frame origin, fractions of its side
    outline: bool = True
    bare_if: Optional[tuple] = None           # (identity key, value): when it holds, untextured skin
    bare_label: Optional[int] = None          # ... with this label (short sleeves, shorts)


def _side_parts(s: str) -> tuple:
    """One side's limbs: upper arm, forearm (sleeve or skin) and hand, thigh, shin (trousers or skin) and shoe."""
    arm, fore, thigh, shin = ((f"{s}_{a}", f"{s}_{b}") for a, b in
                              (("shoulder", "elbow"), ("elbow", "wrist"), ("hip", "knee"), ("knee", "ankle")))
    return (
        Part("capsule", 10, arm, "shirt", LABEL_UPPER, arm, (0.03, 0.025), texture="tex_front",
             tex_origin=(0.15, 0.55)),
        Part("capsule", 11, fore, "shirt", LABEL_UPPER, fore, (0.024, 0.019), depth_offset=0.005,
             texture="tex_front", tex_origin=(0.85, 0.55), bare_if=("long_sleeves", False), bare_label=LABEL_ARM[s]),
        Part("disc", 11, fore, "skin", LABEL_ARM[s], (f"{s}_hand",), (0.026,), girth=False, depth_offset=0.005),
        # thighs stay under the shirt's hem: always behind the torso
        Part("capsule", 3, thigh, "trousers", LABEL_PANTS, thigh, (0.045, 0.034), depth_offset=-0.04,
             depth_cap=-0.04, texture="trouser_tex", tex_origin=(0.3, 0.1)),
        Part("capsule", 4, shin, "trousers", LABEL_PANTS, shin, (0.032, 0.024), depth_offset=-0.04,
             texture="trouser_tex", tex_origin=(0.7, 0.1), bare_if=("shorts", True), bare_label=LABEL_LEG[s]),
        Part("capsule", 4, shin, "shoes", LABEL_SHOE[s], (f"{s}_ankle", f"{s}_toe"), (0.024, 0.02), girth=False,
             depth_offset=-0.04),
    )


# Insertion order breaks the remaining ties: the right side before the left, a hand or shoe right after
# its limb (same depth and layer), the head's pieces in turn.
PARTS = (
    Part("torso", 0, ("pelvis",), "shirt", LABEL_UPPER, depth_offset=-0.03, texture="chest", tex_origin=(0.5, 0.2)),
    Part("pelvis", 1, ("pelvis",), "trousers", LABEL_PANTS, depth_offset=-0.031, texture="trouser_tex",
         tex_origin=(0.5, 0.3)),
    Part("capsule", 2, ("neck",), "skin", LABEL_FACE, ("neck", "neck_top"), (0.025, 0.022), depth_offset=-0.032),
    *_side_parts("r"), *_side_parts("l"),
    # long hair falls behind the head, or over it when the head faces away
    Part("long_hair", 5, ("head",), "hair", LABEL_HAIR, depth_offset=-0.2, depth_away=0.01),
    Part("ear", 6, ("head",), "skin", LABEL_FACE, ("r_ear",)),
    Part("ear", 6, ("head",), "skin", LABEL_FACE, ("l_ear",)),
    Part("hair_cap", 6, ("head",), "hair", LABEL_HAIR),
    Part("face", 6, ("head",), "skin", LABEL_FACE, outline=False),
    Part("eye", 6, ("head",), (25, 20, 20), None, ("r_eye",)),
    Part("eye", 6, ("head",), (25, 20, 20), None, ("l_eye",)),
    Part("mouth", 6, ("head",), (150, 40, 50), None),
    Part("nose", 6, ("head",), "skin", None, shade=0.8),
)


@dataclass
class Figure:
    """A posed identity projected onto a canvas: what the parts' geometry reads."""
    ident: dict
    P: dict            # joint -> (x, y) pixels
    z: dict            # joint -> depth (units, +z towards the camera)
    S: float           # pixels per unit
    k: float           # texture pixels per image pixel
    facing: float      # > 0: the chest faces the camera
    hw_sh: float       # projected torso half-widths (units) at the shoulders and hips
    hw_hip: float
    compress: float    # across-body foreshortening of the torso texture
    head_fwd: np.ndarray


def _figure(ident: dict, j: dict, c: Canvas) -> Figure:
    P = {k: c.px(v) for k, v in j.items() if not k.startswith("_")}
    P["neck_top"] = P["head"] + (P["neck"] - P["head"]) * 0.3
    girth = ident["girth"]
    fwd = j["_torso"] @ np.array([0, 0, 1.0])
    # Projected torso half-widths: a slab of width 2*w and depth 0.12 seen at this yaw.
    cosy, siny = abs(fwd[2]), abs(fwd[0])
    hw_sh = math.hypot((ident["shoulder"] + 0.02) * cosy, 0.065 * siny) * girth
    hw_hip = math.hypot((ident["hip"] + 0.035) * cosy, 0.06 * siny) * girth
    return Figure(ident=ident, P=P, z={k: float(v[2]) for k, v in j.items() if not k.startswith("_")}, S=c.S,
                  k=ident["tex_ppu"] / c.S, facing=fwd[2], hw_sh=hw_sh, hw_hip=hw_hip,
                  compress=max(hw_sh / ((ident["shoulder"] + 0.02) * girth), 0.35), head_fwd=j["_head_forward"])


def _depth(f: Figure, part: Part) -> float:
    zs = [f.z[n] for n in part.depth_of]
    d = zs[0] / 2 + zs[1] / 2 if len(zs) == 2 else zs[0]
    if part.depth_cap is not None:
        d = min(d, f.z["pelvis"] + part.depth_cap)
    if part.depth_away is not None and not f.head_fwd[2] > 0:
        return d + part.depth_away
    return d + part.depth_offset


# ---------------------------------------------------------------- part geometry: Figure, Part -> (shapes, frame)
# frame: (origin px, axis px) of the part's texture mapping, or None.

def _radius(f: Figure, part: Part, w: float) -> float:
    return f.S * w * f.ident["girth"] if part.girth else f.S * w


def _capsule_shape(f: Figure, part: Part):
    p0, p1 = (f.P[n] for n in part.joints)
    return capsule(p0, p1, *(_radius(f, part, w) for w in part.widths)), (p0, p1 - p0)


def _disc_shape(f: Figure, part: Part):
    return [disc(f.P[part.joints[0]], _radius(f, part, part.widths[0]))], None


def _torso_shape(f: Figure, part: Part):
    S = f.S
    neck, pel = f.P["neck"], f.P["pelvis"] + (f.P["pelvis"] - f.P["neck"]) * 0.08
    axis = pel - neck
    a = axis / (np.hypot(*axis) + 1e-9)
    n = np.array([-a[1], a[0]])
    top = neck + a * S * 0.01
    quad = [tuple(top + n * S * f.hw_sh), tuple(pel + n * S * f.hw_hip), tuple(pel - n * S * f.hw_hip),
            tuple(top - n * S * f.hw_sh)]
    return [("polygon", quad)], (neck, axis)


def _pelvis_shape(f: Figure, part: Part):
    S, pel = f.S, f.P["pelvis"]
    w = S * f.hw_hip * 1.05
    up = f.P["neck"] - pel
    a = up / (np.hypot(*up) + 1e-9)
    n = np.array([-a[1], a[0]])
    quad = [tuple(pel + a * S * 0.05 + n * w), tuple(pel + n * w - a * S * 0.04),
            tuple(pel - n * w - a * S * 0.04), tuple(pel + a * S * 0.05 - n * w)]
    return [("polygon", quad)], (pel, -up)


def _long_hair_shape(f: Figure, part: Part):
    if not f.ident["long_hair"]:
        return [], None
    h = f.P["head"]
    rx, ry = f.S * HEAD_RX * 1.15, f.S * HEAD_RY
    quad = [(h[0] - rx, h[1]), (h[0] + rx, h[1]), (h[0] + rx * 1.1, h[1] + ry * 2.2),
            (h[0] - rx * 1.1, h[1] + ry * 2.2)]
    return [("polygon", quad)], None


def _ear_shape(f: Figure, part: Part):
    e, re = f.P[part.joints[0]], f.S * HEAD_RX * 0.24
    return [("ellipse", (e[0] - re, e[1] - re * 1.3, e[0] + re, e[1] + re * 1.3))], None


def _hair_cap_shape(f: Figure, part: Part):
    h, rx, ry = f.P["head"], f.S * HEAD_RX, f.S * HEAD_RY
    hx, hy = h[0] - f.head_fwd[0] * 0.12 * rx, h[1] - 0.1 * ry
    return [("ellipse", (hx - rx * 1.06, hy - ry * 1.04, hx + rx * 1.06, hy + ry * 1.04))], None


def _face_shape(f: Figure, part: Part):
    fx, fz = f.head_fwd[0], f.head_fwd[2]
    if fz <= -0.35:  # no face visible
        return [], None
    h, rx, ry = f.P["head"], f.S * HEAD_RX, f.S * HEAD_RY
    w = rx * (0.55 + 0.4 * max(fz, 0))
    fxc, fyc = h[0] + fx * 0.35 * rx, h[1] + 0.12 * ry
    return [("ellipse", (fxc - w, fyc - ry * 0.82, fxc + w, fyc + ry * 0.82))], None


def _eye_shape(f: Figure, part: Part):
    name = part.joints[0]
    if not f.z[name] - f.z["head"] > 0.2 * HEAD_RX:
        return [], None
    e, e_r = f.P[name], max(1.0, f.S * HEAD_RX * 0.1)
    return [("ellipse", (e[0] - e_r, e[1] - e_r * 0.8, e[0] + e_r, e[1] + e_r * 0.8))], None


def _mouth_shape(f: Figure, part: Part):
    if not f.z["mouth"] - f.z["head"] > 0.3 * HEAD_RX:
        return [], None
    m, rx, fz = f.P["mouth"], f.S * HEAD_RX, f.head_fwd[2]
    xy = (m[0] - rx * 0.25 * abs(fz), m[1], m[0] + rx * 0.25 * abs(fz), m[1])
    return [("line", xy, max(1, int(rx * 0.1)))], None


def _nose_shape(f: Figure, part: Part):
    if not f.z["nose"] - f.z["head"] > 0.3 * HEAD_RX:
        return [], None
    return [disc(f.P["nose"], max(1.0, f.S * HEAD_RX * 0.07))], None


SHAPES = {"capsule": _capsule_shape, "disc": _disc_shape, "torso": _torso_shape, "pelvis": _pelvis_shape,
          "long_hair": _long_hair_shape, "ear": _ear_shape, "hair_cap": _hair_cap_shape, "face": _face_shape,
          "eye": _eye_shape, "mouth": _mouth_shape, "nose": _nose_shape}


def _texture(f: Figure, part: Part, frame) -> tuple:
    """(texture image, affine coefficients) of a textured part."""
    if part.texture == "chest":
        # the back texture on back views, mirrored across the body so the garment keeps its handedness
        front = f.facing > 0
        image = f.ident["tex_front" if front else "tex_back"]
        ka = f.k / f.compress * (1 if front else -1)
    else:
        image, ka = f.ident[part.texture], f.k
    n_tex = f.ident["tex_front"].width
    fx, fy = part.tex_origin
    return image, affine(frame[0], frame[1], (fx * n_tex, fy * n_tex), ka, f.k)


def draw_part(c: Canvas, f: Figure, part: Part) -> None:
    """Draw one row of :data:`PARTS`: its shapes in its colour or texture, outlined and labelled."""
    shapes, frame = SHAPES[part.shape](f, part)
    bare = part.bare_if is not None and f.ident[part.bare_if[0]] == part.bare_if[1]
    colour = "skin" if bare else part.colour
    colour = f.ident[colour] if isinstance(colour, str) else colour
    if part.shade is not None:
        colour = tuple(int(v * part.shade) for v in colour)
    if part.label is None:
        c.paint(shapes, colour)
        return
    texture = None if bare or part.texture is None else _texture(f, part, frame)
    c.shapes(shapes, colour, texture, outline=part.outline, label=part.bare_label if bare else part.label)


# ---------------------------------------------------------------- framing and rendering

def _centred(j: dict, size: int) -> tuple:
    """(scale, x0, y0) of the centred framing: a fixed scale from the standing height (1 unit, head top
    +0.46 to feet -0.52 about the pelvis), not from the pose's extent; a raised hand may leave the frame."""
    S = size * 0.8
    return S, size / 2 - S * float(j["pelvis"][0]), size / 2 + S * (float(j["pelvis"][1]) - 0.03)


def _placement(j: dict, size: int, rng: np.random.Generator, framing: str) -> tuple:
    """(scale, x0, y0): fit the figure, then a random scale/shift; sometimes an upper-body crop."""
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
    return _centred(j, size) if framing == "centred" else (S, ox, oy)


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
    S, ox, oy = _placement(j, size, rng, framing)
    bg_rng = np.random.default_rng(ident["background_seed"]) if "background_seed" in ident else rng
    c = Canvas(background(bg_rng, size), S, np.array([ox, oy]), with_mask, with_labels)
    f = _figure(ident, j, c)
    for *_, n in sorted((_depth(f, part), part.layer, n) for n, part in enumerate(PARTS)):
        draw_part(c, f, PARTS[n])
    kp = np.array([[f.P[name][1], f.P[name][0]] for name in OPENPOSE_JOINTS], np.float32)
    r = np.rint(kp)
    kp[((r < 0) | (r > size - 1)).any(axis=1)] = -1
    mask = None if c.mask is None else np.asarray(c.mask) > 0
    labels = None if c.labels is None else np.asarray(c.labels, np.uint8).copy()
    return c.img, kp, mask, labels


def frontal_keypoints(size: int) -> np.ndarray:
    """(18, 2) (y, x) keypoints of the pre-defined frontal pose at ``size`` px (average proportions,
    centred framing): the try-on pipeline's builtin frontal pose."""
    j = skeleton({"shoulder": 0.1, "hip": 0.065}, FRONTAL_POSE)
    S, ox, oy = _centred(j, size)
    return np.array([[oy - S * j[n][1], ox + S * j[n][0]] for n in OPENPOSE_JOINTS], np.float32)
