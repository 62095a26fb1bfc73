"""The figure's skeleton: body proportions, joint limits, pose sampling and 3-D kinematics."""
from __future__ import annotations

import math

import numpy as np

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
# The pre-defined frontal pose of the try-on pipeline: facing the camera, arms away from the torso
# and legs apart, so that nothing occludes the garment.
FRONTAL_POSE = {**{f"{s}_{j}": v for s in ("r", "l") for j, v in
                   (("shoulder_flex", 0.0), ("shoulder_abd", 28.0), ("elbow", 8.0), ("forearm_twist", 0.0),
                    ("hip_flex", 0.0), ("hip_abd", 8.0), ("knee", 0.0))},
                "lean_fwd": 0.0, "lean_side": 0.0, "head_yaw": 0.0, "head_pitch": 0.0, "yaw": 0.0}
OPENPOSE_JOINTS = ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
                   "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear")


def _rot(axis: str, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


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
    j["neck"] = torso @ np.array([0, SPINE, 0])
    for side, sx in (("r", -1.0), ("l", 1.0)):
        j.update(_limbs(ident, pose, yaw, torso, side, sx))
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


def _limbs(ident: dict, pose: dict, yaw: np.ndarray, torso: np.ndarray, side: str, sx: float) -> dict:
    """One side's arm and leg joints; ``sx`` is the side's sign along x (right: -1)."""
    down = np.array([0.0, -1.0, 0.0])
    sh = torso @ np.array([sx * ident["shoulder"], SPINE - 0.025, 0])
    arm = torso @ _rot("x", -pose[f"{side}_shoulder_flex"]) @ _rot("z", sx * pose[f"{side}_shoulder_abd"])
    elbow = sh + UPPER_ARM * (arm @ down)
    fore = arm @ _rot("y", sx * pose[f"{side}_forearm_twist"]) @ _rot("x", -pose[f"{side}_elbow"])
    wrist = elbow + FOREARM * (fore @ down)
    hip = yaw @ np.array([sx * ident["hip"], 0, 0])
    leg = yaw @ _rot("x", -pose[f"{side}_hip_flex"]) @ _rot("z", sx * pose[f"{side}_hip_abd"])
    knee = hip + THIGH * (leg @ down)
    shin = leg @ _rot("x", pose[f"{side}_knee"])
    ankle = knee + SHIN * (shin @ down)
    toe = ankle + 0.075 * (shin @ np.array([0, -0.35, 1.0]))
    return {f"{side}_shoulder": sh, f"{side}_elbow": elbow, f"{side}_wrist": wrist, f"{side}_hip": hip,
            f"{side}_knee": knee, f"{side}_ankle": ankle, f"{side}_toe": toe,
            f"{side}_hand": wrist + 0.035 * (fore @ down)}
