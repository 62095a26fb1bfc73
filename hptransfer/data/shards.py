"""Tar shards in the webdataset layout with every stage's resolution in each sample, read by offset.

A shard folder (written by ``hptransfer data shard``, or a preparation tool with ``--shards``)::

    manifest.json           format, version, sizes, fit, image format, splits, shards (bytes, sha256), source
    train-000000.tar        webdataset samples: <key>.json, <key>.64.jpg, ..., <key>.1024.jpg
    train-000000.idx        DALI's wds2idx index (v1.2): per sample, each member's extension, offset, size
    train.samples.npy       the split's table, one row per image: shard, key, (H, W), keypoints, and the
                            offset / size / CRC-32 of each resolution's member (:func:`table_dtype`)
    train.pairs.npy         (P, 2) int32 table rows of the pairs (from, to)
    train.names.txt         the split's image names in table order (error messages, ``data show``)

Each member ``<key>.<R>.<ext>`` is the image exactly as :func:`hptransfer.data.dataset.fit_image`
makes it at R (already R x R: the loaders decode and do not resize), PNG (lossless) or JPEG; the
table keeps the keypoints in the source image's pixels and its (H, W), and the loaders map them with
:func:`~hptransfer.data.dataset.fit_keypoints`, the folder loader's own function, so a shard set and
the folder it came from give the same batches (bit-exact with PNG members).

Pairs: a rank memory-maps the split's table (244 bytes per image with 5 sizes: 244 MB for a million
frames, paged in as read) and its pairs (8 bytes each); pair i is rows (a, b), and each image is one
``pread`` of ``size[R]`` bytes at ``offset[R]`` in shard ``shard``: the 64-px stage never touches the
1024-px bytes, and a worker opens each shard file once.
"""
from __future__ import annotations

import io
import json
import logging
import os
import zlib
from pathlib import Path
import numpy as np
import torch

from hptransfer.data.dataset import PairSource, fit_keypoints, to_tensor
from hptransfer.data.formats import DataFormatError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "hptransfer-shards"
VERSION = 1
KEY_DIGITS = 9  # member names <key:09d>.<R>.<ext>: up to a billion samples per shard set


def table_dtype(n_sizes: int) -> np.dtype:
    """One table row per image: shard (index into manifest["shards"]), key, hw (source H, W), kp (18, 2)
    (y, x) in source pixels, and per resolution (manifest["sizes"] order) offset, size and crc32."""
    return np.dtype([("shard", "<i4"), ("key", "<i8"), ("hw", "<i4", (2,)), ("kp", "<f4", (18, 2)),
                     ("offset", "<i8", (n_sizes,)), ("size", "<i4", (n_sizes,)), ("crc", "<u4", (n_sizes,))])


def sample_key(key: int) -> str:
    return f"{key:0{KEY_DIGITS}d}"


def member_name(key: int, resolution: int, ext: str) -> str:
    return f"{sample_key(key)}.{resolution}.{ext}"


def is_shard_root(root) -> bool:
    """Whether ``root`` holds a shard set (its ``manifest.json``), not a folder dataset."""
    return (Path(root) / MANIFEST).is_file()


def read_manifest(root) -> dict:
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (not a shard folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataFormatError(f"{path}: not a {FORMAT} manifest (format {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("version") != VERSION:
        raise DataFormatError(f"{path}: version {data.get('version')!r}; this hptransfer reads version {VERSION}")
    return data


def read_wds_index(path) -> list[tuple[str, dict]]:
    """A wds2idx v1.2 index: ``[(key, {extension: (offset, size)}), ...]`` in tar order."""
    path = Path(path)
    lines = path.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2":
        raise DataFormatError(f"{path}: row 1: expected 'v1.2 <samples>' (DALI's wds2idx), got {lines[:1]}")
    out = []
    for row, line in enumerate(lines[1:], start=2):
        f = line.split()
        if not f or len(f) % 4:
            raise DataFormatError(f"{path}: row {row}: expected groups of 'ext offset size name'")
        members = {}
        for j in range(0, len(f), 4):
            members[f[j]] = (int(f[j + 1]), int(f[j + 2]))
        name = f[3]
        out.append((name[:name.find(".", name.rfind("/") + 1)], members))
    if len(out) != int(head[1]):
        raise DataFormatError(f"{path}: header says {head[1]} samples, found {len(out)}")
    return out


class ShardSet:
    """A shard folder: its manifest, each split's table and pairs (memory-mapped on first use), and
    member reads by offset. Picklable without its open files and maps (DALI's spawned workers)."""

    def __init__(self, root):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.sizes = [int(s) for s in self.manifest["sizes"]]
        self.fit = self.manifest["fit"]
        self.ext = self.manifest["image_format"]
        self.shards = [s["name"] for s in self.manifest["shards"]]
        self._fds: dict[int, int] = {}
        self._maps: dict[str, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"], state["_maps"] = {}, {}
        return state

    def splits(self) -> list[str]:
        return sorted(self.manifest["splits"])

    def _array(self, name: str) -> np.ndarray:
        arr = self._maps.get(name)
        if arr is None:
            path = self.root / name
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: no such file (shard folder {self.root})") from None
            except ValueError as e:
                raise DataFormatError(f"{path}: not a table this hptransfer wrote ({e})") from None
            self._maps[name] = arr
        return arr

    def _check_split(self, split: str) -> None:
        if split not in self.manifest["splits"]:
            raise FileNotFoundError(f"{self.root / MANIFEST}: no split {split!r} (has {self.splits()})")

    def table(self, split: str) -> np.ndarray:
        """The split's rows (:func:`table_dtype`), memory-mapped."""
        self._check_split(split)
        t = self._array(f"{split}.samples.npy")
        if t.dtype != table_dtype(len(self.sizes)):
            raise DataFormatError(f"{self.root / f'{split}.samples.npy'}: unexpected columns {t.dtype}")
        return t

    def pairs(self, split: str) -> np.ndarray:
        """(P, 2) int32 table rows of the split's pairs (from, to), memory-mapped."""
        self._check_split(split)
        return self._array(f"{split}.pairs.npy")

    def names(self, split: str) -> list[str]:
        """The split's image names in table order (read when asked: error messages, check, show)."""
        self._check_split(split)
        return (self.root / f"{split}.names.txt").read_text(encoding="utf-8").splitlines()

    def column(self, resolution: int) -> int:
        if resolution not in self.sizes:
            raise DataFormatError(f"{self.root}: the shards hold {self.sizes} px, not {resolution} px; write them with "
                                  f"`hptransfer data shard SRC OUT --sizes {','.join(map(str, self.sizes + [resolution]))}`")
        return self.sizes.index(resolution)

    def where(self, row, resolution: int) -> str:
        """'<shard path>: member <key>.<R>.<ext>', for messages."""
        return f"{self.root / self.shards[int(row['shard'])]}: member {member_name(int(row['key']), resolution, self.ext)}"

    def read(self, row, resolution: int) -> bytes:
        """The encoded bytes of ``row``'s member at ``resolution``: one pread, length and CRC-32
        checked. DataFormatError (truncated / corrupt) or FileNotFoundError name shard and member."""
        col = self.column(resolution)
        shard, offset, size = int(row["shard"]), int(row["offset"][col]), int(row["size"][col])
        fd = self._fds.get(shard)
        if fd is None:
            path = self.root / self.shards[shard]
            try:
                fd = self._fds[shard] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise FileNotFoundError(f"shard {path} is missing (needed for member "
                                        f"{member_name(int(row['key']), resolution, self.ext)})") from None
        try:
            data = os.pread(fd, size, offset)
        except OSError as e:
            raise DataFormatError(f"{self.where(row, resolution)}: unreadable ({e.strerror or e})") from None
        if len(data) != size:
            raise DataFormatError(f"{self.where(row, resolution)}: truncated (the shard ends {len(data)} of its "
                                  f"{size} bytes in)")
        if zlib.crc32(data) != int(row["crc"][col]):
            raise DataFormatError(f"{self.where(row, resolution)}: corrupt (CRC-32 {zlib.crc32(data):08x}, the table "
                                  f"says {int(row['crc'][col]):08x})")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class ShardPairDataset(PairSource):
    """:class:`~hptransfer.data.dataset.PairDataset`'s twin over a shard folder: the same items, flips,
    order and ``skip_bad`` replacements; each image is its resolution's member, decoded and not resized.

    ``fit`` must be the one the shards were written with (it is baked into the stored images).
    """

    def __init__(self, root, split: str, resolution: int, flip: bool = False, fit: str = "pad",
                 skip_bad: bool = False, seed: int = 0):
        super().__init__(root, split, resolution, flip=flip, fit=fit, skip_bad=skip_bad, seed=seed)
        self.shards = ShardSet(root)
        if self.shards.fit != fit:
            raise DataFormatError(f"{self.root / MANIFEST}: the shards were written with fit={self.shards.fit!r}; "
                                  f"data.fit={fit!r} needs `hptransfer data shard --fit {fit}`")
        self.shards.column(self.resolution)  # the stage's size is there
        self.table, self.pair_rows  # noqa: B018 - opened now: a bad table fails here, not in a worker
        self.problems: list[str] = []

    @property
    def table(self) -> np.ndarray:
        """The split's rows, memory-mapped (reopened after pickling, not pickled)."""
        return self.shards.table(self.split)

    @property
    def pair_rows(self) -> np.ndarray:
        return self.shards.pairs(self.split)

    def __len__(self) -> int:
        return len(self.pair_rows)

    def _pair(self, i: int):
        a, b = self.pair_rows[i]
        return int(a), int(b)

    def _describe(self, image) -> str:
        return self.shards.where(self.table[image], self.resolution)

    def encoded(self, image: int) -> bytes:
        """Table row ``image``'s member at the dataset's resolution (checked bytes)."""
        return self.shards.read(self.table[image], self.resolution)

    def keypoints(self, image: int) -> np.ndarray:
        """(18, 2) float32 (y, x) of table row ``image`` at the dataset's resolution."""
        row = self.table[image]
        return fit_keypoints(row["kp"], int(row["hw"][0]), int(row["hw"][1]), self.resolution, self.fit)

    def _load(self, image: int):
        from PIL import Image

        data = self.encoded(image)
        R = self.resolution
        try:
            with Image.open(io.BytesIO(data)) as im:
                img = im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            raise DataFormatError(f"{self._describe(image)}: does not decode ({e})") from None
        if img.size != (R, R):
            raise DataFormatError(f"{self._describe(image)}: is {img.width}x{img.height}, expected {R}x{R}")
        return to_tensor(img), torch.from_numpy(self.keypoints(image))


def open_pair_dataset(root, split: str, resolution: int, *, flip: bool = False, fit: str = "pad",
                      skip_bad: bool = False, seed: int = 0):
    """The pair dataset of ``root``, whichever format it is: a shard folder (``manifest.json``) gives a
    :class:`ShardPairDataset`, a folder of images and CSVs a :class:`~hptransfer.data.dataset.PairDataset`."""
    from hptransfer.data.dataset import PairDataset

    cls = ShardPairDataset if is_shard_root(root) else PairDataset
    return cls(root, split, resolution, flip=flip, fit=fit, skip_bad=skip_bad, seed=seed)

