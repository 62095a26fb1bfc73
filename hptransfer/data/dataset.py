"""PyTorch pair dataset and loader over the benchmark format (``images/``, ``annotations-*.csv``,
``pairs-*.csv``).

Resizing to the stage resolution R (square):

- ``fit="pad"`` (default): scale the longer side to R keeping the aspect ratio, pad the shorter
  side symmetrically with white (1.0 in [-1, 1], DeepFashion's background); keypoints are scaled
  and shifted the same way. A 256x176 DeepFashion image at R=256 keeps its pixels and gets 40 px
  of white left and right.
- ``fit="resize"``: anisotropic resize to R x R.

Filter: PIL ``Image.BILINEAR`` with ``reducing_gap=None`` (PIL's bilinear widens its support when
it shrinks, i.e. it antialiases; no ``reduce()`` shortcut). A DALI loader must match this filter.
Keypoints map with pixel centres aligned: ``y' = (y + 0.5) * h / H - 0.5 + offset``.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from hptransfer.data.formats import DataFormatError, ImageSizes, read_annotations, read_pairs
from hptransfer.pose import flip_keypoints

log = logging.getLogger(__name__)

PAD_VALUE = 255  # white, 1.0 after mapping to [-1, 1]


def fit_geometry(height: int, width: int, resolution: int, fit: str = "pad"):
    """Where an H x W image lands in the R x R output: (new_h, new_w, off_y, off_x)."""
    if fit == "pad":
        s = resolution / max(height, width)
        nh, nw = max(1, round(height * s)), max(1, round(width * s))
        return nh, nw, (resolution - nh) // 2, (resolution - nw) // 2
    if fit == "resize":
        return resolution, resolution, 0, 0
    raise ValueError(f"fit must be 'pad' or 'resize', got {fit!r}")


def fit_keypoints(kp: np.ndarray, height: int, width: int, resolution: int, fit: str = "pad") -> np.ndarray:
    """Map (18, 2) (y, x) keypoints of an H x W image into the R x R output of :func:`fit_image`."""
    nh, nw, oy, ox = fit_geometry(height, width, resolution, fit)
    kp = np.asarray(kp, np.float32)
    out = np.empty_like(kp)
    out[:, 0] = (kp[:, 0] + 0.5) * (nh / height) - 0.5 + oy
    out[:, 1] = (kp[:, 1] + 0.5) * (nw / width) - 0.5 + ox
    # Pixel-centre mapping can put a visible edge joint at -0.1 when downscaling; clamp so it
    # stays visible (a negative coordinate means "missing").
    out[:, 0] = np.clip(out[:, 0], 0, resolution - 1)
    out[:, 1] = np.clip(out[:, 1], 0, resolution - 1)
    out[(kp < 0).any(axis=1)] = -1
    return out


def fit_image(img, resolution: int, fit: str = "pad"):
    """Resize a PIL RGB image into an R x R PIL image (see the module docstring)."""
    from PIL import Image

    nh, nw, oy, ox = fit_geometry(img.height, img.width, resolution, fit)
    if (nh, nw) != (img.height, img.width):
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    if (nh, nw) == (resolution, resolution):
        return img
    canvas = Image.new("RGB", (resolution, resolution), (PAD_VALUE,) * 3)
    canvas.paste(img, (ox, oy))
    return canvas


def to_tensor(img) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float32 in [-1, 1]."""
    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)


def load_image(path: Path):
    """Decode an image file to PIL RGB; errors name the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} is missing") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataFormatError(f"image file {path} is unreadable: {e}") from None


class PairSource(Dataset):
    """What every pair dataset shares: the item dict, flips seeded by (seed, epoch, index), and the
    ``skip_bad`` replacement of an unreadable pair by the next one. A subclass gives ``__len__``,
    ``_pair(i)`` -> (a, b) image ids, ``_load(id)`` -> (image (3, R, R), keypoints (18, 2)) and
    ``_describe(id)`` (the file or member, for messages)."""

    def __init__(self, root, split: str, resolution: int, flip: bool = False, fit: str = "pad",
                 skip_bad: bool = False, seed: int = 0):
        self.root = Path(root)
        self.split, self.resolution, self.flip, self.fit = split, int(resolution), bool(flip), fit
        self.skip_bad, self.seed, self.epoch = bool(skip_bad), int(seed), 0
        fit_geometry(1, 1, 1, fit)  # validates fit
        self.decode_failures = 0

    def set_epoch(self, epoch: int, seed: Optional[int] = None) -> None:
        """Flips of epoch ``epoch`` (and of run seed ``seed`` when given); call before making the
        epoch's loader (:func:`make_loader` does)."""
        self.epoch = int(epoch)
        if seed is not None:
            self.seed = int(seed)

    def _flip_for(self, index: int) -> bool:
        if not self.flip:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5)

    def readable_pair(self, index: int, load=None):
        """(skipped, load(ref id), load(tgt id)) of pair ``index`` or, under ``skip_bad``, of the next
        pair whose images load (``skipped`` pairs were passed over, each logged). ``load`` defaults
        to ``_load`` (decoded tensors); the DALI sources load encoded bytes instead."""
        load = load or self._load
        n = len(self)
        for attempt in range(n):
            a, b = self._pair((index + attempt) % n)
            try:
                return attempt, load(a), load(b)
            except (DataFormatError, FileNotFoundError) as e:
                if not self.skip_bad:
                    raise
                self.decode_failures += 1
                log.warning("skipping pair %d (%s -> %s): %s", (index + attempt) % n, self._describe(a),
                            self._describe(b), e)
        raise DataFormatError(f"{self.root}: no readable pair in split {self.split!r}")

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        _, (ref, kp_ref), (tgt, kp_tgt) = self.readable_pair(index)
        if self._flip_for(index):
            R = self.resolution
            ref, tgt = ref.flip(-1), tgt.flip(-1)
            kp_ref, kp_tgt = flip_keypoints(kp_ref, R), flip_keypoints(kp_tgt, R)
        return {"reference": ref, "target": tgt, "kp_reference": kp_ref, "kp_target": kp_tgt, "index": index}


class PairDataset(PairSource):
    """(reference, target) pairs of one split at resolution R, from a folder (images and CSVs).

    Item: ``{"reference": (3, R, R) float32 [-1, 1], "target": (3, R, R), "kp_reference": (18, 2)
    float32 (y, x) at R, "kp_target": (18, 2), "index": int}``. With ``flip=True`` both images and
    both keypoint sets of a pair are mirrored together, at random with probability 1/2 from a
    generator seeded by (seed, epoch, index): reproducible whatever the worker or order.
    ``skip_bad``: bad annotation/pair rows are skipped (counted in ``.problems``) and an image that
    fails to decode is replaced by the next pair (counted in ``.decode_failures`` per process).
    ``check_images``: keypoints are checked against each image's size, taken from the folder's
    ``image-sizes.csv`` (no image is opened); an older folder without it has its headers read once
    and the index written (:class:`hptransfer.data.formats.ImageSizes`).
    """

    def __init__(self, root, split: str, resolution: int, flip: bool = False, fit: str = "pad",
                 skip_bad: bool = False, seed: int = 0, check_images: bool = True):
        super().__init__(root, split, resolution, flip=flip, fit=fit, skip_bad=skip_bad, seed=seed)
        self.image_dir = self.root / "images"
        ann_path = self.root / f"annotations-{split}.csv"
        pairs_path = self.root / f"pairs-{split}.csv"
        for p in (ann_path, pairs_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such file (dataset root {self.root}, split {split!r})")
        sizes = ImageSizes(self.root) if check_images else None
        self.annotations = read_annotations(ann_path, image_sizes=sizes, skip_bad=skip_bad)
        if sizes is not None:
            sizes.save()
        self.pairs = read_pairs(pairs_path, known_names=self.annotations.keys(), skip_bad=skip_bad)
        self.problems = self.annotations.problems + self.pairs.problems

    def __len__(self) -> int:
        return len(self.pairs)

    def _pair(self, i: int):
        return self.pairs[i]

    def _describe(self, name: str) -> str:
        return name

    def _load(self, name: str):
        img = load_image(self.image_dir / name)
        kp = fit_keypoints(self.annotations[name], img.height, img.width, self.resolution, self.fit)
        return to_tensor(fit_image(img, self.resolution, self.fit)), torch.from_numpy(kp)


class _SkipSampler(Sampler):
    """The indices of ``base`` from position ``skip`` on (mid-epoch resume)."""

    def __init__(self, base: Sampler, skip: int):
        self.base, self.skip = base, skip

    def __iter__(self):
        it = iter(self.base)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive numpy/random from it.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset, batch_size: int, *, workers: int, seed: int, rank: int = 0, world_size: int = 1,
                shuffle: bool = True, drop_last: bool = True, epoch: int = 0, skip_batches: int = 0,
                pin_memory: Optional[bool] = None) -> DataLoader:
    """A DataLoader whose order is a function of (seed, epoch), sharded like DistributedSampler.

    The permutation of epoch ``epoch`` is DistributedSampler's (torch.randperm seeded with
    seed + epoch; rank r takes every world_size-th index, the last shard padded by repetition);
    ``skip_batches`` drops this rank's first batches so a resumed run continues exactly.
    Sets the epoch (and for a :class:`PairDataset` the seed) of the dataset's flips, so they are a
    function of (seed, epoch, index) too.
    """
    if isinstance(dataset, PairSource):
        dataset.set_epoch(epoch, seed=seed)
    elif hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    if skip_batches:
        sampler = _SkipSampler(sampler, skip_batches * batch_size)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + rank) % 2**63)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=pin_memory, persistent_workers=workers > 0, worker_init_fn=_seed_worker,
                      generator=gen)
