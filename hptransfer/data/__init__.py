"""Datasets in the DeepFashion pose-transfer benchmark format (folders) and as tar shards
(docs/data.md): readers/writers, the PyTorch pair datasets and loader, synthetic people, checks. Names load lazily so ``hptransfer.data.synth`` and
the format readers do not import torch's DataLoader machinery until needed."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DataFormatError": "formats", "read_annotations": "formats", "read_pairs": "formats",
    "write_annotations": "formats", "write_pairs": "formats",
    "PairDataset": "dataset", "make_loader": "dataset",
    "ShardPairDataset": "shards", "open_pair_dataset": "shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"hptransfer.data.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hptransfer.data' has no attribute {name!r}")
