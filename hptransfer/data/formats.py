"""Readers and writers of the DeepFashion pose-transfer benchmark files.

Annotations (``annotations-{split}.csv``, the real ``fasion-resize-annotation-*.csv``)::

    name:keypoints_y:keypoints_x
    img001.jpg: [40, 85, -1, ...]: [128, 129, -1, ...]

18 OpenPose keypoints per list, in pixels of the image, ``-1`` for a missing keypoint.
Pairs (``pairs-{split}.csv``, the real ``fasion-resize-pairs-*.csv``): header ``from,to``, or
``,from,to`` with a leading index column as some released versions have; other named columns (a
score, a split) are ignored with a note in the log.

Every problem raises :class:`DataFormatError` naming file, row (1-based line number) and what is
wrong; with ``skip_bad=True`` the bad row is skipped instead and the message is kept in the
result's ``.problems`` list (and logged once as a count).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from hptransfer.errors import DataFormatError, disk_error  # noqa: F401  (DataFormatError: public name here)

log = logging.getLogger(__name__)

NUM_KEYPOINTS = 18  # OpenPose-18 (hptransfer.pose.KEYPOINT_NAMES); kept here so this module needs no torch
ANNOTATION_HEADER = "name:keypoints_y:keypoints_x"


class Annotations(dict):
    """``{name: (18, 2) float32 (y, x)}``; ``.problems`` lists the rows skipped under ``skip_bad``;
    ``.sizes`` maps name -> (H, W) where images were checked."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.problems: list[str] = []
        self.sizes: dict[str, tuple[int, int]] = {}


class Pairs(list):
    """``[(from, to), ...]``; ``.problems`` lists the rows skipped under ``skip_bad``."""

    def __init__(self, *a):
        super().__init__(*a)
        self.problems: list[str] = []


def check_name(name: str) -> Optional[str]:
    """Why ``name`` is not a safe relative image path inside the data folder, or None if it is."""
    if not name:
        return "empty image name"
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return f"image name {name!r} is absolute (names must be relative to the images folder)"
    if ".." in p.parts:
        return f"image name {name!r} contains '..' (it would escape the data folder)"
    return None


def _parse_list(text: str) -> list[float]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"keypoint list {text.strip()[:60]!r} is not a list of numbers") from None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in values):
        raise ValueError(f"keypoint list {text.strip()[:60]!r} is not a list of numbers")
    if len(values) != NUM_KEYPOINTS:
        raise ValueError(f"keypoint list has {len(values)} values, expected {NUM_KEYPOINTS}")
    return values


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header; raises OSError/FileNotFoundError if unreadable."""
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


IMAGE_SIZES = "image-sizes.csv"  # the folder's size index: name,height,width (header), one row per image
_SIZES_HEADER = "name,height,width"


def read_image_sizes(root) -> dict[str, tuple[int, int]]:
    """``{name: (H, W)}`` from ``root/image-sizes.csv``; empty when the file is absent."""
    path = Path(root) / IMAGE_SIZES
    if not path.is_file():
        return {}
    rows = list(csv.reader(io.StringIO(_read_text(path))))
    if not rows or ",".join(h.strip() for h in rows[0]) != _SIZES_HEADER:
        raise DataFormatError(f"{path}: row 1: header must be {_SIZES_HEADER!r}")
    out = {}
    for row, fields in enumerate(rows[1:], start=2):
        try:
            name, h, w = fields
            out[name] = (int(h), int(w))
        except ValueError:
            raise DataFormatError(f"{path}: row {row}: expected name,height,width with integer sizes, "
                                  f"got {','.join(fields)[:80]!r}") from None
    return out


def write_image_sizes(root, sizes: Mapping[str, Sequence[int]]) -> None:
    """Write ``{name: (H, W)}`` as ``root/image-sizes.csv`` (sorted by name), atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_SIZES_HEADER.split(","))
    for name in sorted(sizes):
        w.writerow([name, int(sizes[name][0]), int(sizes[name][1])])
    atomic_write_text(Path(root) / IMAGE_SIZES, buf.getvalue())


class ImageSizes:
    """(H, W) of a folder's images without opening them: ``image-sizes.csv`` (written by the
    preparation tools, ``data synth`` and by the first load of an older dataset).

    Calling it with a name returns the indexed size; the first name it lacks starts the one-time
    scan: the headers of every image that any ``annotations-*.csv`` names (all splits, so the next
    split finds them too); an image that cannot be read raises FileNotFoundError / OSError as
    :func:`image_size` when it is asked for. :meth:`save` then writes the grown index atomically,
    with one warning. A read-only folder keeps the scanned sizes in this process.
    """

    _memory: dict[str, dict] = {}  # root -> sizes scanned where the index could not be written

    def __init__(self, root):
        self.root = Path(root)
        self.image_dir = self.root / "images"
        self.sizes = dict(read_image_sizes(self.root))
        self.sizes.update(self._memory.get(str(self.root.resolve()), {}))
        self.scanned, self._swept = 0, False

    def __call__(self, name: str) -> tuple[int, int]:
        hw = self.sizes.get(name)
        if hw is None and not self._swept:
            self._scan()
            hw = self.sizes.get(name)
        if hw is None:
            hw = self.sizes[name] = image_size(self.image_dir / name)  # raises for a bad image
            self.scanned += 1
        return hw

    def _scan(self) -> None:
        self._swept = True
        for ann in sorted(self.root.glob("annotations-*.csv")):
            for line in _read_text(ann).splitlines()[1:]:
                name = line.split(":", 1)[0].strip()
                if name and name not in self.sizes and check_name(name) is None:
                    try:
                        self.sizes[name] = image_size(self.image_dir / name)
                        self.scanned += 1
                    except (OSError, ValueError, SyntaxError):
                        pass  # reported when that image is asked for

    def save(self) -> None:
        """Write the index if images were scanned (the one-time scan of an older dataset)."""
        if not self.scanned:
            return
        path = self.root / IMAGE_SIZES
        try:
            write_image_sizes(self.root, self.sizes)
            where = f"cached in {path}"
        except OSError as e:  # a read-only dataset: remember them for this process
            self._memory[str(self.root.resolve())] = dict(self.sizes)
            where = f"cannot write {path} ({e.strerror or e}); kept in memory for this process"
        log.warning("%s: read the headers of %d images to learn their sizes (no %s yet); %s", self.root,
                    self.scanned, IMAGE_SIZES, where)
        self.scanned = 0


def read_annotations(path, image_dir=None, skip_bad: bool = False,
                     size: Optional[Sequence[int]] = None, image_sizes=None) -> Annotations:
    """Read an annotation file into ``{name: (18, 2) float32 array of (y, x)}`` (-1 = missing).

    ``image_dir``: when given, each image must exist and be readable (header) and keypoints must
    lie inside it. ``image_sizes``: an :class:`ImageSizes` to take the sizes from instead of each
    header. ``size``: (H, W) to check coordinates against when images are not opened.
    """
    path = Path(path)
    out = Annotations()
    if image_dir is None and image_sizes is not None:
        image_dir = image_sizes.image_dir
    if image_sizes is None and image_dir is not None:
        image_sizes = lambda name: image_size(Path(image_dir) / name)  # noqa: E731
    text = _read_text(path)
    lines = text.splitlines()

    def bad(row: int, problem: str) -> None:
        msg = f"{path}: row {row}: {problem}"
        if not skip_bad:
            raise DataFormatError(msg)
        out.problems.append(msg)

    if not lines or lines[0].replace(" ", "").strip() != ANNOTATION_HEADER:
        raise DataFormatError(f"{path}: row 1: header must be {ANNOTATION_HEADER!r}, "
                              f"got {lines[0][:80] if lines else ''!r}")
    for row, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split(":")
        if len(fields) != 3:
            bad(row, f"expected 3 ':'-separated fields (name, y list, x list), got {len(fields)}")
            continue
        name = fields[0].strip()
        why = check_name(name)
        if why:
            bad(row, why)
            continue
        if name in out:
            bad(row, f"image {name!r} is annotated twice")
            continue
        try:
            ys, xs = _parse_list(fields[1]), _parse_list(fields[2])
        except ValueError as e:
            bad(row, str(e))
            continue
        kp = np.stack([np.asarray(ys, np.float32), np.asarray(xs, np.float32)], axis=1)
        missing = (kp < 0).any(axis=1)
        if ((kp < 0) & (kp != -1)).any():
            bad(row, "negative coordinate other than -1 (the missing marker)")
            continue
        kp[missing] = -1  # a keypoint with one -1 coordinate is missing as a whole
        hw = size
        if image_sizes is not None:
            try:
                hw = image_sizes(name)
            except FileNotFoundError:
                bad(row, f"image file {Path(image_dir) / name} is missing")
                continue
            except (OSError, ValueError) as e:
                bad(row, f"image file {Path(image_dir) / name} is unreadable ({e})")
                continue
            out.sizes[name] = hw
        if hw is not None:
            vis = kp[~missing]
            # <= H (not H - 1): rounding a coordinate near the border to an integer may give H.
            if len(vis) and ((vis[:, 0] > hw[0]).any() or (vis[:, 1] > hw[1]).any()):
                bad(row, f"keypoint outside the {hw[0]}x{hw[1]} image (max y {vis[:, 0].max():g}, "
                         f"max x {vis[:, 1].max():g})")
                continue
        out[name] = kp
    if out.problems:
        log.warning("%s: skipped %d bad rows", path, len(out.problems))
    return out


_NOTED_EXTRA_COLUMNS: set = set()  # pairs files whose extra columns were noted in the log (once each)


def read_pairs(path, known_names: Optional[Iterable[str]] = None, skip_bad: bool = False) -> Pairs:
    """Read a pairs file into ``[(from, to), ...]``. The header names a ``from`` and a ``to`` column (``from,to``,
    ``,from,to`` with a leading index column, or more columns: those are ignored, noted once in the log).

    ``known_names``: when given, both names of each pair must be in it (e.g. the annotations).
    """
    path = Path(path)
    known = None if known_names is None else set(known_names)
    out = Pairs()

    def bad(row: int, problem: str) -> None:
        msg = f"{path}: row {row}: {problem}"
        if not skip_bad:
            raise DataFormatError(msg)
        out.problems.append(msg)

    rows = list(csv.reader(io.StringIO(_read_text(path))))
    header = [h.strip() for h in rows[0]] if rows else []
    if header.count("from") != 1 or header.count("to") != 1:
        raise DataFormatError(f"{path}: row 1: header must name one 'from' and one 'to' column (e.g. 'from,to'), "
                              f"got {','.join(header)!r}")
    i_from, i_to = header.index("from"), header.index("to")
    extra = [h for i, h in enumerate(header) if i not in (i_from, i_to) and h]  # an unnamed index column: silent
    if extra and str(path) not in _NOTED_EXTRA_COLUMNS:
        _NOTED_EXTRA_COLUMNS.add(str(path))
        log.info("%s: column%s %s ignored (a pair is its 'from' and 'to' columns)", path,
                 "s" if len(extra) > 1 else "", ", ".join(repr(h) for h in extra))
    width = len(header)
    for row, fields in enumerate(rows[1:], start=2):
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != width:
            bad(row, f"expected {width} comma-separated fields, got {len(fields)}")
            continue
        a, b = fields[i_from].strip(), fields[i_to].strip()
        why = check_name(a) or check_name(b)
        if why:
            bad(row, why)
            continue
        if known is not None:
            unknown = [n for n in (a, b) if n not in known]
            if unknown:
                bad(row, f"pair names image {unknown[0]!r} that has no annotation")
                continue
        out.append((a, b))
    if out.problems:
        log.warning("%s: skipped %d bad rows", path, len(out.problems))
    return out


def _format_list(values: np.ndarray) -> str:
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def stored_keypoints(kp) -> np.ndarray:
    """(18, 2) keypoints as a dataset stores them: rounded to integers, a keypoint with a negative
    coordinate -1 as a whole (what :func:`write_annotations` writes and the shards hold)."""
    kp = np.asarray(kp, dtype=np.float64)
    return np.where((kp < 0).any(axis=1, keepdims=True), -1, np.rint(kp)).astype(np.int64)


def write_annotations(path, mapping: Mapping[str, np.ndarray]) -> None:
    """Write ``{name: (18, 2) (y, x)}`` in the benchmark format, coordinates rounded to integers
    and negatives written as -1; atomically (temp file + rename)."""
    lines = [ANNOTATION_HEADER]
    for name, kp in mapping.items():
        why = check_name(name)
        if why:
            raise DataFormatError(f"{path}: {why}")
        if np.shape(kp) != (NUM_KEYPOINTS, 2):
            raise DataFormatError(f"{path}: keypoints of {name!r} have shape {np.shape(kp)}, expected (18, 2)")
        k = stored_keypoints(kp)
        lines.append(f"{name}: {_format_list(k[:, 0])}: {_format_list(k[:, 1])}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_pairs(path, pairs: Iterable[Sequence[str]]) -> None:
    """Write ``[(from, to), ...]`` with header ``from,to``; atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["from", "to"])
    for a, b in pairs:
        w.writerow([a, b])
    atomic_write_text(path, buf.getvalue())


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = disk_error(path, e) if isinstance(e, OSError) else None
        if full is not None:
            raise full from None
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text ({e})") from None
