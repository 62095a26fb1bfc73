"""Per-sample perceptual criterion C (eq. 2-3): mean over (C, h, w) of |a - b| ("l1") or (a - b)^2 ("l2").

``perceptual_distance(fake, real, criterion, mask, impl)`` -> (M,) fp32 (fp64 for fp64 input):
- reference: :func:`criterion_per_sample` in torch (fp32 copies of both inputs, autograd saves them);
- fast: ``torch.ops.hptransfer.perceptual_distance`` of ``hptransfer._C`` (C++ / CUDA): reads the features
  in their own dtype with fp32 accumulation and, under autograd, writes the gradient in the same pass,
  so its backward is one scale per sample and neither input is kept. At 1024 px the global loss's
  relu1_2 features are ~270 MB per image in fp32: the fused op never makes those copies.
``real`` gets no gradient on either path where it does not require one.
"""
from __future__ import annotations

from typing import Optional

import torch

from hptransfer.ops._dispatch import use_fast

CRITERIA = ("l1", "l2")


def criterion_per_sample(a: torch.Tensor, b: torch.Tensor, criterion: str) -> torch.Tensor:
    """(B, ...) x2 -> (B,): mean over all but the first dim of |a-b| or (a-b)^2, in fp32."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    d = a.float() - b.float()
    d = d.abs() if criterion == "l1" else d * d
    return d.flatten(1).mean(dim=1)


def perceptual_distance_reference(fake: torch.Tensor, real: torch.Tensor, criterion: str,
                                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    d = criterion_per_sample(fake, real, criterion)
    return d if mask is None else d * mask.to(d.dtype)


def perceptual_distance(fake: torch.Tensor, real: torch.Tensor, criterion: str, mask: Optional[torch.Tensor] = None,
                        impl: str = "auto") -> torch.Tensor:
    """C per sample of features ``fake``, ``real`` (M, C, h, w), times ``mask`` (M,) when given.

    impl "auto": the fused op where ``hptransfer._C`` runs on the device (else the reference, one warning);
    "fast": the fused op or an error; "reference": torch.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if fake.dim() == 4 and use_fast("perceptual_distance", fake, impl, backend="extension"):
        if mask is None:
            mask = torch.ones(fake.shape[0], device=fake.device, dtype=torch.float32)
        return torch.ops.hptransfer.perceptual_distance(fake, real.to(fake.dtype), mask, 1 if criterion == "l1" else 2)
    return perceptual_distance_reference(fake, real, criterion, mask)
