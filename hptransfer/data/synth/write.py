"""The dataset on disk: images, parsing maps, train/test splits, pairs and ``synth.json``; body masks
rendered again from ``synth.json``."""
from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from hptransfer.data.formats import (atomic_write_bytes, atomic_write_text, write_annotations, write_image_sizes,
                                     write_pairs)
from hptransfer.data.synth.people import render_identity
from hptransfer.data.synth.renderer import FRAMINGS
from hptransfer.data.synth.skeleton import VIEW_ORDER, VIEWS

log = logging.getLogger(__package__)  # the package's name: log lines read as before the split

JPEG_QUALITY = 95
PARAMS_FILE = "synth.json"  # the generator's arguments, written beside the dataset (see body_masks)
PARSING_DIR = "parsing"
MIN_SIZE, MAX_SIZE = 64, 1024


def write_label_png(path, labels: np.ndarray) -> None:
    """An 8-bit label PNG (mode L, one class number per pixel), written atomically."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(labels, np.uint8), mode="L").save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


def _write_identity(task):
    seed, identity, poses, size, image_dir, views, framing = task
    result = {}
    parsing_dir = Path(image_dir).parent / PARSING_DIR
    for name, img, kp, _, labels in render_identity(seed, identity, poses, size, views=views, framing=framing,
                                                     with_labels=True):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
        atomic_write_bytes(Path(image_dir) / name, buf.getvalue())
        write_label_png(parsing_dir / (Path(name).stem + ".png"), labels)
        result[name] = kp
    return identity, result


def _check_arguments(identities: int, poses: int, size: int, test_fraction: float, views: tuple,
                     framing: str) -> None:
    if not views or any(v not in VIEWS for v in views):
        raise ValueError(f"views must be a non-empty subset of {tuple(VIEWS)}, got {views}")
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    if identities < 1 or poses < 2:
        raise ValueError(f"need at least 1 identity and 2 poses per identity, got {identities} and {poses}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")


def _write_images(tasks: list, workers: int, images: int) -> dict:
    """Render and write every identity's images and maps: {identity: {image name: keypoints}}."""
    kps: dict[int, dict] = {}
    if workers > 1 and images >= 16:
        # fork: the children only need numpy/PIL; each task is a pure function of (seed, identity).
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            chunks = max(1, len(tasks) // (8 * workers))
            for i, res in pool.imap_unordered(_write_identity, tasks, chunksize=chunks):
                kps[i] = res
    else:
        for t in tasks:
            i, res = _write_identity(t)
            kps[i] = res
    return kps


def _split_of(seed: int, identities: int, test_fraction: float) -> dict:
    """{identity: "train" | "test"}, at least one of each when there are two or more identities."""
    order = np.random.default_rng([seed, 1 << 20]).permutation(identities)
    n_test = 0
    if test_fraction > 0 and identities >= 2:
        n_test = min(identities - 1, max(1, round(identities * test_fraction)))
    return {int(i): ("test" if r < n_test else "train") for r, i in enumerate(order)}


def _write_split(root: Path, split: str, ids: list, kps: dict, seed: int, max_pairs: Optional[int]) -> dict:
    """annotations-<split>.csv and pairs-<split>.csv of these identities; returns their counts."""
    ann, pairs = {}, []
    for i in ids:
        names = sorted(kps[i])
        for n in names:
            ann[n] = kps[i][n]
        ps = [(a, b) for a in names for b in names if a != b]
        if max_pairs is not None and len(ps) > max_pairs:
            pick = np.random.default_rng([seed, i, 7]).choice(len(ps), max_pairs, replace=False)
            ps = [ps[int(x)] for x in sorted(pick)]
        pairs += ps
    write_annotations(root / f"annotations-{split}.csv", ann)
    write_pairs(root / f"pairs-{split}.csv", pairs)
    return {"identities": len(ids), "images": len(ann), "pairs": len(pairs)}


def synthesize(root, identities: int, poses: int, size: int, seed: int = 0, test_fraction: float = 0.2,
               max_pairs_per_identity: Optional[int] = None, workers: Optional[int] = None,
               views: tuple = VIEW_ORDER, framing: str = "random") -> dict:
    """Write a synthetic people dataset under ``root`` in the benchmark format; returns counts.

    ``identities`` are split between train and test (at least one each when there are two or
    more); pairs are all ordered pairs of different poses of an identity, or a random subset of
    ``max_pairs_per_identity`` of them. ``workers``: processes (default: up to 2 cores). The poses
    of an identity cycle through ``views``; ``framing`` is :func:`render`'s.
    """
    views = tuple(views)
    _check_arguments(identities, poses, size, test_fraction, views, framing)
    root = Path(root)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / PARSING_DIR).mkdir(exist_ok=True)
    t0 = time.perf_counter()
    tasks = [(seed, i, poses, size, str(image_dir), views, framing) for i in range(identities)]
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    kps = _write_images(tasks, workers, identities * poses)
    write_image_sizes(root, {name: (size, size) for images in kps.values() for name in images})  # square renders
    split_of = _split_of(seed, identities, test_fraction)
    counts = {split: _write_split(root, split, sorted(i for i, s in split_of.items() if s == split), kps, seed,
                                  max_pairs_per_identity) for split in ("train", "test")}
    params = {"seed": seed, "identities": identities, "poses": poses, "size": size, "views": list(views),
              "framing": framing}
    atomic_write_text(root / PARAMS_FILE, json.dumps(params, indent=1) + "\n")
    dt = time.perf_counter() - t0
    log.info("wrote %d images (%d px) of %d identities to %s in %.1f s (%d workers)", identities * poses, size,
             identities, root, dt, workers)
    return {"splits": counts, "seconds": dt}


def body_masks(root, names) -> dict:
    """{image name: (size, size) bool body mask} for images of a dataset this module wrote, rendered
    again from its ``synth.json`` (the output is a pure function of those arguments)."""
    root = Path(root)
    path = root / PARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: body masks exist only for datasets written by "
                                "`hptransfer data synth` (or the demo)")
    p = json.loads(path.read_text())
    wanted, out = set(names), {}
    bad = [n for n in wanted if not (n.startswith("person") and n[6:11].isdigit())]
    if bad:
        raise ValueError(f"{path}: not names this generator writes (personNNNNN_PP_view.jpg): {sorted(bad)[:3]}")
    identities = sorted({int(n[6:11]) for n in wanted})
    for i in identities:
        for name, _, _, mask in render_identity(p["seed"], i, p["poses"], p["size"], with_mask=True,
                                                views=tuple(p["views"]), framing=p["framing"]):
            if name in wanted:
                out[name] = mask
    missing = wanted - out.keys()
    if missing:
        raise ValueError(f"{path}: these images are not the generator's output for its arguments: "
                         f"{sorted(missing)[:3]}")
    return out
