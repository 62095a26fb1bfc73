"""``hptransfer video``: the reference person following a sequence of poses, written as MP4.

Pose sequence sources: a folder of OpenPose/COCO JSON files (sorted by name), our annotation CSV
(rows in file order), or a driving video (poses per frame with the optional ``mediapipe`` extra).
Frames are generated in batches and encoded with imageio-ffmpeg (H.264, yuv420p).
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

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif"}


def read_pose_sequence(source: str | Path, person: int = 0):
    """Poses of a sequence: ``(list of (18, 2) float32 (y, x), image size (H, W) or None)``."""
    from hptransfer.data import read_annotations

    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{path}: no .json pose files in this folder")
        return [infer._read_json_pose(f, person) for f in files], None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pose folder, CSV or video")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        ann = read_annotations(path)
        return [np.asarray(v, np.float32) for v in ann.values()], None
    if suffix in VIDEO_SUFFIXES:
        import imageio.v2 as imageio
        poses, size = [], None
        reader = imageio.get_reader(str(path), format="FFMPEG")
        try:
            for frame in reader.iter_data():
                frame = np.asarray(frame)[..., :3]
                size = frame.shape[:2]
                poses.append(infer.estimate_pose(frame))
        finally:
            reader.close()
        return poses, size
    raise ValueError(f"{path}: unknown pose sequence (folder of JSON, .csv, or a video)")


def draw_skeleton(kp: np.ndarray, resolution: int) -> np.ndarray:
    """(18, 2) (y, x) at R -> (R, R, 3) uint8 skeleton on white (OpenPose limbs, one colour each)."""
    from PIL import Image, ImageDraw

    from hptransfer.pose import LIMB_PAIRS

    img = Image.new("RGB", (resolution, resolution), (255, 255, 255))
    d = ImageDraw.Draw(img)
    width = max(1, resolution // 64)
    for i, (a, b) in enumerate(LIMB_PAIRS):
        if (kp[a] >= 0).all() and (kp[b] >= 0).all():
            hue = i / len(LIMB_PAIRS)
            colour = tuple(int(255 * (0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3)))) for k in range(3))
            d.line([(kp[a][1], kp[a][0]), (kp[b][1], kp[b][0])], fill=colour, width=width)
    for y, x in kp:
        if y >= 0 and x >= 0:
            d.ellipse([x - width, y - width, x + width, y + width], fill=(0, 0, 0))
    return np.asarray(img)


def generate_frames(generator, reference: torch.Tensor, poses: torch.Tensor, batch_size: int = 8,
                    side_by_side: bool = False, progress: bool = True) -> Iterator[np.ndarray]:
    """Yield (R, R|2R, 3) uint8 frames: ``reference`` (3, R, R) in [-1, 1] in each pose of ``poses`` (T, 18, 2)."""
    from tqdm import tqdm

    from hptransfer.export import generate
    from hptransfer.metrics import to_uint8

    R = generator.resolution
    bar = tqdm(total=len(poses), desc="frames", unit="frame", disable=not progress, leave=False)
    for i in range(0, len(poses), batch_size):
        kp = poses[i:i + batch_size]
        out = to_uint8(generate(generator, reference[None].expand(len(kp), -1, -1, -1), kp).cpu())
        for j in range(len(kp)):
            frame = out[j].permute(1, 2, 0).numpy()
            if side_by_side:
                frame = np.concatenate([draw_skeleton(kp[j].numpy(), R), frame], axis=1)
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
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="export directory")
    p.add_argument("--reference", required=True, help="image of the person")
    p.add_argument("--poses", required=True, help="folder of OpenPose/COCO JSON, annotation CSV, or a driving video")
    p.add_argument("--pose-size", default=None, help="HxW of the poses' images (default: the video's frame size, "
                   "else the reference's size)")
    p.add_argument("--out", required=True, help="output .mp4")
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--side-by-side", action="store_true", help="driving skeleton left of each frame")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--person", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when present")


def run(args) -> int:
    from hptransfer.export import load_generator

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = load_generator(args.checkpoint, device=device)
    R = g.resolution
    ref, ref_size = infer.fit_reference(args.reference, R)
    poses, src_size = read_pose_sequence(args.poses, args.person)
    pose_size = infer.parse_size(args.pose_size) or src_size or ref_size
    kp = torch.stack([infer.fit_pose(k, pose_size, R) for k in poses])
    n = write_video(generate_frames(g, ref, kp, args.batch_size, args.side_by_side), args.out, args.fps)
    print(f"wrote {args.out}: {n} frames at {args.fps:g} fps, {R}x{2 * R if args.side_by_side else R}")
    return 0
