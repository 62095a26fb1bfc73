"""``hptransfer data video``: videos of one person each -> a pose-transfer dataset.

Frames are sampled at ``--fps`` (default 3). Keypoints come from OpenPose JSON files given alongside
(``--openpose-json DIR``: one file per source frame, or one per sampled frame, in sorted name order;
with several videos, ``DIR/<video stem>/`` when it exists) or from MediaPipe Pose (the optional
``mediapipe`` extra), converted with :func:`hptransfer.pose.from_mediapipe33`. ``--remove-background``
whitens everything outside MediaPipe's person segmentation: ours; the paper removed its YouTube
backgrounds with a human parsing network (LIP, [23]), and MediaPipe's mask is a stand-in that needs no
weights beyond the extra. ``--frame person`` (default) crops each
frame to a square box around the person's keypoints (their extent plus
:data:`hptransfer.infer.FRAME_MARGIN` of it per side, the framing of DeepFashion's shots) and resizes it
to ``--size``; ``--frame full`` keeps whole frames. Images are ``images/<video stem>/fNNNNNN.jpg``
(NNNNNN = source frame index); pairs are all ordered pairs of frames of the same video (capped by
``--max-pairs``); the split is by video (``--test-videos``: a count, or a fraction below 1).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from hptransfer.data.prepare_common import (PrepareError, all_pairs, final_check, inside_only, person_frame,
                                            progress)
from hptransfer.data.shard_writer import ShardOptions, add_sink_arguments, open_sink, sink_shards
from hptransfer.errors import last_line

log = logging.getLogger(__name__)

MEDIAPIPE_HINT = ("MediaPipe is not installed: pip install --no-deps -r requirements-mediapipe.txt "
                  "(or give --openpose-json DIR)")
MIN_VISIBLE = 4  # frames with fewer visible keypoints are dropped (no usable person)
FRAMES = ("person", "full")


def sample_indices(n_frames: int, fps_in: float, fps_out: float) -> list[int]:
    """Source frame indices nearest to the times k / fps_out, k = 0, 1, ...; all frames when fps_out >= fps_in."""
    if fps_out >= fps_in:
        return list(range(n_frames))
    step = fps_in / fps_out
    out, k = [], 0
    while round(k * step) < n_frames:
        out.append(int(round(k * step)))
        k += 1
    return out


def read_video(path: Path, fps_out: float) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (source frame index, (H, W, 3) uint8 RGB frame) at ``fps_out`` (frames of :func:`sample_indices`)."""
    import imageio_ffmpeg

    try:
        gen = imageio_ffmpeg.read_frames(str(path))
        meta = next(gen)
    except (OSError, RuntimeError, StopIteration) as e:
        raise PrepareError(f"{path}: cannot read video: {last_line(e)}") from None
    w, h = meta["size"]
    fps = float(meta.get("fps") or 0)
    if fps <= 0:
        raise PrepareError(f"{path}: video has no frame rate")
    step = fps / fps_out
    k, i = 0, -1
    try:
        for i, buf in enumerate(gen):
            if fps_out >= fps or i == int(round(k * step)):
                k += 1
                yield i, np.frombuffer(buf, np.uint8).reshape(h, w, 3)
    except RuntimeError as e:  # ffmpeg failed mid-stream (truncated or corrupt file)
        raise PrepareError(f"{path}: cannot decode frame {i + 1}: {last_line(e)}") from None


def count_frames(path: Path) -> tuple[int, float]:
    """(frame count, fps) of a video, counted by decoding (exact; ffmpeg's estimate can be off)."""
    import imageio_ffmpeg

    try:
        n, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
        gen = imageio_ffmpeg.read_frames(str(path))
        fps = float(next(gen)["fps"])
        gen.close()
    except (OSError, RuntimeError, StopIteration) as e:
        raise PrepareError(f"{path}: cannot read video: {last_line(e)}") from None
    return n, fps



class MediaPipePose:
    """MediaPipe Pose on a frame sequence (``static``: on unrelated photos, each detected afresh): keypoints
    (18, 2) (y, x) and optionally the person mask."""

    def __init__(self, segmentation: bool, static: bool = False):
        from hptransfer.errors import MissingDependency
        from hptransfer.infer import import_mediapipe, quiet_native_logs

        try:
            mp = import_mediapipe()
        except MissingDependency:
            raise PrepareError(MEDIAPIPE_HINT) from None
        self.quiet = quiet_native_logs  # MediaPipe's C++ log lines go to the DEBUG log, not the console
        with self.quiet():
            # static: every image on its own (crops that move between frames); else tracking along a video
            self.pose = mp.solutions.pose.Pose(static_image_mode=static, model_complexity=1,
                                               enable_segmentation=segmentation)
            # The graph's calculators open (and log) in its own threads after the constructor returns: one
            # blank frame waits for them inside the quiet window. No person in it: the next frame detects afresh.
            self.pose.process(np.zeros((64, 64, 3), np.uint8))

    def __call__(self, frame: np.ndarray):
        from hptransfer.pose import _empty, from_mediapipe33

        with self.quiet():
            res = self.pose.process(frame)
        kp = _empty() if res.pose_landmarks is None else from_mediapipe33(res.pose_landmarks, frame.shape[:2])
        mask = None if res.segmentation_mask is None else np.asarray(res.segmentation_mask) > 0.5
        return kp, mask


def openpose_files(folder: Path, video: Path, several: bool) -> list[Path]:
    """The sorted OpenPose JSON files of ``video``."""
    sub = folder / video.stem
    d = sub if several and sub.is_dir() else folder
    files = sorted(d.glob("*.json"))
    if not files:
        raise PrepareError(f"{d}: no OpenPose .json files for {video}")
    return files


def prepare_one(video: Path, out: Path, manifest, fps: float, json_dir: Optional[Path],
                several: bool, remove_background: bool, detector, framing: str = "person",
                size: int = 256, split: str = "train") -> list[str]:
    """Sample, annotate and submit one video's frames to ``manifest`` (a sink); returns the names of
    the kept frames."""
    from hptransfer.infer import FRAME_MARGIN
    from hptransfer.pose import read_openpose_json

    video = Path(video)
    if not video.is_file():
        raise PrepareError(f"{video}: no such video file")
    n, fps_in = count_frames(video)
    wanted = sample_indices(n, fps_in, fps)
    files = None
    if json_dir is not None:
        files = openpose_files(json_dir, video, several)
        if len(files) not in (n, len(wanted)):
            raise PrepareError(f"{files[0].parent}: {len(files)} OpenPose JSON files but {video} has {n} frames "
                               f"({len(wanted)} sampled at {fps} fps); expected one file per frame")
    names = []
    dropped = 0
    for j, (i, frame) in enumerate(progress(read_video(video, fps), total=len(wanted), desc=video.name)):
        name = f"{video.stem}/f{i:06d}.jpg"
        if manifest.is_done(name):
            names.append(name)
            continue
        mask = None
        if files is not None:
            path = files[i] if len(files) == n else files[j]
            try:
                kp = read_openpose_json(path)
            except ValueError as e:
                raise PrepareError(f"{e} (frame {i} of {video})") from None
            if remove_background:
                _, mask = detector(frame)
        else:
            kp, mask = detector(frame)
        kp = inside_only(kp, *frame.shape[:2])
        if ((kp >= 0).all(axis=1)).sum() < MIN_VISIBLE:
            dropped += 1
            continue
        if remove_background and mask is None:
            log.warning("%s frame %d: no person mask; background kept", video, i)
        manifest.submit(name, split, person_frame, frame, kp, mask if remove_background else None,
                        FRAME_MARGIN if framing == "person" else None, size, f"{video} frame {i}")
        names.append(name)
    if dropped:
        log.warning("%s: %d sampled frames dropped (fewer than %d visible keypoints)", video, dropped, MIN_VISIBLE)
    return names


def prepare(videos: list, out, fps: float = 3.0, openpose_json=None, remove_background: bool = False,
            test_videos: float = 0.2, max_pairs: Optional[int] = 2000, seed: int = 0, frame: str = "person",
            size: int = 256, workers: int = 1, shards: Optional[ShardOptions] = None) -> dict:
    """Build the dataset in ``out``; returns {"written", "train", "test", "problems"}.
    ``workers``: processes making the images; ``shards``: write a shard folder instead of a folder."""
    out = Path(out)
    if frame not in FRAMES:
        raise PrepareError(f"frame must be one of {FRAMES}, got {frame!r}")
    if size < 16:
        raise PrepareError(f"--size must be at least 16 px, got {size}")
    videos = [Path(v) for v in videos]
    if len({v.stem for v in videos}) != len(videos):
        raise PrepareError("two videos share a file name stem; frames are stored under images/<stem>/")
    json_dir = Path(openpose_json) if openpose_json else None
    if json_dir is not None and not json_dir.is_dir():
        raise PrepareError(f"{json_dir}: OpenPose JSON folder not found")
    detector = None
    if json_dir is None or remove_background:
        detector = MediaPipePose(segmentation=remove_background)
    n_test = int(test_videos) if test_videos >= 1 else int(round(test_videos * len(videos)))
    if len(videos) > 1:
        n_test = min(max(n_test, 1 if test_videos > 0 else 0), len(videos) - 1)
    else:
        n_test = 0
    test_set = {v.stem for v in sorted(videos)[len(videos) - n_test:]} if n_test else set()
    if len(videos) == 1:
        log.warning("one video: every frame goes to train and test is the same video's frames")
    for v in videos:
        if not v.is_file():  # before the sink makes the output folder
            raise PrepareError(f"{v}: no such video file")
    manifest = open_sink(out, {"tool": "video", "fps": fps, "remove_background": remove_background,
                               "openpose": bool(json_dir), "frame": frame,
                               "size": size if frame == "person" else None}, workers, shards)
    per_video = {}
    try:
        for v in videos:
            per_video[v.stem] = prepare_one(v, out, manifest, fps, json_dir, len(videos) > 1, remove_background,
                                            detector, frame, size, "test" if v.stem in test_set else "train")
    finally:
        manifest.finish()
    summary = {"written": manifest.writes}
    for split in ("train", "test"):
        stems = [s for s in per_video if (s in test_set) == (split == "test")] if test_set else list(per_video)
        ann, pairs = {}, []
        for s in stems:
            names = per_video[s]
            ann.update({n: manifest.keypoints(n) for n in names})
            pairs += all_pairs(names, max_pairs, seed)
        manifest.write_split(split, ann, pairs)
        summary[split] = stems
    summary["problems"] = final_check(out)
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("--video", nargs="+", required=True, help="video files (one person each)")
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--fps", type=float, default=3.0, help="frames per second to sample")
    parser.add_argument("--openpose-json", help="OpenPose JSON folder (one file per frame; DIR/<stem>/ per video)")
    parser.add_argument("--remove-background", action="store_true", help="whiten the background (MediaPipe)")
    parser.add_argument("--test-videos", type=float, default=0.2,
                        help="videos held out for test: a count (>= 1) or a fraction (< 1)")
    parser.add_argument("--max-pairs", type=int, default=2000, help="at most this many pairs per video")
    parser.add_argument("--frame", choices=FRAMES, default="person",
                        help="person (default): square crop around the person's keypoints with margins as in "
                             "DeepFashion, resized to --size; full: whole frames")
    parser.add_argument("--size", type=int, default=256, help="output side of person-framed images (px)")
    add_sink_arguments(parser)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    s = prepare(args.video, args.out, args.fps, args.openpose_json, args.remove_background,
                args.test_videos, args.max_pairs, frame=args.frame, size=args.size, workers=args.workers,
                shards=sink_shards(args))
    print(f"{args.out}: wrote {s['written']} frames; train videos {s['train']}, test videos {s['test']}; "
          f"data check: {s['problems']} problems")
    return 1 if s["problems"] else 0
