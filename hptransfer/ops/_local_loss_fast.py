"""Batched path of ``hptransfer.ops.local_perceptual_loss``: crops in one gather, VGG once per half,
the per-crop distance fused in ``hptransfer._C`` where it can run.

Same conventions as the reference (see ``local_perceptual_loss.py``); what differs is how it runs:
- the fake crops of all B*N descriptors are gathered in one call, the real crops in another under
  ``torch.no_grad`` (so the backward's scatter-add and its fp32 image-gradient buffer cover the fake
  images only), with the ImageNet normalisation fused into the gather (CUDA: ``hptransfer.ops.gather_crops``,
  the Triton kernel; CPU: ``torch.ops.hptransfer.gather_crops`` of ``hptransfer._C``, else the reference);
  crops are channels_last when ``fake`` is (the trainer's GPU layout, VGG's too), NCHW otherwise;
- small crops are upsampled to ``local_min_crop`` by :func:`upsample_crops` (deterministic matmuls, layout kept);
- VGG runs once over the B*N fake crops with autograd and once over the B*N real crops under
  ``torch.no_grad``. Two batched calls rather than one call on the 2*B*N concatenation: autograd
  cannot drop the real half of a single batch, so one call would back-propagate through the real
  crops too (a third more conv work per step) and keep their activations alive. Without autograd
  (eval, or ``fake`` not requiring grad) the concatenation does go through VGG in one call;
- crops of missing descriptors are dropped before VGG (about a quarter of 44 on half-body photos): one
  host read of the valid count per step; on CUDA the kept batch is padded with masked crops to a
  multiple of 8 (few distinct shapes for cuDNN);
- per layer, ``torch.ops.hptransfer.perceptual_distance`` (C++/CUDA, fp32 accumulation, masked by
  descriptor validity, with its own backward) gives the (B*N,) per-crop criterion. Where it cannot run
  (``_C`` missing, or built without CUDA for CUDA tensors) the same criterion is computed with torch on
  the batch: the VGG pass stays batched either way; only the fused distance is lost (one warning, or an
  error under HPTRANSFER_STRICT=1; ``impl="fast"`` raises).
Precision is the caller's: crops are gathered in the autocast dtype when autocast is on for their
device (one rounding, straight to what the convolutions compute in), else in ``fake``'s dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from hptransfer.ops._dispatch import extension, use_fast
from hptransfer.ops.gather_crops import gather_crops
from hptransfer.ops._crops import is_channels_last, prepare_crops, upsample_crops
from hptransfer.ops.perceptual_distance import CRITERIA, perceptual_distance


def crop_dtype(device: torch.device, input_dtype: torch.dtype) -> torch.dtype:
    """The dtype the crops and VGG run in: the caller's autocast dtype on ``device``, else the inputs'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return input_dtype


def _gather(images: torch.Tensor, centers: torch.Tensor, size: int, impl: str, dtype: torch.dtype,
            channels_last: bool) -> torch.Tensor:
    """(B, 3, R, R) images, (B, N, 2) centres -> (B*N, 3, s, s) ImageNet-normalised crops in ``dtype``."""
    if images.is_cuda:
        return gather_crops(images, centers, size, impl=impl, normalize=True, out_dtype=dtype,
                            channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if extension() is not None:
        return torch.ops.hptransfer.gather_crops(images, centers, int(size), True).to(dtype=dtype, memory_format=fmt)
    return gather_crops(images, centers, size, impl="reference", normalize=True, out_dtype=dtype,
                        channels_last=channels_last)


def _rows(crops: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``crops[rows]`` in the crops' layout (``index_select`` alone returns NCHW)."""
    if is_channels_last(crops):
        return crops.permute(0, 2, 3, 1).index_select(0, rows).permute(0, 3, 1, 2)
    return crops.index_select(0, rows)


# Crops of missing descriptors are dropped before VGG. The kept count is read on the host (the step's one
# sync besides the finite check; bench/sync_check.py allows it) and, on CUDA, rounded up to a multiple of
# the bucket with masked invalid crops, so cuDNN sees few distinct batch sizes. None: never compact.
COMPACTION_BUCKET = {"cpu": 1, "cuda": 8}


def valid_crop_count(valid: torch.Tensor) -> int:
    """How many descriptors are valid (a host read: the deliberate sync of the compaction)."""
    return int(valid.sum())


def _compaction(valid: torch.Tensor, bucket: Optional[int]):
    """(rows, mask) of the crops that go through VGG: the valid ones first (in order), then invalid ones up
    to a multiple of ``bucket`` (mask 0); None when nothing is dropped or compaction is off."""
    if bucket is None:
        return None
    M, n = valid.numel(), valid_crop_count(valid)
    m = min(M, -(-n // bucket) * bucket)
    if m == M:
        return None
    rows = torch.argsort((~valid).to(torch.uint8), stable=True)[:m]  # valid first, each group in order
    return rows, valid[rows].to(torch.float32)


def local_perceptual_loss_batched(fake: torch.Tensor, real: torch.Tensor, centers: torch.Tensor, valid: torch.Tensor,
                                  vgg, criterion: str, impl: str = "auto",
                                  layer_weights: Optional[Sequence[float]] = None,
                                  local_min_crop: int = 32) -> torch.Tensor:
    """Local perceptual loss, batched. Arguments and result as ``local_perceptual_loss``:
    ``fake``, ``real`` (B, 3, R, R) in [-1, 1]; ``centers`` (B, N, 2), ``valid`` (B, N) at R;
    ``vgg(x, input_normalized=True) -> list`` of (B*N, C_l, h_l, w_l) features. Returns a float32 scalar,
    differentiable with respect to ``fake`` (``real`` gets no gradient).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    fused = use_fast("local_perceptual_loss", fake, impl, backend="extension",
                     fallback_to="a torch criterion on the batched VGG features (no fused distance)")
    centers, valid, size, out_size = prepare_crops(fake, real, centers, valid, local_min_crop)
    B, N = valid.shape
    M = B * N
    dtype = crop_dtype(fake.device, fake.dtype)

    channels_last = is_channels_last(fake)
    crops_fake = upsample_crops(_gather(fake, centers, size, impl, dtype, channels_last), out_size)
    with torch.no_grad():  # no gradient to real: no scatter-add, no image-gradient buffer for its crops
        crops_real = upsample_crops(_gather(real, centers, size, impl, dtype, channels_last), out_size)

    mask = valid.reshape(M).to(device=fake.device, dtype=torch.float32)
    kept = _compaction(valid.reshape(M), COMPACTION_BUCKET.get(fake.device.type))
    if kept is not None:  # crops of missing descriptors skip VGG
        rows, mask = kept
        if rows.numel() == 0:
            return (fake.sum() * 0.0).float()
        crops_fake, crops_real = _rows(crops_fake, rows), _rows(crops_real, rows)
        M = rows.numel()

    if torch.is_grad_enabled() and fake.requires_grad:
        feats_fake = vgg(crops_fake, input_normalized=True)
        with torch.no_grad():
            feats_real = vgg(crops_real, input_normalized=True)
    else:
        feats = vgg(torch.cat([crops_fake, crops_real]), input_normalized=True)
        feats_fake = [f[:M] for f in feats]
        feats_real = [f[M:] for f in feats]

    weights = list(layer_weights) if layer_weights is not None else [1.0] * len(feats_fake)
    if len(weights) != len(feats_fake):
        raise ValueError(f"{len(weights)} layer weights for {len(feats_fake)} VGG layers")
    total = None
    for w, a, b in zip(weights, feats_fake, feats_real):
        d = w * perceptual_distance(a, b, criterion, mask, impl="fast" if fused else "reference")  # 0 where invalid
        total = d if total is None else total + d
    return (total.sum() / B).float()  # = mean over the batch of each image's sum over descriptors
