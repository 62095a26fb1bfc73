"""Pieces shared by the dataset preparation tools (``hptransfer data deepfashion|h36m|video``).

Every tool writes the benchmark layout (``images/``, ``annotations-{split}.csv``,
``pairs-{split}.csv``, ``image-sizes.csv``), or with ``--shards`` a shard folder (see
:mod:`hptransfer.data.shard_writer`), through a sink: :class:`Manifest` here for a folder. Images
are made and written in ``--workers`` processes, each atomically; the sink's manifest is an
append-only JSON-lines file (one line per finished image, about 200 bytes, so a million frames write
about 200 MB once), and an interrupted run resumes without redoing finished images. Every tool ends
by running the data check on its output.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from hptransfer.data.formats import (atomic_write_bytes, atomic_write_text, stored_keypoints, write_annotations,
                                     write_image_sizes, write_pairs)
from hptransfer.errors import PrepareError  # noqa: F401  (public name here)

log = logging.getLogger(__name__)

MANIFEST = ".prepare-manifest.jsonl"
OLD_MANIFEST = ".prepare-manifest.json"  # before issue 26: rewritten whole every 50 images


def default_workers() -> int:
    """The CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class JsonLines:
    """An append-only JSON-lines file whose first line holds the settings that made it.

    ``records`` are the lines after the first, read at opening. A last line torn by a kill is
    dropped (the file is cut back to its last newline). With other ``settings`` than the file's,
    ``on_mismatch`` = "restart" starts the file afresh with a warning, "error" raises PrepareError.
    Nothing is written before the first :meth:`append` (a tool that fails early leaves no output).
    """

    def __init__(self, path, settings: dict, on_mismatch: str = "restart"):
        self.path = Path(path)
        self.settings = settings
        self.records: list[dict] = []
        self.file = None
        self.fresh = True  # the first append starts the file (header line)
        if self.path.exists():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            lines = data[:end].decode("utf-8").splitlines()
            head = json.loads(lines[0]).get("settings") if lines else None
            if head == settings:
                self.records = [json.loads(line) for line in lines[1:]]
                self.fresh = False
                if end < len(data):
                    with open(self.path, "r+b") as f:
                        f.truncate(end)
            elif on_mismatch == "error":
                raise PrepareError(f"{self.path}: written with other settings ({head}, now {settings}); use "
                                   "another output folder or delete this one")
            else:
                log.warning("%s: settings changed (%s -> %s); redoing every image", self.path, head, settings)

    def append(self, record: dict) -> None:
        """One line, written with one call and flushed: a kill leaves at most a torn last line."""
        if self.file is None:
            if self.fresh:
                atomic_write_text(self.path, json.dumps({"settings": self.settings}) + "\n")
                self.fresh = False
            self.file = open(self.path, "ab")
        self.file.write((json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8"))
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class WorkerPool:
    """Jobs in ``workers`` processes (in this one for 1), results in submission order, at most 2 per
    worker in flight (frames are large). The processes come from a fork server: they do not inherit
    the threads of libraries the tool has started (MediaPipe, torch), which a plain fork could
    deadlock on; jobs and their arguments are pickled."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self.pool = None
        if self.workers > 1:
            ctx = multiprocessing.get_context("forkserver")
            # The server imports the jobs' modules once (torch among them); each worker forks from it ready.
            ctx.set_forkserver_preload(["hptransfer.data.shard_writer"])
            self.pool = ctx.Pool(self.workers)
        self.pending: collections.deque = collections.deque()

    def submit(self, fn: Callable, *args) -> list:
        """Run ``fn(*args)``; returns the results that are ready to commit, oldest first."""
        if self.pool is None:
            return [fn(*args)]
        self.pending.append(self.pool.apply_async(fn, args))
        done = []
        while len(self.pending) > 2 * self.workers or (self.pending and self.pending[0].ready()):
            done.append(self.pending.popleft().get())
        return done

    def drain(self) -> list:
        done = []
        while self.pending:
            done.append(self.pending.popleft().get())
        return done

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate() if self.pending else self.pool.close()
            self.pool.join()
            self.pool = None
        self.pending.clear()


def _given(image, kp):
    return image, kp


def _write_image(out: Path, name: str, quality: int, job: Callable, args: tuple):
    """Worker side of :meth:`Manifest.submit`: make the image, write it atomically; (name, kp, hw)."""
    made = job(*args)
    if made is None:
        return name, None, None
    image, kp = made[0].convert("RGB"), made[1]
    buf = io.BytesIO()
    fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
    image.save(buf, format=fmt, quality=quality)
    atomic_write_bytes(out / "images" / name, buf.getvalue())
    return name, stored_keypoints(kp).ravel().tolist(), [image.height, image.width]


class Manifest:
    """The folder sink: finished images of one output folder, ``{name: (18, 2) (y, x)}`` and their
    sizes, kept in an append-only ``.prepare-manifest.jsonl``.

    ``submit(name, split, job, *args)`` runs ``job(*args)`` -> (PIL image, (18, 2) keypoints) or None
    (dropped) in a worker, which writes ``images/<name>``; the line is appended when it is done.
    ``writes`` counts images written by this process (tests use it to check resumability).
    """

    def __init__(self, out: Path, settings: dict, workers: int = 1):
        self.out = Path(out)
        self.path = self.out / MANIFEST
        self._import_old(settings)
        self.log = JsonLines(self.path, settings)
        self.done: dict[str, dict] = {r["name"]: r for r in self.log.records}
        self.pool = WorkerPool(workers)
        self.writes = 0

    def _import_old(self, settings: dict) -> None:
        """Carry a manifest of the old format (one JSON rewritten every 50 images) over, once."""
        old = self.out / OLD_MANIFEST
        if not old.exists() or self.path.exists():
            return
        data = json.loads(old.read_text())
        if data.get("settings") == settings:
            lines = [json.dumps({"settings": settings})]
            for name, kp in data.get("done", {}).items():
                path = self.out / "images" / name
                if path.exists():
                    from hptransfer.data.formats import image_size

                    lines.append(json.dumps({"name": name, "kp": stored_keypoints(kp).ravel().tolist(),
                                             "hw": list(image_size(path))}))
            atomic_write_text(self.path, "\n".join(lines) + "\n")
        old.unlink()

    def is_done(self, name: str) -> bool:
        """True when ``name`` was finished by an earlier run and its image still exists."""
        return name in self.done and (self.out / "images" / name).exists()

    def keypoints(self, name: str) -> np.ndarray:
        """(18, 2) float32 (y, x) of a finished image."""
        return np.asarray(self.done[name]["kp"], dtype=np.float32).reshape(18, 2)

    def submit(self, name: str, split: str, job: Callable, *args) -> None:
        """Make and write ``name`` in a worker (``split`` matters to shard sinks only)."""
        for result in self.pool.submit(_write_image, self.out, name, 95, job, args):
            self._commit(*result)

    def add(self, name: str, image, kp: np.ndarray, split: str = "") -> None:
        """Write ``image`` (PIL) as ``images/<name>`` atomically and record its keypoints (18, 2) (y, x)."""
        self.submit(name, split, _given, image, kp)

    def _commit(self, name: str, kp, hw) -> None:
        if kp is None:
            return
        record = {"name": name, "kp": kp, "hw": hw}
        self.log.append(record)
        self.done[name] = record
        self.writes += 1

    def finish(self) -> None:
        """Wait for the workers and commit what they made (call before write_split)."""
        try:
            for result in self.pool.drain():
                self._commit(*result)
        finally:
            self.pool.close()
            self.log.close()

    def write_split(self, split: str, annotations: dict, pairs: list) -> None:
        """``annotations-<split>.csv``, ``pairs-<split>.csv`` and the sizes of every finished image."""
        write_split(self.out, split, annotations, pairs)
        write_image_sizes(self.out, {n: r["hw"] for n, r in self.done.items()})


def progress(items: Iterable, total: Optional[int] = None, desc: str = ""):
    """tqdm progress over ``items`` (stderr), or the plain iterable when tqdm is absent."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc, unit="img", leave=False)


def write_split(out: Path, split: str, annotations: dict, pairs: list) -> None:
    """Write ``annotations-<split>.csv`` and ``pairs-<split>.csv`` (atomically); a sink's
    ``write_split`` calls it and adds what its format needs."""
    names = sorted(annotations)
    write_annotations(out / f"annotations-{split}.csv", {n: annotations[n] for n in names})
    write_pairs(out / f"pairs-{split}.csv", pairs)
    log.info("%s: %d images, %d pairs", split, len(names), len(pairs))


def all_pairs(names: list[str], max_pairs: Optional[int] = None, seed: int = 0) -> list[tuple[str, str]]:
    """Ordered pairs (a, b), a != b, of ``names``; at most ``max_pairs`` chosen reproducibly."""
    pairs = [(a, b) for a in names for b in names if a != b]
    if max_pairs is not None and len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(pairs), max_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    return pairs


def final_check(out: Path) -> int:
    """Run ``hptransfer data check`` on ``out``; log its report; return the number of problems."""
    from hptransfer.data.check import check_dataset, format_report

    report = check_dataset(out, decode=False)
    log.info("data check of %s:\n%s", out, format_report(report))
    bad = sum(len(r["problems"]) for r in report.values())
    if not report:
        log.error("%s: no split was written", out)
        return 1
    return bad


def mask_background(image, mask, fill=(255, 255, 255)):
    """Keep the person: pixels where ``mask`` (PIL L or bool (H, W)) is set, ``fill`` elsewhere."""
    from PIL import Image

    m = np.asarray(mask)
    m = m > (127 if m.dtype == np.uint8 else 0)
    arr = np.asarray(image.convert("RGB")).copy()
    if m.shape != arr.shape[:2]:
        raise PrepareError(f"mask size {m.shape[::-1]} differs from image size {arr.shape[1::-1]}")
    arr[~m] = fill
    return Image.fromarray(arr)


def bbox_crop_box(kp: np.ndarray, width: int, height: int, aspect: float, margin: float = 0.25):
    """Crop box (left, top, right, bottom) around visible (18, 2) (y, x) keypoints, enlarged by
    ``margin`` of the body height and widened to ``aspect`` = width / height; may leave the image
    (PIL pads such crops with black)."""
    vis = (kp >= 0).all(axis=1)
    if not vis.any():
        return 0, 0, width, height
    y0, x0 = kp[vis].min(axis=0)
    y1, x1 = kp[vis].max(axis=0)
    h = max(y1 - y0, 1.0) * (1 + 2 * margin)
    w = max(h * aspect, (x1 - x0) * (1 + 2 * margin))
    h = w / aspect
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    return int(round(cx - w / 2)), int(round(cy - h / 2)), int(round(cx + w / 2)), int(round(cy + h / 2))


def crop_resize(image, kp: np.ndarray, box, size: tuple[int, int]):
    """Crop ``image`` (PIL) to ``box`` and resize to ``size`` (H, W); keypoints (18, 2) (y, x) follow.

    Keypoints that leave the output become missing (-1)."""
    from PIL import Image

    left, top, right, bottom = box
    h, w = size
    out = image.crop(box).resize((w, h), Image.BICUBIC)
    kp = np.asarray(kp, dtype=np.float32)
    vis = (kp >= 0).all(axis=1)
    sy, sx = h / (bottom - top), w / (right - left)
    new = np.full_like(kp, -1)
    new[vis, 0] = (kp[vis, 0] - top) * sy
    new[vis, 1] = (kp[vis, 1] - left) * sx
    inside = vis & (new[:, 0] >= 0) & (new[:, 0] <= h - 1) & (new[:, 1] >= 0) & (new[:, 1] <= w - 1)
    new[~inside] = -1
    return out, new


def person_frame(source, kp: np.ndarray, mask, margin: Optional[float], size: int, label: str):
    """A video frame made into a sample, in a sink's worker: ``source`` (an (H, W, 3) uint8 frame or an
    image file), the background whitened where ``mask`` is given, cropped to a square box around the
    person's keypoints (``margin`` of the body height, :func:`bbox_crop_box`) and resized to ``size``
    unless ``margin`` is None (the whole frame). Returns (PIL image, (18, 2) keypoints); errors name
    ``label`` (the sequence and frame)."""
    from PIL import Image

    if isinstance(source, np.ndarray):
        img = Image.fromarray(source)
    else:
        try:
            with Image.open(source) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise PrepareError(f"{source}: cannot read {label}: {e}") from None
    if mask is not None:
        try:
            img = mask_background(img, mask)
        except PrepareError as e:
            raise PrepareError(f"{label}: {e}") from None
    if margin is None:
        return img, kp
    return crop_resize(img, kp, bbox_crop_box(kp, img.width, img.height, 1.0, margin), (size, size))


def inside_only(kp: np.ndarray, height: int, width: int) -> np.ndarray:
    """(18, 2) (y, x) with keypoints outside a ``height`` x ``width`` image set to -1 (missing)."""
    kp = np.array(kp, dtype=np.float32)
    out = (kp[:, 0] < 0) | (kp[:, 1] < 0) | (kp[:, 0] > height - 1) | (kp[:, 1] > width - 1)
    kp[out] = -1
    return kp


def parse_size(text: str) -> tuple[int, int]:
    """'256x176' -> (256, 176) as (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise PrepareError(f"size {text!r} is not HxW, e.g. 256x176") from None
    return h, w
