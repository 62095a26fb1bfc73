"""What every kernel launcher needs besides its kernel."""
from __future__ import annotations

import contextlib

import torch


def device_guard(device: torch.device):
    """Launch on ``device``: Triton launches on the *current* CUDA device and its current stream, not on
    the tensors' device, so tensors on cuda:1 while cuda:0 is current would fault without this guard."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
