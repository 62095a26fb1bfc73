"""Training pairs for the appearance flow network (``task: garment_flow``). Ours: the paper does not say
what its appearance flow network trained on; these pairs are one person in two poses.

A dataset in the benchmark format plus one parsing map per image (``<root>/<parsing_dir>/<stem>.png``,
as :mod:`hptransfer.data.synth` writes them; LIP, CIHP or ATR numbering). For a pair (A -> B) of one
person in two poses, the flow network learns to move A's upper garment onto B's garment region:

``{"garment": (3, R, R) A's image inside A's garment mask, 0 outside, "source_mask": (1, R, R),
"target_region": (1, R, R) B's clothes and arms (where a garment may lie), "target_mask": (1, R, R)
B's garment, "target": (3, R, R) B's image, "source": (3, R, R) A's image, "kp_source", "kp_target":
(18, 2) (y, x) at R, "index": int}``; images in [-1, 1], masks 0/1 float32. Images and maps are fitted
to R x R as :class:`~hptransfer.data.dataset.PairDataset` fits images (maps with nearest-neighbour
resizing and background padding); flips mirror everything and swap left/right joints.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hptransfer.data.dataset import PairDataset, fit_geometry
from hptransfer.data.formats import image_size
from hptransfer.data.parsing import garment_masks, read_parsing
from hptransfer.pose import flip_keypoints


def fit_labels(labels: np.ndarray, resolution: int, fit: str = "pad") -> np.ndarray:
    """(H, W) label map -> (R, R), placed like :func:`~hptransfer.data.dataset.fit_image` (nearest, 0 padding)."""
    from PIL import Image

    h, w = labels.shape
    nh, nw, oy, ox = fit_geometry(h, w, resolution, fit)
    im = Image.fromarray(labels.astype(np.uint8), mode="L")
    if (nh, nw) != (h, w):
        im = im.resize((nw, nh), Image.NEAREST)
    out = np.zeros((resolution, resolution), np.uint8)
    out[oy:oy + nh, ox:ox + nw] = np.asarray(im)
    return out


def parsing_path(root, name: str, parsing_dir: str = "parsing") -> Path:
    """Where the parsing map of image ``name`` lives: ``<root>/<parsing_dir>/<name without suffix>.png``."""
    return Path(root) / parsing_dir / (str(Path(name).with_suffix("")) + ".png")


class GarmentFlowDataset(Dataset):
    """Flow-network pairs of one split at resolution R (see the module docstring). ``skip_bad`` skips bad
    annotation and pair rows; an unreadable image or parsing map is an error naming the file."""

    def __init__(self, root, split: str, resolution: int, numbering: str = "lip", parsing_dir: str = "parsing",
                 flip: bool = False, fit: str = "pad", skip_bad: bool = False, seed: int = 0):
        self.pairs_ds = PairDataset(root, split, resolution, flip=flip, fit=fit, skip_bad=skip_bad, seed=seed)
        self.root, self.numbering, self.parsing_dir = Path(root), numbering, parsing_dir
        self.resolution, self.fit = int(resolution), fit
        missing = [n for n in list(self.pairs_ds.annotations)[:50] if not parsing_path(root, n, parsing_dir).is_file()]
        if missing:
            raise FileNotFoundError(f"{parsing_path(root, missing[0], parsing_dir)}: no parsing map for image "
                                    f"{missing[0]} (the garment_flow task needs one label PNG per image in "
                                    f"{self.root / parsing_dir}; `hptransfer data synth` writes them)")

    def __len__(self) -> int:
        return len(self.pairs_ds)

    def set_epoch(self, epoch: int, seed=None) -> None:
        self.pairs_ds.set_epoch(epoch, seed)

    def _masks(self, name: str):
        path = parsing_path(self.root, name, self.parsing_dir)
        size = image_size(self.root / "images" / name)  # (H, W) from the header, no decode
        labels = fit_labels(read_parsing(path, self.numbering, size), self.resolution, self.fit)
        upper, region = garment_masks(labels, self.numbering, str(path))
        as_t = lambda m: torch.from_numpy(m.astype(np.float32))[None]  # noqa: E731
        return as_t(upper), as_t(region)

    def __getitem__(self, index: int) -> dict:
        # Images and keypoints as PairDataset loads them (an unreadable file is an error naming it: a
        # substituted pair would no longer match its parsing maps); flips from (seed, epoch, index).
        index = int(index)
        a, b = self.pairs_ds.pairs[index]
        src, kp_src = self.pairs_ds._load(a)
        tgt, kp_tgt = self.pairs_ds._load(b)
        src_mask, _ = self._masks(a)
        tgt_mask, tgt_region = self._masks(b)
        if self.pairs_ds._flip_for(index):
            R = self.resolution
            src, tgt, src_mask, tgt_mask, tgt_region = (t.flip(-1) for t in (src, tgt, src_mask, tgt_mask, tgt_region))
            kp_src, kp_tgt = flip_keypoints(kp_src, R), flip_keypoints(kp_tgt, R)
        return {"garment": src * src_mask, "source_mask": src_mask, "target_region": tgt_region,
                "target_mask": tgt_mask, "target": tgt, "source": src, "kp_source": kp_src, "kp_target": kp_tgt,
                "index": index}


__all__ = ["GarmentFlowDataset", "fit_labels", "parsing_path"]
