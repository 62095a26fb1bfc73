"""How a person looks: colours, proportions, garment and trouser textures, backgrounds, garment swaps."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SKIN = [(255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 92), (160, 102, 64), (110, 70, 45)]
HAIR = [(20, 16, 14), (60, 40, 25), (110, 75, 40), (185, 150, 95), (160, 60, 30), (120, 120, 120)]
# What "wearing B's garment" swaps: the shirt (colour, front/back textures) and its sleeve length.
GARMENT_KEYS = ("shirt", "tex_front", "tex_back", "long_sleeves")


def _colour(rng, lo=30, hi=230) -> tuple:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _contrast(c, rng) -> tuple:
    """A colour that stands out against ``c``."""
    for _ in range(20):
        d = _colour(rng, 0, 256)
        if sum(abs(a - b) for a, b in zip(c, d)) > 220:
            return d
    return tuple(255 - v for v in c)


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


def wearing(ident: dict, other: dict) -> dict:
    """``ident`` dressed in ``other``'s garment (:data:`GARMENT_KEYS`); body, hair, trousers unchanged."""
    return {**ident, **{k: other[k] for k in GARMENT_KEYS}}


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
        _draw_print(img, rng, period * ppu, (c1, c2, c3))
    back = img.copy()
    _draw_logo(img, rng, base, n, ppu)
    return img, back


def _draw_print(img: Image.Image, rng, period_px: float, colours) -> None:
    """Scattered rings in the two accent colours, centres in the base colour."""
    c1, c2, c3 = colours
    n = img.width
    d = ImageDraw.Draw(img)
    r = max(2, int(period_px * 0.6))
    count = int(n * n / (period_px * 2.2) ** 2)
    xs, ys = rng.integers(0, n, count), rng.integers(0, n, count)
    cols = [tuple(int(x) for x in c2), tuple(int(x) for x in c3)]
    for i, (x, y) in enumerate(zip(xs.tolist(), ys.tolist())):
        c = cols[i % 2]
        d.ellipse((x - r, y - r, x + r, y + r), fill=c)
        d.ellipse((x - r // 3, y - r // 3, x + r // 3, y + r // 3), fill=tuple(int(x) for x in c1))


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


def background(rng, size: int) -> Image.Image:
    """A backdrop: plain and light (as in most of DeepFashion), wall and floor, or low-contrast tiles."""
    kind = rng.integers(4)
    if kind <= 1:
        return Image.new("RGB", (size, size), _colour(rng, 200, 256))
    v, u = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c1, c2 = np.array(_colour(rng, 120, 250), np.float32), np.array(_colour(rng, 120, 250), np.float32)
    if kind == 2:  # wall and floor with a gradient
        horizon = float(rng.uniform(0.6, 0.85))
        t = np.where(v < horizon, v / horizon * 0.3, 0.6 + (v - horizon))
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    else:  # tiles / wallpaper stripes
        p = float(rng.uniform(0.04, 0.12))
        t = ((np.floor(u / p) + np.floor(v / p * (rng.random() < 0.5))) % 2)[..., None]
        img = c1 * (1 - 0.25 * t) + c2 * 0.25 * t
    noise = rng.normal(0, 4, (size, size, 1)).astype(np.float32)
    return Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8))
