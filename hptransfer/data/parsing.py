"""Human-parsing label maps: readers for LIP, CIHP and ATR numberings, and a pluggable parser.

A parsing map is an 8-bit PNG of class numbers (mode L, or P whose palette indices are the numbers),
one per image and of the image's size. Datasets number their classes differently, so the reader is
told which numbering a map uses and converts it to named regions:

- ``lip`` (LIP, 20 classes): 0 background, 1 hat, 2 hair, 3 glove, 4 sunglasses, 5 upper-clothes,
  6 dress, 7 coat, 8 socks, 9 pants, 10 jumpsuits, 11 scarf, 12 skirt, 13 face, 14 left-arm,
  15 right-arm, 16 left-leg, 17 right-leg, 18 left-shoe, 19 right-shoe. Our synthetic people use it.
- ``cihp`` (CIHP / MHP-style, 20 classes): as LIP but 10 is torso-skin.
- ``atr`` (ATR, 18 classes): 0 background, 1 hat, 2 hair, 3 sunglasses, 4 upper-clothes, 5 skirt,
  6 pants, 7 dress, 8 belt, 9 left-shoe, 10 right-shoe, 11 face, 12 left-leg, 13 right-leg,
  14 left-arm, 15 right-arm, 16 bag, 17 scarf.

A number beyond the numbering's classes, a colour (RGB) visualisation instead of a label map, or a
map whose size differs from its image is a :class:`ParsingError` naming the file.

Garment classes: ``upper`` = upper-clothes, dress and coat (what the try-on pipeline moves);
``garment_region`` = those plus the arms (and torso skin): where a garment of any sleeve length may lie.

Parsers: :class:`Parser` is the interface (``parse(image) -> labels`` in its own numbering). Nothing is
bundled and nothing is downloaded; :func:`load_parser` imports a user's class (``module:Class``) and
hands it the user's local weights file, e.g. an SCHP model the user has.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import numpy as np

from hptransfer.errors import InputError

NUMBERINGS = {
    "lip": ("background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks", "pants",
            "jumpsuits", "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg", "right-leg", "left-shoe",
            "right-shoe"),
    "cihp": ("background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks", "pants",
             "torso-skin", "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg", "right-leg", "left-shoe",
             "right-shoe"),
    "atr": ("background", "hat", "hair", "sunglasses", "upper-clothes", "skirt", "pants", "dress", "belt",
            "left-shoe", "right-shoe", "face", "left-leg", "right-leg", "left-arm", "right-arm", "bag", "scarf"),
}
UPPER_GARMENT = ("upper-clothes", "dress", "coat")
GARMENT_REGION = UPPER_GARMENT + ("left-arm", "right-arm", "torso-skin")


class ParsingError(InputError):
    """A parsing map that cannot be used: unreadable, wrong numbering, wrong size, no garment."""


def class_ids(numbering: str, names) -> list[int]:
    """Class numbers of ``names`` in ``numbering`` (names the numbering lacks are left out)."""
    if numbering not in NUMBERINGS:
        raise ParsingError(f"unknown parsing numbering {numbering!r}; choose from {sorted(NUMBERINGS)}")
    table = NUMBERINGS[numbering]
    return [table.index(n) for n in names if n in table]


def check_labels(labels: np.ndarray, numbering: str, source: str = "<labels>") -> np.ndarray:
    """``labels`` (H, W) integer array checked against ``numbering``; returns it as uint8."""
    if numbering not in NUMBERINGS:
        raise ParsingError(f"unknown parsing numbering {numbering!r}; choose from {sorted(NUMBERINGS)}", path=source)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ParsingError(f"{source}: a parsing map must be one channel (H, W), got shape {labels.shape}")
    n = len(NUMBERINGS[numbering])
    bad = np.unique(labels[(labels < 0) | (labels >= n)])
    if bad.size:
        raise ParsingError(f"{source}: class numbers {bad[:8].tolist()} do not exist in the {numbering.upper()} "
                           f"numbering (0..{n - 1}); is it another numbering (--parsing-numbering lip|cihp|atr)?")
    return labels.astype(np.uint8)


def read_parsing(path, numbering: str = "lip", image_size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Read a label PNG: (H, W) uint8 class numbers in ``numbering``. ``image_size`` (H, W) of the image
    it belongs to: a different size is an error (a map must be pixel-aligned with its image)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parsing map {path} is missing")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("RGB", "RGBA"):
                a = np.asarray(im.convert("RGB"))
                if not ((a[..., 0] == a[..., 1]) & (a[..., 1] == a[..., 2])).all():
                    raise ParsingError(f"{path}: a colour image, not a label map (need 8-bit class numbers, "
                                       "mode L or P; colour visualisations cannot be read back)")
                labels = a[..., 0]
            elif mode in ("L", "P", "I", "I;16"):
                labels = np.asarray(im)  # P: palette indices are the class numbers
            else:
                raise ParsingError(f"{path}: image mode {mode} is not a label map (need mode L or P)")
    except ParsingError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise ParsingError(f"{path}: unreadable parsing map: {e}") from None
    if image_size is not None and tuple(labels.shape) != tuple(image_size):
        raise ParsingError(f"{path}: parsing map is {labels.shape[0]}x{labels.shape[1]} (HxW) but its image is "
                           f"{image_size[0]}x{image_size[1]}; a map must be pixel-aligned with its image")
    return check_labels(labels, numbering, str(path))


def mask_of(labels: np.ndarray, numbering: str, names) -> np.ndarray:
    """(H, W) bool: pixels whose class is one of ``names``."""
    return np.isin(labels, class_ids(numbering, names))


def garment_masks(labels: np.ndarray, numbering: str, source: str = "<labels>", require_garment: bool = True):
    """(upper garment mask, garment region mask), both (H, W) bool. With ``require_garment`` a map
    without any upper-garment pixel (or all background) is a :class:`ParsingError` naming ``source``."""
    upper = mask_of(labels, numbering, UPPER_GARMENT)
    region = mask_of(labels, numbering, GARMENT_REGION)
    if require_garment:
        if not (labels > 0).any():
            raise ParsingError(f"{source}: the parsing map is all background (no person)")
        if not upper.any():
            present = sorted({NUMBERINGS[numbering][int(v)] for v in np.unique(labels)})
            raise ParsingError(f"{source}: no upper garment ({', '.join(UPPER_GARMENT)}) in the parsing map "
                               f"({numbering.upper()} numbering; classes present: {', '.join(present)})")
    return upper, region


def to_lip(labels: np.ndarray, numbering: str) -> np.ndarray:
    """Re-number a map into LIP's numbering (ATR's belt and bag become background; CIHP's torso-skin
    becomes LIP 10, read back as jumpsuits only by code that asks LIP for it)."""
    if numbering == "lip":
        return labels
    lip = NUMBERINGS["lip"]
    lut = np.zeros(256, np.uint8)
    for i, name in enumerate(NUMBERINGS[numbering]):
        lut[i] = lip.index(name) if name in lip else (10 if name == "torso-skin" else 0)
    return lut[labels]


class Parser:
    """A human parser: ``parse(image (H, W, 3) uint8 RGB) -> (H, W) integer labels`` in ``numbering``.

    Subclass it (or pass any object with ``numbering`` and ``parse``) for a real model, e.g. SCHP:
    ``__init__(self, weights)`` loads the user's local weights file; nothing is downloaded."""

    numbering: str = "lip"

    def parse(self, image: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


def load_parser(spec: str, weights: Optional[str] = None) -> Parser:
    """``spec`` = ``package.module:ClassName``; the class is called with ``weights`` (a local file) when
    given. The result must have ``parse`` and a known ``numbering``."""
    if ":" not in spec:
        raise InputError(f"--parser must look like package.module:ClassName, got {spec!r}")
    module_name, _, cls_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise InputError(f"--parser {spec}: cannot import it ({e})") from None
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"parser weights {weights} not found (weights are never downloaded: give a local file)")
    parser = cls(weights) if weights is not None else cls()
    if not callable(getattr(parser, "parse", None)) or getattr(parser, "numbering", None) not in NUMBERINGS:
        raise InputError(f"--parser {spec}: needs a parse(image) method and numbering in {sorted(NUMBERINGS)}")
    return parser


def run_parser(parser: Parser, image: np.ndarray, source: str = "<image>") -> np.ndarray:
    """Run ``parser`` on an (H, W, 3) uint8 image; its output is checked like a file's (numbering, size)."""
    labels = np.asarray(parser.parse(image))
    if labels.shape != image.shape[:2]:
        raise ParsingError(f"{source}: the parser returned a {labels.shape} map for a {image.shape[:2]} image")
    return check_labels(labels, parser.numbering, f"{source} (parser output)")
