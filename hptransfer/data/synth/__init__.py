"""Synthetic people in the DeepFashion pose-transfer benchmark format (``hptransfer data synth``).

Each identity is an articulated, human-like figure with its own garments (a high-frequency
texture: stripes, checks, dots, a print or knit, and a logo or text on the chest), skin, hair and
trouser colours, and its own background (plain, wall-and-floor or wallpaper). Each of its M poses
comes from a 3-D kinematic skeleton with joint limits (random angles within limits per joint, a body
yaw giving front, three-quarter, side and back views, global scale and translation, sometimes an
upper-body crop), projected orthographically. Body parts are drawn far to near (depth order), so
limbs hide and reveal each other and the torso; garment textures are mapped onto the torso and
sleeves in the body's own frame, so the texture moves with the body.

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

Modules: ``skeleton`` (proportions, pose sampling, kinematics), ``appearance`` (colours, textures,
backgrounds, garment swaps), ``canvas`` (drawing primitives), ``renderer`` (framing, the parts table and
its drawing), ``people`` (identities by number), ``write`` (the dataset on disk, body masks), ``cli``.
"""
from hptransfer.data.synth.appearance import GARMENT_KEYS, make_identity
from hptransfer.data.synth.cli import add_arguments, run
from hptransfer.data.synth.people import render_frontal, render_identity
from hptransfer.data.synth.renderer import frontal_keypoints, render, render_parsed
from hptransfer.data.synth.skeleton import VIEW_ORDER, sample_pose
from hptransfer.data.synth.write import PARAMS_FILE, PARSING_DIR, body_masks, synthesize

__all__ = ["GARMENT_KEYS", "PARAMS_FILE", "PARSING_DIR", "VIEW_ORDER", "add_arguments", "body_masks",
           "frontal_keypoints", "make_identity", "render", "render_frontal", "render_identity", "render_parsed",
           "run", "sample_pose", "synthesize"]
