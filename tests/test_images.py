"""hptransfer.images: the one to_uint8 and the one skeleton drawer (report grids, video panels, data show)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hptransfer.images import HUE_COLOURS, OPENPOSE_COLOURS, RAINBOW_COLOURS, draw_skeleton, to_uint8
from hptransfer.pose import LIMB_PAIRS


def test_to_uint8_quantises_like_a_saved_png():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 2, 3).expand(2, 3, 2, 3).requires_grad_()
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == (2, 3, 2, 3) and u.device == x.device
    assert u[0, 0].flatten().tolist() == [0, 0, 128, 191, 255, 255]
    already = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    assert to_uint8(already) is already


def _two_limbs() -> np.ndarray:
    kp = np.full((18, 2), -1.0, np.float32)
    kp[1] = (20, 32)   # neck
    kp[2] = (20, 20)   # right shoulder: limb 0 (1, 2)
    kp[5] = (20, 44)   # left shoulder: limb 1 (1, 5)
    return kp


def test_new_canvas_limbs_in_their_colours_and_missing_keypoints_left_out():
    kp = _two_limbs()
    pic = draw_skeleton(torch.from_numpy(kp), 64)  # the report's style: hues on black, white joints
    assert pic.shape == (64, 64, 3) and pic.dtype == np.uint8
    assert tuple(pic[20, 26]) == HUE_COLOURS[0] and tuple(pic[20, 38]) == HUE_COLOURS[1]
    assert tuple(pic[20, 32]) == (255, 255, 255)  # the neck joint on top of the limbs
    # nothing drawn for the missing joints: everything away from the two limbs on row 20 is background
    assert (pic[:14] == 0).all() and (pic[27:] == 0).all() and (pic[:, :14] == 0).all() and (pic[:, 51:] == 0).all()
    assert (draw_skeleton(np.full((18, 2), -1.0), 32) == 0).all()
    white = draw_skeleton(kp, 64, background=(255, 255, 255), limb_colours=RAINBOW_COLOURS, joint_colours=(0, 0, 0))
    assert tuple(white[0, 0]) == (255, 255, 255) and tuple(white[20, 26]) == RAINBOW_COLOURS[0]
    assert tuple(white[20, 32]) == (0, 0, 0)


def test_drawn_in_place_on_a_photo_with_per_joint_colours_and_outlines():
    img = Image.new("RGB", (64, 48), (10, 20, 30))
    pic = draw_skeleton(_two_limbs(), img, limb_colours=OPENPOSE_COLOURS, joint_colours=OPENPOSE_COLOURS,
                        joint_outline=(0, 0, 0), width=1, joint_radius=3)
    assert np.array_equal(pic, np.asarray(img)) and pic.shape == (48, 64, 3)
    assert tuple(pic[20, 32]) == OPENPOSE_COLOURS[1]  # joint 1's fill
    assert tuple(pic[20, 29]) == (0, 0, 0)  # its outline, radius 3
    assert tuple(pic[20, 26]) == OPENPOSE_COLOURS[0]  # limb 0
    assert tuple(pic[40, 5]) == (10, 20, 30)


def test_palettes_have_one_colour_per_limb_and_bad_shapes_are_refused():
    assert len(HUE_COLOURS) == len(RAINBOW_COLOURS) == len(OPENPOSE_COLOURS) == len(LIMB_PAIRS)
    with pytest.raises(ValueError, match="18, 2"):
        draw_skeleton(np.zeros((17, 2)), 32)
