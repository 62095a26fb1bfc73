"""Frozen VGG-16 feature extractor for the perceptual losses (paper eq. 2-3; Johnson et al.).

The layer layout is torchvision's ``vgg16().features`` (conv3x3 + ReLU, max-pool between blocks),
so the torchvision ImageNet file ``vgg16-397923af.pth`` loads as is (keys ``features.N.weight``;
its classifier keys are ignored). The stack is cut after the last requested layer. Nothing is
downloaded unless the config says ``loss.vgg_weights: auto`` (then :func:`hptransfer.weights.ensure`
fetches and verifies it once into the torch hub cache); ``hptransfer weights fetch vgg16`` does the same
by hand. See :func:`find_weights`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from hptransfer.config import VGG_LAYERS
from hptransfer.constants import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

ENV_VAR = "HPTRANSFER_VGG16"
# torchvision vgg16 "D" configuration; M = 2x2 max-pool.
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Index of each named ReLU in the ``features`` Sequential.
LAYER_INDEX = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}


def find_weights() -> Path:
    """The VGG-16 weights file: ``$HPTRANSFER_VGG16``, then ``<torch hub dir>/checkpoints/vgg16-397923af.pth``
    (:func:`hptransfer.weights.find`). Raises :class:`hptransfer.errors.WeightsUnavailable` (a
    FileNotFoundError) naming every place looked and how to provide the file."""
    from hptransfer.errors import WeightsUnavailable
    from hptransfer.weights import find

    try:
        return find("vgg16")
    except WeightsUnavailable as e:
        e.message += " (or set loss.vgg_weights in the config to its path)"
        raise


class VGG16Features(nn.Module):
    """Frozen VGG-16 ``features`` up to the last of ``layers``; always in eval mode.

    ``forward(x (B, 3, H, W), input_normalized=False) -> list`` of (B, C_l, H_l, W_l) feature maps,
    one per requested layer in the order given. ``x`` is in [-1, 1] and is ImageNet-normalised here
    unless ``input_normalized``. Computes in the weights' dtype unless autocast is on; accepts
    bf16 / fp16 / channels_last inputs.

    ``weights``: a file path (torchvision ``.pth`` state dict or ``.safetensors``), ``None`` to
    search the default places (:func:`find_weights`), ``"auto"`` to search and download when absent,
    or ``"random"`` (tests only: the features are then not perceptual).
    """

    def __init__(self, weights: Optional[str | os.PathLike] = None, layers: Sequence[str] = VGG_LAYERS):
        super().__init__()
        unknown = [name for name in layers if name not in LAYER_INDEX]
        if unknown or not layers:
            raise ValueError(f"unknown VGG layers {unknown or list(layers)}; known: {list(LAYER_INDEX)}")
        self.layers = tuple(layers)
        self.taps = [LAYER_INDEX[name] for name in self.layers]
        last = max(self.taps)
        modules: list[nn.Module] = []
        cin = 3
        for v in _CFG:
            if len(modules) > last:
                break
            if v == "M":
                modules.append(nn.MaxPool2d(2, 2))
            else:
                modules += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*modules[:last + 1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if weights is None:
            weights = find_weights()
        elif isinstance(weights, str) and weights == "auto":
            from hptransfer.weights import ensure
            weights = ensure("vgg16")
        if isinstance(weights, str) and weights == "random":
            log.warning("VGG16Features with random weights: perceptual losses are NOT perceptual (tests only)")
            self.source = "random"
        else:
            self.load_weights(Path(weights))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def load_weights(self, path: Path) -> None:
        """Load a torchvision-format VGG-16 state dict (``features.N.*``; other keys ignored)."""
        from hptransfer.errors import WeightsError, WeightsUnavailable
        from hptransfer.weights import load_state_dict

        if not path.is_file():
            raise WeightsUnavailable(f"VGG-16 weights file not found: {path} (set loss.vgg_weights or ${ENV_VAR}, "
                                     "or run `hptransfer weights fetch vgg16`)")
        sd = load_state_dict(path)
        own = self.state_dict()
        missing = [k for k in own if k not in sd]
        if missing:
            raise WeightsError(f"{path}: not a torchvision VGG-16 state dict; missing {missing[:4]}")
        for k, v in own.items():
            if tuple(sd[k].shape) != tuple(v.shape):
                raise WeightsError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
        self.load_state_dict({k: sd[k] for k in own})
        self.source = str(path)
        log.info("loaded VGG-16 weights from %s", path)

    def train(self, mode: bool = True) -> "VGG16Features":
        return super().train(False)  # frozen: BN-free, but keep eval semantics whatever the caller does

    def forward(self, x: torch.Tensor, input_normalized: bool = False) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG16Features input must be (B, 3, H, W), got {tuple(x.shape)}")
        w = self.features[0].weight
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != w.dtype:
            x = x.to(w.dtype)
        if not input_normalized:
            x = ((x + 1) * 0.5 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = {}
        wanted = set(self.taps)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in wanted:
                # the next in-place ReLU never touches this tensor (a conv or pool comes next)
                out[i] = x
        return [out[i] for i in self.taps]
