"""``hptransfer infer``: one image of the reference person in a target pose, and the pose readers
that ``hptransfer video`` shares.

Pose sources (all become OpenPose-18 (18, 2) (y, x) pixels of the pose's own image):

- our annotation CSV: ``poses.csv --pose-name NAME`` or ``poses.csv:NAME``;
- an OpenPose JSON (COCO-18 or BODY_25) or a COCO-17 keypoint JSON;
- an image: pose estimated with the optional ``mediapipe`` extra (``pip install --no-deps -r requirements-mediapipe.txt``).

The reference image is fitted to the generator's R x R input exactly as in training
(:func:`hptransfer.data.dataset.fit_image`, white padding). The pose is placed in the model's square
by ``--frame``:

- ``person`` (person-centred framing, as every pose-transfer dataset frames its images): a square
  box around the pose's visible keypoints, their extent plus :data:`FRAME_MARGIN` of it on each side
  (a standing person's keypoints then fill 80% of the height, as in DeepFashion's 256x176 shots),
  mapped onto R x R. The pose's image size does not matter: a BODY_25 JSON of a 1920x1080 frame
  works as is. ``--paste-back [FRAME]`` resizes the generated square to the box and pastes it into
  the frame the pose belongs to (the pose's own image by default).
- ``fit``: the training transform from the pose's image size (``--pose-size HxW``, the image of a
  dataset CSV row (``DIR/images/NAME`` beside ``DIR/annotations-*.csv``), the estimated image's size,
  or else the reference's size): for poses already framed like the training data.
- ``auto`` (default): ``person`` for poses estimated from an image and for pose files (JSON, CSV)
  whose keypoints do not lie inside the reference image (another frame's coordinates); ``fit``
  otherwise (poses framed like the reference, or their frame's size known).

The choice and its reason are logged. Warned about (the result is still written): a pose with fewer than
:data:`MIN_KEYPOINTS` visible keypoints; under fit framing, a pose frame whose shape differs from the
reference's, or a pose that fitted to the square spans less than :data:`MIN_POSE_EXTENT` of it
(e.g. a pose CSV of a 256x256 image taken as pixels of a 512x256 reference).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hptransfer.errors import InputError, MissingDependency, disk_error

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
FRAMES = ("auto", "person", "fit")
# Margin around the keypoints' extent, per side, as a fraction of it: keypoints (nose to ankles) fill
# 1 / 1.25 = 80% of the box, as in DeepFashion's 256-px-high shots and the synthetic "centred" framing.
FRAME_MARGIN = 0.125
# A pose with fewer visible keypoints is warned about (a head and shoulders give 8: nose, neck, eyes, ears,
# shoulders); the model never saw such poses drawn as whole persons.
MIN_KEYPOINTS = 8
# Under fit framing a pose spanning less of the square than this (its longer side) is warned about
# (training poses span about 1 / (1 + 2 * FRAME_MARGIN) = 80%).
MIN_POSE_EXTENT = 0.5


class UnknownPoseName(InputError, KeyError):
    """``--pose-name`` is not a row of the annotation CSV."""


def mediapipe_to_openpose18(landmarks, height: int, width: int, **kw) -> np.ndarray:
    """(33, 3|4) MediaPipe landmarks of an H x W image -> (18, 2) (y, x): the shared mapping
    :func:`hptransfer.pose.from_mediapipe33` (neck = shoulder midpoint, hips moved toward the
    shoulders by ``pose.MEDIAPIPE_HIP_SHIFT``), the same one the video-dataset preparation uses."""
    from hptransfer.pose import from_mediapipe33

    return from_mediapipe33(landmarks, (height, width), **kw)


@contextlib.contextmanager
def quiet_native_logs():
    """File descriptor 2 into a temp file while MediaPipe's C++ runs: TF-Lite, absl and glog write their
    INFO/WARNING lines there on every graph, below any Python log level or environment switch that
    mediapipe 0.10.21 honours. What was written goes to this module's DEBUG log (``hptransfer -v``)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (a detached process): nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
        sink.seek(0)
        text = sink.read().decode("utf-8", "replace").strip()
    if text:
        log.debug("MediaPipe's native log:\n%s", text)


def import_mediapipe():
    """The ``mediapipe`` module, or :class:`MissingDependency` saying how to install it. Imported
    quietly (:func:`quiet_native_logs`), with protobuf's ``GetPrototype`` restored first."""
    try:
        from google.protobuf import message_factory
    except ImportError:
        message_factory = None
    if message_factory is not None and not hasattr(message_factory.MessageFactory, "GetPrototype"):
        # mediapipe 0.10.21's C++ bindings call GetPrototype while they load, gone since protobuf 5 (onnx
        # needs >= 6): without it the import prints an AttributeError; GetMessageClass is its replacement
        message_factory.MessageFactory.GetPrototype = lambda self, d: message_factory.GetMessageClass(d)
    try:
        with quiet_native_logs():
            import mediapipe as mp
    except ImportError:
        raise MissingDependency("pose estimation from images needs MediaPipe: "
                                'pip install --no-deps -r requirements-mediapipe.txt') from None
    return mp


def estimate_pose(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (18, 2) (y, x) with MediaPipe Pose (all missing when no person is found).
    Prints nothing: MediaPipe's native log lines go to the DEBUG log."""
    mp = import_mediapipe()
    h, w = image.shape[:2]
    # complexity 1 ("full"): its model ships in the wheel; 2 ("heavy") is downloaded on first use
    with quiet_native_logs(), mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1) as pose:
        res = pose.process(np.ascontiguousarray(image))
    if res.pose_landmarks is None:
        return np.full((18, 2), -1, np.float32)
    lm = np.array([(p.x, p.y, p.z, p.visibility) for p in res.pose_landmarks.landmark], np.float32)
    return mediapipe_to_openpose18(lm, h, w)


def parse_size(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``"256x176"`` -> (256, 176) (height x width)."""
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--pose-size must be HxW (e.g. 256x176), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise InputError(f"--pose-size must be positive, got {text!r}")
    return h, w


def _read_json_pose(path: Path, person: int = 0) -> np.ndarray:
    import json

    from hptransfer import pose

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read JSON: {e}") from None
    if isinstance(data, dict) and "people" in data:
        return pose.read_openpose_json(path, person)
    return pose.read_coco17_json(path, person)


def read_pose(source: str, pose_name: Optional[str] = None, person: int = 0):
    """Read one pose. Returns ``(kp (18, 2) float32 (y, x), image_size (H, W) or None)``; the size is
    known only when the pose was estimated from an image."""
    from hptransfer.data import read_annotations

    path = Path(source)
    if not path.exists() and ":" in source:
        head, _, name = source.rpartition(":")
        if head.lower().endswith(".csv"):
            path, pose_name = Path(head), name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pose file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        if not pose_name:
            raise InputError(f"{path}: an annotation CSV needs --pose-name NAME (or {path}:NAME)")
        ann = read_annotations(path)
        if pose_name not in ann:
            raise UnknownPoseName(f"{path}: no row named {pose_name!r}")
        return np.asarray(ann[pose_name], np.float32), None
    if suffix == ".json":
        return _read_json_pose(path, person), None
    if suffix in IMAGE_SUFFIXES:
        from hptransfer.data.dataset import load_image
        img = np.asarray(load_image(path))
        return estimate_pose(img), img.shape[:2]
    raise InputError(f"{path}: unknown pose source (expected .csv, .json or an image)")


def fit_reference(path: str | Path, resolution: int):
    """Reference image file -> ((3, R, R) float32 in [-1, 1], original (H, W)), fitted as in training."""
    from hptransfer.data.dataset import fit_image, load_image, to_tensor

    img = load_image(Path(path))
    return to_tensor(fit_image(img, resolution)), (img.height, img.width)


def fit_pose(kp: np.ndarray, pose_size: tuple[int, int], resolution: int) -> torch.Tensor:
    """(18, 2) (y, x) of a pose_size image -> (18, 2) float32 tensor at R, by training's fit transform."""
    from hptransfer.data.dataset import fit_keypoints

    kp = np.asarray(kp, np.float32)
    bad = _outside(kp, pose_size)
    if bad.any():
        log.warning("pose has keypoints outside its %dx%d image (%d of them); use --frame person, or pass "
                    "--pose-size HxW if the pose comes from an image of another size", pose_size[0], pose_size[1],
                    int(bad.sum()))
    return torch.from_numpy(fit_keypoints(kp, pose_size[0], pose_size[1], resolution))


def _outside(kp: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(18,) bool: visible keypoints beyond an H x W image."""
    return (kp >= 0).all(axis=1) & ((kp[:, 0] > size[0] + 0.5) | (kp[:, 1] > size[1] + 0.5))


# ---------------------------------------------------------------- person-centred framing

def person_box(kp: np.ndarray, margin: float = FRAME_MARGIN) -> tuple[int, int, int, int]:
    """Square (left, top, right, bottom) pixel box around the visible (18, 2) (y, x) keypoints: their
    extent plus ``margin`` of it on each side, centred on it (the box may leave the image)."""
    from hptransfer.data.prepare_common import bbox_crop_box

    kp = np.asarray(kp, np.float32)
    if not (kp >= 0).all(axis=1).any():
        raise InputError("the pose has no visible keypoint to frame")
    return bbox_crop_box(kp, 1, 1, 1.0, margin)  # the image size (1, 1) only matters without keypoints


def frame_pose(kp: np.ndarray, box, resolution: int) -> torch.Tensor:
    """(18, 2) (y, x) in the pose's image -> (18, 2) float32 tensor in the R x R square of ``box``
    (the mapping of :func:`hptransfer.data.prepare_common.crop_resize`); missing stays -1."""
    left, top, right, bottom = box
    kp = np.asarray(kp, np.float32)
    vis = (kp >= 0).all(axis=1)
    out = np.full_like(kp, -1)
    out[vis, 0] = (kp[vis, 0] - top) * resolution / (bottom - top)
    out[vis, 1] = (kp[vis, 1] - left) * resolution / (right - left)
    out[vis] = np.clip(out[vis], 0, resolution - 1)  # negative would read as missing
    return torch.from_numpy(out)


def explain_frame(frame: str, kp: np.ndarray, estimated: bool, pose_size_given: bool, ref_size) -> tuple[str, str]:
    """``--frame auto`` resolved (see the module docstring), and why, for the log; "person" and "fit"
    pass through."""
    if frame != "auto":
        return frame, f"--frame {frame}"
    if estimated:
        return "person", "pose estimated from an image: a box around the person"
    if pose_size_given:
        return "fit", ("the pose's frame size is known (--pose-size, or the dataset image of its CSV row): the "
                       "training transform from that frame")
    kp = np.asarray(kp, np.float32)
    out = _outside(kp, ref_size)
    if out.any():
        vis = kp[(kp >= 0).all(axis=1)]
        return "person", (f"{int(out.sum())} keypoints lie outside the {ref_size[0]}x{ref_size[1]} reference (up to "
                          f"y {vis[:, 0].max():.0f}, x {vis[:, 1].max():.0f}): the pose is in another frame's "
                          f"coordinates, so a box around the person")
    return "fit", (f"the keypoints lie inside the {ref_size[0]}x{ref_size[1]} reference: taken as pixels of a frame "
                   f"like it (the training transform)")


def choose_frame(frame: str, kp: np.ndarray, estimated: bool, pose_size_given: bool, ref_size) -> str:
    """``--frame auto`` resolved (see :func:`explain_frame`, which also says why)."""
    return explain_frame(frame, kp, estimated, pose_size_given, ref_size)[0]


def count_visible(kp) -> int:
    return int((np.asarray(kp) >= 0).all(axis=-1).sum())


def few_keypoints_warning(kp, source: str) -> Optional[str]:
    """A warning when a pose has fewer than :data:`MIN_KEYPOINTS` visible keypoints, else None."""
    n = count_visible(kp)
    if n >= MIN_KEYPOINTS:
        return None
    from hptransfer.pose import KEYPOINT_NAMES

    names = [KEYPOINT_NAMES[i] for i in np.flatnonzero((np.asarray(kp) >= 0).all(axis=1))]
    return (f"{source}: only {n} of 18 keypoints ({', '.join(names) or 'none'}); the model learnt from poses with "
            f"most of them (fewer than {MIN_KEYPOINTS} is warned about): expect a partial or distorted person")


def fit_warnings(kp_fitted, pose_size, ref_size, assumed: bool, resolution: int) -> dict[str, str]:
    """Why fit framing may draw the person wrong: the pose's frame and the reference's differ in shape,
    or the pose fitted to the square (``kp_fitted``, :func:`fit_pose`'s result) spans less than
    :data:`MIN_POSE_EXTENT` of it on its longer side (the pose comes from a larger frame than assumed, or
    shows a small person). ``assumed``: ``pose_size`` is the reference's size because nothing said otherwise.
    Returns {"shape" | "extent": warning}."""
    out = {}
    (ph, pw), (rh, rw) = pose_size, ref_size
    if not assumed and abs(ph / pw - rh / rw) > 0.05 * (rh / rw):
        out["shape"] = (f"the pose's frame ({ph}x{pw}) and the reference ({rh}x{rw}) differ in shape: each is fitted "
                        f"to the model's square on its own, so the person is drawn where the pose's frame puts it")
    kp_r = np.asarray(kp_fitted)
    vis = kp_r[(kp_r >= 0).all(axis=1)]
    extent = float((vis.max(axis=0) - vis.min(axis=0)).max()) / resolution if len(vis) else 0.0
    if extent < MIN_POSE_EXTENT:
        where = (f"taken as pixels of the {ph}x{pw} reference, since the pose file does not say its image's size"
                 if assumed else f"in its {ph}x{pw} frame")
        out["extent"] = (f"fit framing: the pose spans only {extent:.0%} of the model's square ({where}; "
                         f"training poses span about 80%): if the pose comes from an image of another size give "
                         f"--pose-size HxW; or --frame person to frame the person")
    return out


def dataset_image_size(source: str, pose_name: Optional[str]) -> Optional[tuple[int, int]]:
    """(H, W) of the image a dataset annotation row belongs to (``DIR/images/NAME`` beside
    ``DIR/annotations-*.csv``), or None when the pose is not such a row or the image is not there."""
    from hptransfer.data.formats import image_size

    path = Path(source)
    if not path.exists() and ":" in source:
        head, _, pose_name = source.rpartition(":")
        path = Path(head)
    if path.suffix.lower() != ".csv" or not pose_name:
        return None
    try:
        return image_size(path.parent / "images" / pose_name)
    except (OSError, ValueError):
        return None


def paste_back(frame, generated: np.ndarray, box):
    """The PIL ``frame`` with the (R, R, 3) uint8 ``generated`` square resized to ``box`` and pasted in
    (the part of the box outside the frame is dropped)."""
    from PIL import Image

    left, top, right, bottom = box
    square = Image.fromarray(generated).resize((right - left, bottom - top), Image.BICUBIC)
    out = frame.convert("RGB").copy()
    out.paste(square, (left, top))
    return out


def save_image(image, path: str | Path) -> None:
    """(3, H, W) float in [-1, 1] or uint8 tensor, or a PIL image -> image file, written atomically."""
    from PIL import Image

    from hptransfer.metrics import to_uint8

    path = Path(path)
    if not isinstance(image, Image.Image):
        image = Image.fromarray(to_uint8(image.detach().cpu()[None])[0].permute(1, 2, 0).numpy())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".png", dir=path.parent)
    except OSError as e:
        raise disk_error(path, e) or e
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise disk_error(path, e) or e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def add_frame_arguments(p, paste_help: str) -> None:
    """``--frame`` and ``--paste-back``, shared with ``hptransfer video``."""
    p.add_argument("--frame", choices=FRAMES, default="auto",
                   help="person: a box around the pose's keypoints (with margins as in DeepFashion) fitted to the "
                        "model's square; fit: the training transform from --pose-size; auto (default): person for "
                        "estimated poses and JSON poses outside the reference image, fit otherwise")
    p.add_argument("--paste-back", nargs="?", const="", default=None, metavar="FRAME", help=paste_help)


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="export directory, training checkpoint (single-process or DeepSpeed: step_* dir) or run "
                        "directory (its latest checkpoint)")
    p.add_argument("--reference", required=True, help="image of the person (any size; fitted as in training)")
    p.add_argument("--pose", required=True, help="pose: CSV (+ --pose-name, or CSV:NAME), OpenPose/COCO JSON, or image")
    p.add_argument("--pose-name", default=None, help="row name in an annotation CSV")
    p.add_argument("--pose-size", default=None, help="HxW of the image the pose coordinates belong to, for "
                   "--frame fit (default: the estimated image's size, else the reference's size)")
    p.add_argument("--person", type=int, default=0, help="which person in a multi-person JSON")
    add_frame_arguments(p, "write the frame the pose belongs to with the generated person pasted into the "
                           "person's box (FRAME: that image; default: the --pose image); needs person framing")
    p.add_argument("--out", required=True, help="output image (.png)")
    p.add_argument("--device", default=None, help="default: cuda when present")


def run(args) -> int:
    from hptransfer.export import generate, load_any

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = load_any(args.checkpoint, device=device, prefer_export=True)
    R = g.resolution
    ref, ref_size = fit_reference(args.reference, R)
    kp, est_size = read_pose(args.pose, args.pose_name, args.person)
    if not count_visible(kp):
        raise InputError(f"{args.pose}: no keypoint found")
    few = few_keypoints_warning(kp, args.pose)
    if few:
        log.warning("%s", few)
    frame_image = None
    if args.paste_back is not None:
        source = args.paste_back or (args.pose if est_size is not None else None)
        if not source:
            raise InputError("--paste-back needs the image the pose belongs to: --paste-back FRAME.jpg "
                             "(or a pose estimated from an image)")
        from hptransfer.data.dataset import load_image
        frame_image = load_image(Path(source))
    known = parse_size(args.pose_size) or dataset_image_size(args.pose, args.pose_name)
    mode, why = explain_frame(args.frame, kp, est_size is not None, known is not None, ref_size)
    log.info("framing: %s (%s)", mode, why)
    if mode == "person":
        box = person_box(kp)
        kp_r = frame_pose(kp, box, R)
    else:
        if frame_image is not None:
            raise InputError("--paste-back needs person framing (--frame person)")
        known = known or est_size
        pose_size = known or ref_size
        kp_r = fit_pose(kp, pose_size, R)
        for w in fit_warnings(kp_r, pose_size, ref_size, known is None, R).values():
            log.warning("%s", w)
    out = generate(g, ref[None], kp_r[None])[0]
    if frame_image is not None:
        from hptransfer.metrics import to_uint8
        square = to_uint8(out.detach().cpu()[None])[0].permute(1, 2, 0).numpy()
        save_image(paste_back(frame_image, square, box), args.out)
        print(f"wrote {args.out} ({frame_image.width}x{frame_image.height}, generated {R}x{R} pasted into "
              f"box {box})")
        return 0
    save_image(out, args.out)
    print(f"wrote {args.out} ({R}x{R}, {mode} framing)")
    return 0
