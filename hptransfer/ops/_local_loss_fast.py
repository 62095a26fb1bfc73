"""Fast path of ``hptransfer.ops.local_perceptual_loss``: batched crops, VGG per half, fused criterion.

Same conventions as the reference (see ``local_perceptual_loss.py``); what differs is how it runs:
- fake and real crops of all B*N descriptors are gathered in ONE call on ``cat([fake, real])`` with the
  ImageNet normalisation fused into the gather (CUDA: the Triton ``gather_crops`` kernel, bf16 and
  channels_last out; CPU: ``torch.ops.hptransfer.gather_crops`` of ``hptransfer._C``, fp32 NCHW);
- small crops are upsampled (bilinear) to ``min_crop`` in one interpolate call;
- VGG runs once over the B*N fake crops with autograd and once over the B*N real crops under
  ``torch.no_grad``. Two batched calls rather than one call on the 2*B*N concatenation: autograd
  cannot drop the real half of a single batch, so one call would back-propagate through the real
  crops too (a third more conv work per step) and keep their activations alive. Without autograd
  (eval, or ``fake`` not requiring grad) the concatenation does go through VGG in one call;
- on the CPU, crops of missing descriptors are dropped before VGG (fewer convolutions when keypoints
  are missing); on CUDA the batch keeps its static shape and the validity mask zeroes them;
- per layer, ``torch.ops.hptransfer.perceptual_distance`` (C++/CUDA, fp32 accumulation, masked by
  descriptor validity, with its own backward) gives the (B*N,) per-crop criterion.
On CUDA the VGG pass runs under bf16 autocast (``GPU_DTYPE``) unless autocast is already on; the result
then matches the fp32 reference to bf16 precision (about 1e-2 relative), on the CPU to fp32 rounding.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from hptransfer.ops._dispatch import FastPathUnavailable, extension
from hptransfer.ops.gather_crops import gather_crops
from hptransfer.ops.local_perceptual_loss import CRITERIA, _prepare

GPU_DTYPE = torch.bfloat16  # crops and VGG activations on CUDA


def _vgg_context(device: torch.device):
    if device.type == "cuda" and not torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=GPU_DTYPE)
    return contextlib.nullcontext()


def _gather(images: torch.Tensor, centers: torch.Tensor, size: int, impl: str) -> torch.Tensor:
    """(2B, 3, R, R) images, (2B, N, 2) centres -> (2B*N, 3, s, s) ImageNet-normalised crops."""
    if images.is_cuda:
        return gather_crops(images, centers, size, impl=impl, normalize=True, out_dtype=GPU_DTYPE, channels_last=True)
    return torch.ops.hptransfer.gather_crops(images, centers, int(size), True)


def local_perceptual_loss_fast(fake: torch.Tensor, real: torch.Tensor, kp: torch.Tensor, vgg, criterion: str,
                               impl: str = "auto", layer_weights: Optional[Sequence[float]] = None,
                               min_crop: int = 32, count: Optional[int] = None) -> torch.Tensor:
    """Local perceptual loss, fast path. Arguments and result as ``local_perceptual_loss``:
    ``fake``, ``real`` (B, 3, R, R) in [-1, 1]; ``kp`` (B, 18, 2) (y, x) target keypoints at R;
    ``vgg(x, input_normalized=True) -> list`` of (B*N, C_l, h_l, w_l) features. Returns a float32 scalar,
    differentiable with respect to ``fake`` (``real`` gets no gradient).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if extension() is None:
        raise FastPathUnavailable("local_perceptual_loss: the fast path needs hptransfer._C, which did not load "
                                  "(see hptransfer.ops.backend_status())")
    centers, valid, size, out_size = _prepare(fake, real, kp, min_crop, count)
    B, N = valid.shape
    M = B * N
    p = 1 if criterion == "l1" else 2

    images = torch.cat([fake, real.detach()], dim=0)
    crops = _gather(images, torch.cat([centers, centers], dim=0), size, impl)
    if out_size != size:
        crops = F.interpolate(crops, size=(out_size, out_size), mode="bilinear", align_corners=False)

    mask = valid.reshape(M).to(device=fake.device, dtype=torch.float32)
    if not fake.is_cuda and not bool(valid.all()):
        # CPU: missing descriptors skip VGG altogether (on CUDA the batch keeps its shape: no host sync,
        # graph-capturable; the mask zeroes them in the criterion instead)
        keep = valid.reshape(M).nonzero().squeeze(1)
        if keep.numel() == 0:
            return (fake.sum() * 0.0).float()
        crops = torch.cat([crops[:M].index_select(0, keep), crops[M:].index_select(0, keep)])
        M = keep.numel()
        mask = mask.new_ones(M)

    with _vgg_context(fake.device):
        if torch.is_grad_enabled() and fake.requires_grad:
            feats_fake = vgg(crops[:M], input_normalized=True)
            with torch.no_grad():
                feats_real = vgg(crops[M:], input_normalized=True)
        else:
            feats = vgg(crops, input_normalized=True)
            feats_fake = [f[:M] for f in feats]
            feats_real = [f[M:] for f in feats]

    weights = list(layer_weights) if layer_weights is not None else [1.0] * len(feats_fake)
    if len(weights) != len(feats_fake):
        raise ValueError(f"{len(weights)} layer weights for {len(feats_fake)} VGG layers")
    total = None
    for w, a, b in zip(weights, feats_fake, feats_real):
        d = w * torch.ops.hptransfer.perceptual_distance(a, b.to(a.dtype), mask, p)  # (M,), 0 where invalid
        total = d if total is None else total + d
    return (total.sum() / B).float()  # = mean over the batch of each image's sum over descriptors
