"""``hptransfer video``: the reference person following a sequence of poses, written as MP4.

Pose sequence sources: a folder of OpenPose/COCO JSON files (sorted by name), our annotation CSV
(rows in file order), or a driving video (poses per frame with the optional ``mediapipe`` extra).
Frames are generated in batches and encoded with imageio-ffmpeg (H.264, yuv420p).

``--frame`` as in ``hptransfer infer``; person framing over a sequence keeps one box size (the
largest per-frame box, so the scale does not pump) and smooths the box centre over
:data:`SMOOTH_FRAMES` frames. ``--paste-back`` writes the driving video's frames with the generated
person pasted into the box (poses from a driving video, or ``--paste-back VIDEO`` for JSON poses).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hptransfer import infer
from hptransfer.errors import InputError, disk_error, last_line

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif"}
SMOOTH_FRAMES = 5  # moving-average window of the person box centre


def read_pose_sequence(source: str | Path, person: int = 0):
    """Poses of a sequence: ``(list of (18, 2) float32 (y, x), image size (H, W) or None)``."""
    from hptransfer.data import read_annotations

    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise InputError(f"{path}: no .json pose files in this folder")
        return [infer._read_json_pose(f, person) for f in files], None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pose folder, CSV or video")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        ann = read_annotations(path)
        return [np.asarray(v, np.float32) for v in ann.values()], None
    if suffix in VIDEO_SUFFIXES:
        poses, size = [], None
        for frame in video_frames(path):
            size = frame.shape[:2]
            poses.append(infer.estimate_pose(frame))
        if not poses:
            raise InputError(f"{path}: the video has no frames")
        return poses, size
    raise InputError(f"{path}: unknown pose sequence (folder of JSON, .csv, or a video)")


def video_frames(path: str | Path) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 RGB frames of a video file; a file ffmpeg cannot decode raises InputError naming it."""
    import imageio.v2 as imageio

    i = 0
    try:
        reader = imageio.get_reader(str(path), format="FFMPEG")
    except (OSError, RuntimeError, ValueError, IndexError) as e:
        raise InputError(f"{path}: cannot read video: {last_line(e)}") from None
    try:
        for i, frame in enumerate(reader.iter_data()):
            yield np.asarray(frame)[..., :3]
    except (OSError, RuntimeError, ValueError, IndexError) as e:
        raise InputError(f"{path}: cannot decode frame {i + 1}: {last_line(e)}") from None
    finally:
        reader.close()



def sequence_boxes(poses: list, window: int = SMOOTH_FRAMES) -> list:
    """Person boxes for a pose sequence: one square size (the largest per-frame box) and the per-frame
    centre averaged over ``window`` frames; frames without keypoints take the nearest frame's box."""
    have = [i for i, kp in enumerate(poses) if (np.asarray(kp) >= 0).all(axis=1).any()]
    if not have:
        raise InputError("no frame of the pose sequence has a visible keypoint")
    boxes = {i: infer.person_box(poses[i]) for i in have}
    side = max(max(b[2] - b[0], b[3] - b[1]) for b in boxes.values())
    centres = np.array([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in
                        (boxes[min(have, key=lambda j: abs(j - i))] for i in range(len(poses)))])
    if window > 1 and len(centres) > 1:
        pad = window // 2
        padded = np.concatenate([centres[:1].repeat(pad, 0), centres, centres[-1:].repeat(pad, 0)])
        kernel = np.ones(window) / window
        centres = np.stack([np.convolve(padded[:, k], kernel, mode="valid") for k in range(2)], axis=1)
    out = []
    for cx, cy in centres:
        left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
        out.append((left, top, left + side, top + side))
    return out


def generate_frames(generator, reference: torch.Tensor, poses: torch.Tensor, batch_size: int = 8,
                    side_by_side: bool = False, progress: bool = True) -> Iterator[np.ndarray]:
    """Yield (R, R|2R, 3) uint8 frames: ``reference`` (3, R, R) in [-1, 1] in each pose of ``poses`` (T, 18, 2)."""
    from tqdm import tqdm

    from hptransfer.export import generate
    from hptransfer.images import RAINBOW_COLOURS, draw_skeleton, to_uint8

    R = generator.resolution
    bar = tqdm(total=len(poses), desc="frames", unit="frame", disable=not progress, leave=False)
    for i in range(0, len(poses), batch_size):
        kp = poses[i:i + batch_size]
        out = to_uint8(generate(generator, reference[None].expand(len(kp), -1, -1, -1), kp).cpu())
        for j in range(len(kp)):
            frame = out[j].permute(1, 2, 0).numpy()
            if side_by_side:
                skeleton = draw_skeleton(kp[j], R, background=(255, 255, 255), limb_colours=RAINBOW_COLOURS,
                                         joint_colours=(0, 0, 0))
                frame = np.concatenate([skeleton, frame], axis=1)
            yield frame
        bar.update(len(kp))
    bar.close()


def write_video(frames, path: str | Path, fps: float) -> int:
    """Encode uint8 (H, W, 3) frames as H.264 MP4 at ``path`` (atomically). Returns the frame count."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".mp4", dir=path.parent)
    os.close(fd)
    n = 0
    try:
        # macro_block_size=1: keep the exact frame size (64 px etc.) instead of resizing to x16
        writer = imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                    pixelformat="yuv420p", format="FFMPEG")
        try:
            for frame in frames:
                writer.append_data(frame)
                n += 1
        finally:
            writer.close()
        os.replace(tmp, path)
    except OSError as e:
        raise disk_error(path, e) or e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="export directory, training checkpoint (single-process or DeepSpeed: step_* dir) or run "
                        "directory (its latest checkpoint)")
    p.add_argument("--reference", required=True, help="image of the person")
    p.add_argument("--poses", required=True, help="folder of OpenPose/COCO JSON, annotation CSV, or a driving video")
    p.add_argument("--pose-size", default=None, help="HxW of the poses' images, for --frame fit (default: the "
                   "video's frame size, else the reference's size)")
    infer.add_frame_arguments(p, "write the driving video's frames with the generated person pasted into the "
                                 "person's box (VIDEO: the frames the JSON poses belong to; default: --poses)")
    p.add_argument("--out", required=True, help="output .mp4")
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--side-by-side", action="store_true", help="driving skeleton left of each frame")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--person", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when present")


def _pasted(frames: Iterator[np.ndarray], source: Path, boxes: list) -> Iterator[np.ndarray]:
    """Each generated frame pasted into the matching frame of ``source``."""
    from PIL import Image

    driving = video_frames(source)
    for t, generated in enumerate(frames):
        frame = next(driving, None)
        if frame is None:
            raise InputError(f"{source}: has {t} frames, fewer than the {len(boxes)} poses")
        yield np.asarray(infer.paste_back(Image.fromarray(frame), generated, boxes[t]))


def run(args) -> int:
    from hptransfer.export import load_any

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = load_any(args.checkpoint, device=device, prefer_export=True)
    R = g.resolution
    ref, ref_size = infer.fit_reference(args.reference, R)
    poses, src_size = read_pose_sequence(args.poses, args.person)
    if not poses:
        raise InputError(f"{args.poses}: no poses")
    few = [t for t, k in enumerate(poses) if infer.count_visible(k) < infer.MIN_KEYPOINTS]
    if few:
        log.warning("%s", infer.few_keypoints_warning(poses[few[0]], f"{args.poses} (pose {few[0]} of {len(poses)})")
                    + (f"; {len(few) - 1} more poses have fewer than {infer.MIN_KEYPOINTS}" if len(few) > 1 else ""))
    # auto: person framing as soon as one frame's pose calls for it
    decisions = [infer.explain_frame(args.frame, k, src_size is not None, bool(args.pose_size), ref_size)
                 for k in poses]
    mode, why = next((d for d in decisions if d[0] == "person"), decisions[0])
    log.info("framing: %s (%s)", mode, why)
    source = None
    if args.paste_back is not None:
        source = Path(args.paste_back) if args.paste_back else (Path(args.poses) if src_size is not None else None)
        if source is None:
            raise InputError("--paste-back needs the video the poses belong to: --paste-back VIDEO "
                             "(or poses estimated from a driving video)")
        if mode != "person":
            raise InputError("--paste-back needs person framing (--frame person)")
        if args.side_by_side:
            raise InputError("--paste-back and --side-by-side do not combine")
    if mode == "person":
        boxes = sequence_boxes(poses)
        kp = torch.stack([infer.frame_pose(k, b, R) for k, b in zip(poses, boxes)])
    else:
        known = infer.parse_size(args.pose_size) or src_size
        pose_size = known or ref_size
        kp = torch.stack([infer.fit_pose(k, pose_size, R) for k in poses])
        flagged: dict = {}  # kind -> [(pose index, warning)]: one line per kind
        for t, k in enumerate(kp):
            for kind, text in infer.fit_warnings(k, pose_size, ref_size, known is None, R).items():
                flagged.setdefault(kind, []).append((t, text))
        for hits in flagged.values():
            log.warning("pose %d%s: %s", hits[0][0], f" (and {len(hits) - 1} more)" if len(hits) > 1 else "",
                        hits[0][1])
    frames = generate_frames(g, ref, kp, args.batch_size, args.side_by_side)
    if source is not None:
        frames = _pasted(frames, source, boxes)
    n = write_video(frames, args.out, args.fps)
    size = "driving frame size" if source is not None else f"{R}x{2 * R if args.side_by_side else R}"
    print(f"wrote {args.out}: {n} frames at {args.fps:g} fps, {size}, {mode} framing")
    return 0
