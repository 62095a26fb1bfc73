"""``hptransfer data h36m``: Human3.6M -> a pose-transfer dataset (paper section 4.1).

Layout read under ``--root`` (per subject ``S1``, ``S5``, ...; a sequence is ``<Action>.<camera>``,
e.g. ``Posing.54138969`` or ``Walking 1.55011271``):

- frames: ``S1/Videos/<seq>.mp4`` (decoded with imageio-ffmpeg), or extracted frames
  ``S1/Frames/<seq>/*.jpg|png`` or ``S1/Images/<seq>/`` (sorted; one per source frame at ``--frames-fps``,
  50 by default);
- 2D poses: VideoPose3D's ``data_2d_h36m_gt.npz`` (``--poses FILE``, or found in ``--root``):
  ``positions_2d[subject][action][camera index]`` arrays (T, 17, 2) of (x, y) pixels, cameras in
  the order of :data:`CAMERAS`; or the original ``S1/MyPoseFeatures/D2_Positions/<seq>.cdf``
  (needs the ``cdflib`` package, not a dependency of hptransfer);
- masks (optional): ``S1/Masks/<seq>/*.png`` (one per source frame, sorted; nonzero = person) or the
  original ``S1/MySegmentsMat/ground_truth_bs/<seq>.mat`` (scipy.io; v7.3 files need h5py).

Frames are sampled at ``--fps`` (3, from 50), the background is whitened with the masks (without
masks: the frame is only cropped, and the log says so), and a square box around the pose (margin
``--margin`` of the body height) is resized to ``--size``. Actions split as in the paper: Posing,
Greeting, Walking -> train; Directions -> test (``--train-actions`` / ``--test-actions``). Pairs
are all ordered pairs within one subject and camera (and split), capped by ``--max-pairs``.

Keypoints (``--keypoints``): the paper uses 18 OpenPose keypoints (section 3.1, OpenPose [3]); H36M's
ground truth has no eyes or ears. Three sources, one per run (recorded in the manifest):

- ``gt+mediapipe`` (default): the ground-truth body joints (below) and MediaPipe Pose's eyes and ears,
  estimated on the cropped frame (static image mode) and kept only where MediaPipe's nose lies within
  :data:`FACE_TOLERANCE` shoulder widths of the ground truth's (else they stay missing; the count is
  logged). Needs the optional ``mediapipe`` extra.
- ``openpose``: all 18 from OpenPose JSON files (COCO-18 or BODY_25, as ``data video`` reads them),
  ``--openpose-json DIR`` holding ``DIR/<subject>/<sequence>/*.json``, one per source frame or one per
  sampled frame in sorted name order: the paper's estimator.
- ``gt``: the ground-truth body joints only; eyes and ears stay missing, so at 1024 px 4 heatmaps are
  empty and 4 of the 44 descriptors never exist.

Every source crops the same box, from the ground-truth joints. Ground-truth joints: H36M-17 in
VideoPose3D order -> OpenPose-18 by :data:`H36M17_TO_OPENPOSE18`. Approximated: OpenPose's neck is
H36M's thorax (8), OpenPose's nose is H36M's neck/nose joint (9). H36M's head top (10) and spine (7)
are unused.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from hptransfer.data.prepare_common import (PrepareError, all_pairs, bbox_crop_box, crop_resize, final_check,
                                            person_frame, progress)
from hptransfer.data.shard_writer import ShardOptions, add_sink_arguments, open_sink, sink_shards
from hptransfer.data.prepare_video import count_frames, read_video, sample_indices

log = logging.getLogger(__name__)

CAMERAS = ("54138969", "55011271", "58860488", "60457274")  # VideoPose3D's camera order
# H36M-17 (VideoPose3D order) index -> OpenPose-18 index.
H36M17_TO_OPENPOSE18 = {9: 0, 8: 1, 14: 2, 15: 3, 16: 4, 11: 5, 12: 6, 13: 7,
                        1: 8, 2: 9, 3: 10, 4: 11, 5: 12, 6: 13}
# The 17 of H36M's 32 D2_Positions joints that VideoPose3D keeps, in its order.
H36M32_KEEP = (0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27)
KEYPOINT_SOURCES = ("gt+mediapipe", "openpose", "gt")
DEFAULT_KEYPOINTS = "gt+mediapipe"
FACE = (14, 15, 16, 17)  # OpenPose-18 eyes and ears: no H36M joint
# MediaPipe's face points are kept when its nose is this many ground-truth shoulder widths from the
# ground truth's nose (H36M's neck/nose joint sits a little below the nose: a loose bound).
FACE_TOLERANCE = 0.5
TRAIN_ACTIONS = ("Posing", "Greeting", "Walking")
TEST_ACTIONS = ("Directions",)
FRAME_EXTS = (".jpg", ".jpeg", ".png")


def from_h36m17(xy: np.ndarray) -> np.ndarray:
    """H36M-17 (17, 2) (x, y) pixels -> OpenPose-18 (18, 2) float32 (y, x); eyes/ears -1."""
    xy = np.asarray(xy, dtype=np.float32).reshape(17, 2)
    out = np.full((18, 2), -1, np.float32)
    for h, o in H36M17_TO_OPENPOSE18.items():
        if np.isfinite(xy[h]).all() and (xy[h] >= 0).all():
            out[o] = (xy[h, 1], xy[h, 0])
    return out


def merge_face(kp_gt: np.ndarray, kp_est: np.ndarray, tolerance: float = FACE_TOLERANCE) -> tuple[np.ndarray, bool]:
    """Ground-truth body joints (18, 2) (y, x) with the eyes and ears of an estimate (same image) where
    the estimate's nose is within ``tolerance`` shoulder widths of the ground truth's nose. Returns
    (keypoints, whether the face was taken)."""
    out = np.array(kp_gt, dtype=np.float32)
    present = lambda k, i: bool((k[i] >= 0).all())  # noqa: E731
    if not (present(kp_gt, 0) and present(kp_est, 0) and present(kp_gt, 2) and present(kp_gt, 5)):
        return out, False
    shoulders = float(np.linalg.norm(kp_gt[2] - kp_gt[5]))
    if float(np.linalg.norm(kp_est[0] - kp_gt[0])) > tolerance * max(shoulders, 1.0):
        return out, False
    out[list(FACE)] = np.asarray(kp_est, dtype=np.float32)[list(FACE)]
    return out, True


class KeypointSource:
    """Keypoints of the sampled frames by ``--keypoints`` (see the module docstring)."""

    def __init__(self, kind: str = DEFAULT_KEYPOINTS, openpose_json=None):
        if kind not in KEYPOINT_SOURCES:
            raise PrepareError(f"--keypoints must be one of {', '.join(KEYPOINT_SOURCES)}, got {kind!r}")
        self.kind = kind
        self.json_dir = Path(openpose_json) if openpose_json else None
        if (kind == "openpose") != (self.json_dir is not None):
            raise PrepareError("--keypoints openpose needs --openpose-json DIR, and --openpose-json goes with it")
        if self.json_dir is not None and not self.json_dir.is_dir():
            raise PrepareError(f"{self.json_dir}: OpenPose JSON folder not found")
        if kind == "gt+mediapipe":  # MediaPipe runs in the workers (h36m_frame): missing, it stops here
            from hptransfer.data.prepare_video import MEDIAPIPE_HINT
            from hptransfer.errors import MissingDependency
            from hptransfer.infer import import_mediapipe

            try:
                import_mediapipe()
            except MissingDependency:
                raise PrepareError(f"{MEDIAPIPE_HINT}; or --keypoints gt (body joints only, no eyes or ears)") from None
        self.files: list[Path] = []

    def begin(self, subject: str, seq: str, n_frames: int, wanted: list[int]) -> None:
        """A new sequence: find its OpenPose files (one per source frame or per sampled frame)."""
        self.wanted = {i: j for j, i in enumerate(wanted)}
        self.n_frames = n_frames
        if self.kind != "openpose":
            return
        d = self.json_dir / subject / seq
        self.files = sorted(d.glob("*.json")) if d.is_dir() else []
        if not self.files:
            raise PrepareError(f"{d}: no OpenPose .json files for {subject}/{seq}")
        if len(self.files) not in (n_frames, len(wanted)):
            raise PrepareError(f"{d}: {len(self.files)} OpenPose JSON files but {subject}/{seq} has {n_frames} frames "
                               f"({len(wanted)} sampled); expected one file per frame")

    def before_crop(self, i: int, kp_gt: np.ndarray) -> np.ndarray:
        """Keypoints of source frame ``i`` in its pixels (OpenPose's, or the ground truth's)."""
        if self.kind != "openpose":
            return kp_gt
        from hptransfer.pose import read_openpose_json

        path = self.files[i] if len(self.files) == self.n_frames else self.files[self.wanted[i]]
        try:
            return read_openpose_json(path)
        except ValueError as e:  # InputError: a broken file, named
            raise PrepareError(f"{e} (frame {i})") from None


_FACE_DETECTOR = None  # one MediaPipe graph per process that makes frames, built on its first frame


def h36m_frame(source, kp_gt: np.ndarray, kp: np.ndarray, mask, margin: float, size: int, label: str,
               with_face: bool):
    """One sampled frame, in a sink's worker: masked (:func:`person_frame`), cropped to the box around the
    ground truth's joints, ``kp`` (the ``--keypoints`` source's, source pixels) carried into the crop; with
    ``with_face``, MediaPipe's eyes and ears on the cropped frame merged in (:func:`merge_face`)."""
    global _FACE_DETECTOR
    img, _ = person_frame(source, kp_gt, mask, None, size, label)
    img, kp = crop_resize(img, kp, bbox_crop_box(kp_gt, img.width, img.height, 1.0, margin), (size, size))
    if with_face:
        if _FACE_DETECTOR is None:
            from hptransfer.data.prepare_video import MediaPipePose
            _FACE_DETECTOR = MediaPipePose(segmentation=False, static=True)
        kp, _ = merge_face(kp, _FACE_DETECTOR(np.asarray(img))[0])
    return img, kp


def base_action(action: str) -> str:
    """'Walking 1' -> 'Walking'; 'WalkDog' stays 'WalkDog' (a different action)."""
    return action.split(" ")[0].split("_")[0]


class Poses:
    """2D poses of every sequence: VideoPose3D npz, else per-sequence CDF files."""

    def __init__(self, root: Path, npz: Optional[Path]):
        self.root = root
        self.data = None
        if npz is None and (root / "data_2d_h36m_gt.npz").exists():
            npz = root / "data_2d_h36m_gt.npz"
        if npz is not None:
            try:
                # VideoPose3D stores a dict of dicts as a pickled object array; only open files you trust.
                self.data = np.load(npz, allow_pickle=True)["positions_2d"].item()
            except (OSError, KeyError, ValueError) as e:
                raise PrepareError(f"{npz}: not a VideoPose3D 2D-pose file with 'positions_2d': {e}") from None
            self.source = str(npz)
            log.info("2D poses from %s", npz)

    def get(self, subject: str, seq: str) -> np.ndarray:
        """(T, 17, 2) (x, y) pixels of ``seq`` = '<Action>.<camera>' of ``subject``."""
        action, _, cam = seq.rpartition(".")
        if self.data is not None:
            if subject not in self.data:
                raise PrepareError(f"{self.source}: no subject {subject!r} (has {sorted(self.data)})")
            acts = self.data[subject]
            if action not in acts:
                raise PrepareError(f"{self.source}: {subject} has no action {action!r}")
            if cam not in CAMERAS:
                raise PrepareError(f"{subject}/{seq}: unknown camera {cam!r} (expected one of {CAMERAS})")
            return np.asarray(acts[action][CAMERAS.index(cam)], dtype=np.float32)
        cdf = self.root / subject / "MyPoseFeatures" / "D2_Positions" / f"{seq}.cdf"
        if not cdf.exists():
            raise PrepareError(f"{cdf}: no 2D poses for {subject}/{seq} (and no data_2d_h36m_gt.npz; give --poses)")
        try:
            import cdflib
        except ImportError:
            raise PrepareError(f"{cdf}: reading H36M .cdf files needs the cdflib package (pip install cdflib), "
                               "or give VideoPose3D's data_2d_h36m_gt.npz with --poses") from None
        pose = np.asarray(cdflib.CDF(str(cdf)).varget("Pose"), dtype=np.float32).reshape(-1, 32, 2)
        return pose[:, list(H36M32_KEEP)]


def load_masks(subject_dir: Path, seq: str, n_frames: int):
    """A function frame index -> (H, W) bool person mask, or None when the sequence has no masks."""
    folder = subject_dir / "Masks" / seq
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
        if len(files) != n_frames:
            raise PrepareError(f"{folder}: {len(files)} mask PNGs but {n_frames} frames; expected one per frame")

        def png(i):
            from PIL import Image
            with Image.open(files[i]) as m:
                return np.asarray(m.convert("L")) > 0
        return png
    mat = subject_dir / "MySegmentsMat" / "ground_truth_bs" / f"{seq}.mat"
    if not mat.exists():
        return None
    try:
        import scipy.io
        masks = scipy.io.loadmat(str(mat))["Masks"].ravel()
        return lambda i: np.asarray(masks[i]) > 0
    except NotImplementedError:  # MATLAB v7.3 = HDF5
        try:
            import h5py
        except ImportError:
            log.warning("%s: MATLAB v7.3 file needs h5py; no background removal for %s", mat, seq)
            return None
        f = h5py.File(str(mat), "r")
        refs = f["Masks"]
        return lambda i: np.asarray(f[refs[i, 0] if refs.shape[1] == 1 else refs[0, i]]).T > 0
    except (ImportError, KeyError, ValueError, OSError) as e:
        log.warning("%s: cannot read masks (%s); no background removal for %s", mat, e, seq)
        return None


def sequences(subject_dir: Path) -> dict[str, tuple[str, Path]]:
    """seq -> ("video", file) or ("frames", folder)."""
    out = {}
    for p in sorted((subject_dir / "Videos").glob("*.mp4")):
        out[p.stem] = ("video", p)
    for folder in ("Frames", "Images"):
        for p in sorted((subject_dir / folder).glob("*")):
            if p.is_dir():
                out[p.name] = ("frames", p)
    return out


def prepare(root, out, poses_npz=None, fps: float = 3.0, frames_fps: float = 50.0, size: int = 512,
            margin: float = 0.15, train_actions=TRAIN_ACTIONS, test_actions=TEST_ACTIONS,
            max_pairs: Optional[int] = 2000, max_mismatch: int = 5, workers: int = 1,
            shards: Optional[ShardOptions] = None, keypoints: str = DEFAULT_KEYPOINTS, openpose_json=None) -> dict:
    """Build the dataset in ``out``; returns {"written", "sequences", "no_masks", "problems", "faces"}
    (faces: [frames with MediaPipe's eyes and ears, frames] with ``gt+mediapipe``). ``workers``: processes
    making the images; ``shards``: write a shard folder instead of a folder."""
    root, out = Path(root), Path(out)
    subjects = sorted(p for p in root.glob("S*") if p.is_dir())
    if not subjects:
        raise PrepareError(f"{root}: no subject folders S1, S5, ...")
    poses = Poses(root, Path(poses_npz) if poses_npz else None)
    source = KeypointSource(keypoints, openpose_json)
    manifest = open_sink(out, {"tool": "h36m", "fps": fps, "size": size, "margin": margin, "keypoints": keypoints},
                         workers, shards)
    groups: dict[tuple[str, str, str], list[str]] = {}
    ann: dict[str, list] = {"train": [], "test": []}
    summary = {"sequences": 0, "no_masks": []}
    try:
        for sdir in subjects:
            for seq, (kind, src) in sequences(sdir).items():
                action, _, cam = seq.rpartition(".")
                base = base_action(action)
                split = "train" if base in train_actions else "test" if base in test_actions else None
                if split is None:
                    continue
                pose = poses.get(sdir.name, seq)
                if kind == "video":
                    n, fps_in = count_frames(src)
                else:
                    frames = sorted(p for p in src.iterdir() if p.suffix.lower() in FRAME_EXTS)
                    n, fps_in = len(frames), frames_fps
                if n == 0:
                    raise PrepareError(f"{src}: no frames")
                if abs(len(pose) - n) > max_mismatch:
                    raise PrepareError(f"{sdir.name}/{seq}: {len(pose)} poses but {n} frames in {src}")
                if len(pose) != n:
                    log.warning("%s/%s: %d poses for %d frames; using the first %d", sdir.name, seq,
                                len(pose), n, min(n, len(pose)))
                n_use = min(n, len(pose))
                masks = load_masks(sdir, seq, n)
                if masks is None:
                    summary["no_masks"].append(f"{sdir.name}/{seq}")
                    log.warning("%s/%s: no masks; background kept, bounding-box crop around the pose only",
                                sdir.name, seq)
                wanted = [i for i in sample_indices(n, fps_in, fps) if i < n_use]
                source.begin(sdir.name, seq, n, wanted)
                if kind == "video":
                    it = ((i, f) for i, f in read_video(src, fps) if i < n_use)
                else:
                    it = ((i, None) for i in wanted)
                safe = seq.replace(" ", "_")
                key = (sdir.name, cam, split)
                for i, frame in progress(it, total=len(wanted), desc=f"{sdir.name} {seq}"):
                    name = f"{sdir.name}/{safe}/f{i:06d}.jpg"
                    if not manifest.is_done(name):  # masked, cropped and written in a worker
                        kp_gt = from_h36m17(pose[i])
                        manifest.submit(name, split, h36m_frame, frames[i] if frame is None else frame, kp_gt,
                                        source.before_crop(i, kp_gt), None if masks is None else masks(i), margin,
                                        size, f"{sdir.name}/{seq} frame {i}", source.kind == "gt+mediapipe")
                    ann[split].append(name)
                    groups.setdefault(key, []).append(name)
                summary["sequences"] += 1
    finally:
        manifest.finish()
    if not summary["sequences"]:
        raise PrepareError(f"{root}: no sequence of the actions {train_actions + test_actions} found "
                           "(S*/Videos/<Action>.<camera>.mp4 or S*/Frames/<Action>.<camera>/)")
    for split in ("train", "test"):
        pairs = []
        for key, names in sorted(groups.items()):
            if key[2] == split:
                pairs += all_pairs(names, max_pairs)
        manifest.write_split(split, {n: manifest.keypoints(n) for n in sorted(ann[split])}, pairs)
    summary["written"] = manifest.writes
    frames_kp = [manifest.keypoints(n) for split in ann for n in ann[split]]
    summary["faces"] = [sum(int((kp[list(FACE)] >= 0).any()) for kp in frames_kp), len(frames_kp)]
    if keypoints == "gt+mediapipe" and frames_kp:
        log.info("MediaPipe eyes and ears kept on %d of %d frames (the rest: no face found, or its nose more than "
                 "%.1f shoulder widths from the ground truth's)", *summary["faces"], FACE_TOLERANCE)
    summary["problems"] = final_check(out)
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("--root", required=True, help="Human3.6M folder holding S1, S5, ...")
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--poses", help="VideoPose3D data_2d_h36m_gt.npz (default: ROOT/data_2d_h36m_gt.npz, "
                        "else S*/MyPoseFeatures/D2_Positions/*.cdf with cdflib)")
    parser.add_argument("--fps", type=float, default=3.0, help="frames per second to sample")
    parser.add_argument("--frames-fps", type=float, default=50.0, help="frame rate of extracted frame folders")
    parser.add_argument("--size", type=int, default=512, help="output side (square crops around the person)")
    parser.add_argument("--margin", type=float, default=0.15, help="crop margin, fraction of the body height")
    parser.add_argument("--train-actions", nargs="+", default=list(TRAIN_ACTIONS))
    parser.add_argument("--test-actions", nargs="+", default=list(TEST_ACTIONS))
    parser.add_argument("--max-pairs", type=int, default=2000, help="at most this many pairs per subject+camera")
    add_sink_arguments(parser)
    parser.add_argument("--keypoints", choices=KEYPOINT_SOURCES, default=DEFAULT_KEYPOINTS,
                        help="gt+mediapipe (default): ground-truth body joints + MediaPipe's eyes and ears; openpose: "
                             "all 18 from --openpose-json (the paper's estimator); gt: body joints only, eyes and ears "
                             "missing")
    parser.add_argument("--openpose-json", default=None, metavar="DIR",
                        help="with --keypoints openpose: DIR/<subject>/<sequence>/*.json, one per frame")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        s = prepare(args.root, args.out, args.poses, args.fps, args.frames_fps, args.size, args.margin,
                    tuple(args.train_actions), tuple(args.test_actions), args.max_pairs, workers=args.workers,
                    shards=sink_shards(args), keypoints=args.keypoints, openpose_json=args.openpose_json)
    except PrepareError as e:
        print(f"error: {e}")
        return 2
    print(f"{args.out}: wrote {s['written']} images from {s['sequences']} sequences "
          f"({len(s['no_masks'])} without masks); data check: {s['problems']} problems")
    return 1 if s["problems"] else 0
