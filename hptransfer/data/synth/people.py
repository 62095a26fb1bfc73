"""Identities by number: (seed, identity) -> the person, its poses' views and image names, its renders.

Every function here is pure in its arguments, so the dataset writer, body masks and the try-on
ground truth all render the same pixels for the same identity.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from hptransfer.data.synth.appearance import make_identity, wearing
from hptransfer.data.synth.renderer import render_parsed
from hptransfer.data.synth.skeleton import FRONTAL_POSE, VIEW_ORDER, sample_pose


def _view_for(identity: int, pose_index: int, views: tuple = VIEW_ORDER) -> str:
    return views[(identity + pose_index) % len(views)]


def _image_name(identity: int, pose_index: int, view: str) -> str:
    return f"person{identity:05d}_{pose_index:02d}_{view}.jpg"


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
