"""Drawing primitives: the canvas (image, body mask, label map, projection) and shape geometry."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


class Canvas:
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

    def shapes(self, shapes, fill, texture=None, outline=True, label=0):
        """Fill shapes [(kind, xy)], flat colour or ``texture`` = (image, affine coefficients), with
        a dark outline (drawn first, grown by the outline width); the label map gets ``label`` on
        the same pixels (outline included: it belongs to the part)."""
        if outline:
            o = self.outline
            dark = tuple(int(c * 0.45) for c in fill)
            for kind, xy in shapes:
                _fill(self.draw, kind, _grow(kind, xy, o), dark)
                if self.ldraw is not None:
                    _fill(self.ldraw, kind, _grow(kind, xy, o), label)
        if self.ldraw is not None:
            for kind, xy in shapes:
                _fill(self.ldraw, kind, xy, label)
        if texture is None:
            for kind, xy in shapes:
                _fill(self.draw, kind, xy, fill)
        else:
            self._paste_texture(shapes, fill, texture)
        if self.mdraw is not None:
            for kind, xy in shapes:
                _fill(self.mdraw, kind, xy, 255)

    def paint(self, shapes, fill):
        """Draw on the image only (no outline, mask or label): facial features. A line is
        ("line", xy, width)."""
        for kind, xy, *width in shapes:
            if kind == "line":
                self.draw.line(xy, fill=fill, width=width[0])
            else:
                self.draw.ellipse(xy, fill=fill)

    def _paste_texture(self, shapes, fill, texture):
        """Paste the affinely mapped texture through the shapes, within their bounding box only."""
        pts = np.concatenate([np.asarray(xy, np.float64).reshape(-1, 2) for _, xy in shapes])
        x0, y0 = np.floor(pts.min(0)).astype(int) - 1
        x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, self.img.width), min(y1, self.img.height)
        if x1 <= x0 or y1 <= y0:
            return
        m = Image.new("L", (x1 - x0, y1 - y0), 0)
        md = ImageDraw.Draw(m)
        for kind, xy in shapes:
            _fill(md, kind, _shift(xy, -x0, -y0), 255)
        tex, (a, b, c, d, e, f) = texture
        coeffs = (a, b, c + a * x0 + b * y0, d, e, f + d * x0 + e * y0)
        patch = tex.transform((x1 - x0, y1 - y0), Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=fill)
        self.img.paste(patch, (x0, y0), m)


def _fill(draw, kind, xy, fill):
    (draw.polygon if kind == "polygon" else draw.ellipse)(xy, fill=fill)


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


def disc(p, r):
    """An ellipse shape: the disc of radius ``r`` px about pixel ``p``."""
    return ("ellipse", (p[0] - r, p[1] - r, p[0] + r, p[1] + r))


def capsule(p0, p1, r0, r1):
    """Shapes of a limb from pixel p0 to p1 with end radii r0, r1: a trapezoid and two discs."""
    d = p1 - p0
    n = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9)
    quad = [tuple(p0 + n * r0), tuple(p1 + n * r1), tuple(p1 - n * r1), tuple(p0 - n * r0)]
    return [("polygon", quad), disc(p0, r0), disc(p1, r1)]


def affine(origin_px, axis_px, tex_origin, k_across, k_along):
    """PIL AFFINE coefficients mapping an output pixel p to texture coordinates
    (tx0 + k_across * <p - O, n>, ty0 + k_along * <p - O, a>), a = unit(axis), n = a rotated."""
    a = axis_px / (np.hypot(*axis_px) + 1e-9)
    n = np.array([a[1], -a[0]])  # image-right when the axis points down: text reads left to right
    ox, oy = origin_px
    tx0, ty0 = tex_origin
    return (k_across * n[0], k_across * n[1], tx0 - k_across * (n[0] * ox + n[1] * oy),
            k_along * a[0], k_along * a[1], ty0 - k_along * (a[0] * ox + a[1] * oy))
