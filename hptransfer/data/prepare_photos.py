"""``hptransfer data photos``: a folder of your own photos -> ``images/``, ``annotations.csv`` and ``pairs.csv``
(then ``hptransfer data split`` makes the train/test files).

Photos: every ``.jpg/.jpeg/.png/.bmp/.webp`` under ``--images``, named by their path inside it (keep one
folder per person, ``alice/01.jpg``, or DeepFashion's names: :func:`hptransfer.data.split.persons`).
Keypoints: ``--keypoints CSV`` (our annotation format, ``name:keypoints_y:keypoints_x``, OpenPose-18,
pixels of the photo, names as above), or MediaPipe Pose on each photo (the optional ``mediapipe`` extra;
its log lines are kept off the console). A photo with fewer than :data:`MIN_VISIBLE` keypoints (no person
found) is left out and named in the log.

``--frame person`` (default) crops each photo to a square around the person's keypoints (their extent
plus :data:`hptransfer.infer.FRAME_MARGIN` of it per side, as ``data video`` and ``infer`` frame a
person, DeepFashion's framing) resized to ``--size``; ``--frame full`` keeps whole photos (the loaders
fit them to the square, white padding). Pairs are all ordered pairs of one person's photos (at most
``--max-pairs`` per person). Written one image at a time and resumable, like every preparer.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hptransfer.data.formats import read_annotations, write_annotations, write_image_sizes, write_pairs
from hptransfer.data.prepare_common import (Manifest, PrepareError, all_pairs, bbox_crop_box, crop_resize,
                                            inside_only, progress)
from hptransfer.data.split import add_person_arguments, persons
from hptransfer.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MIN_VISIBLE = 4  # as data video: fewer visible keypoints = no usable person
FRAMES = ("person", "full")


def list_photos(folder: Path) -> list[str]:
    """Photo names (paths inside ``folder``, '/'-separated), sorted; hidden files and folders skipped."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not names:
        raise InputError(f"{folder}: no photos ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return names


def prepare(images, out, keypoints=None, frame: str = "person", size: int = 256, regex=None, person_csv=None,
            max_pairs: int = 2000, seed: int = 0) -> dict:
    """Build ``out``/images, annotations.csv and pairs.csv; returns {"written", "images", "persons", "pairs",
    "dropped": [names], "rules": {...}}."""
    from PIL import Image

    images, out = Path(images), Path(out)
    if frame not in FRAMES:
        raise PrepareError(f"--frame must be one of {FRAMES}, got {frame!r}")
    if size < 16:
        raise PrepareError(f"--size must be at least 16 px, got {size}")
    names = list_photos(images)
    who, rules = persons(names, regex, person_csv)  # before the slow part: a name without a person stops here
    given = None
    if keypoints is not None:
        given = read_annotations(keypoints, image_dir=images)
        missing = [n for n in names if n not in given]
        if missing:
            raise PrepareError(f"{keypoints}: no row for {len(missing)} of {len(names)} photos (first: {missing[0]!r})")
        detector = None
    else:
        from hptransfer.data.prepare_video import MediaPipePose

        detector = MediaPipePose(segmentation=False, static=True)  # photos: no tracking from one to the next
    manifest = Manifest(out, {"tool": "photos", "frame": frame, "size": size if frame == "person" else None,
                              "keypoints": str(keypoints) if keypoints else "mediapipe"})
    kept, dropped = [], []
    try:
        for name in progress(names, total=len(names), desc="photos"):
            out_name = name if name.lower().endswith((".jpg", ".jpeg", ".png")) else name + ".jpg"  # as written
            if manifest.is_done(out_name):
                kept.append((name, out_name))
                continue
            try:
                with Image.open(images / name) as im:
                    img = im.convert("RGB")
            except OSError as e:
                raise PrepareError(f"{images / name}: cannot read image ({e})") from None
            if given is not None:
                kp = given[name]
            else:
                kp, _ = detector(np.asarray(img))
            kp = inside_only(kp, img.height, img.width)
            if int((kp >= 0).all(axis=1).sum()) < MIN_VISIBLE:
                dropped.append(name)
                continue
            if frame == "person":
                from hptransfer.infer import FRAME_MARGIN

                box = bbox_crop_box(kp, img.width, img.height, 1.0, FRAME_MARGIN)
                img, kp = crop_resize(img, kp, box, (size, size))
            manifest.add(out_name, img, kp)
            kept.append((name, out_name))
    finally:
        manifest.finish()
    if dropped:
        log.warning("%d of %d photos left out: fewer than %d keypoints found (first: %s)", len(dropped), len(names),
                    MIN_VISIBLE, ", ".join(dropped[:3]))
    by_person: dict[str, list[str]] = {}
    for name, out_name in kept:
        by_person.setdefault(who[name], []).append(out_name)
    pairs = [p for person in sorted(by_person) for p in all_pairs(by_person[person], max_pairs, seed)]
    alone = sorted(p for p, ns in by_person.items() if len(ns) < 2)
    if alone:
        log.warning("%d persons have one photo only, so no pair (first: %s)", len(alone), alone[0])
    if not pairs:
        raise PrepareError(f"{images}: no person has two usable photos, so there is no pair to train on")
    write_annotations(out / "annotations.csv", {o: manifest.keypoints(o) for _, o in kept})
    write_pairs(out / "pairs.csv", pairs)
    write_image_sizes(out, {o: manifest.done[o]["hw"] for _, o in kept})
    return {"written": manifest.writes, "images": len(kept), "persons": len(by_person), "pairs": len(pairs),
            "dropped": dropped, "rules": dict(rules)}


def add_arguments(parser) -> None:
    import argparse

    from hptransfer.data.split import PERSON_RULES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = PERSON_RULES + "\n\nnext: hptransfer data split OUT --by person --test 0.2"
    parser.add_argument("--images", required=True,
                        help="folder of photos (one folder per person, or DeepFashion names)")
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--keypoints", default=None, metavar="CSV",
                        help="keypoints of every photo (name:keypoints_y:keypoints_x, OpenPose-18, pixels of the "
                             "photo); default: MediaPipe Pose on each photo")
    parser.add_argument("--frame", choices=FRAMES, default="person",
                        help="person (default): a square around the person's keypoints with DeepFashion's margins, "
                             "resized to --size; full: whole photos as they are")
    parser.add_argument("--size", type=int, default=256, help="side of person-framed images (px)")
    add_person_arguments(parser)
    parser.add_argument("--max-pairs", type=int, default=2000, help="at most this many pairs per person")


def run(args) -> int:
    s = prepare(args.images, args.out, args.keypoints, args.frame, args.size, args.person_regex, args.person_csv,
                args.max_pairs)
    rules = ", ".join(f"{r} ({n} images)" for r, n in s["rules"].items())
    print(f"{args.out}: {s['images']} images of {s['persons']} persons (the person from: {rules}), {s['pairs']} pairs; "
          f"{len(s['dropped'])} photos left out (no person found)")
    print(f"next: hptransfer data split {args.out} --by person --test 0.2")
    return 0
