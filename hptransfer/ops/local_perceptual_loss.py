"""Local perceptual loss (eq. 3): sum over descriptors d and VGG layers l of C(phi_l(X'_d), phi_l(X^_d)).

Conventions shared by the reference and the fast path:
- crops centred at given descriptor centres (B, N, 2) (y, x) with a validity mask (B, N): a step's
  ``pose.StepGeometry`` (``target_centers``, ``target_valid``) or ``pose.local_descriptors(kp, R)``;
  crop side resolution / 8 (``pose.crop_size``);
- crops are ImageNet-normalised as gathered, so pixels outside the image are 0 after normalisation;
- crops smaller than ``local_min_crop`` (``loss.local_min_crop``) are upsampled (bilinear,
  :func:`upsample_crops`) to that side before VGG;
- C is the mean over (channels, h, w) of the squared ("l2") or absolute ("l1") difference, per crop;
- per image, the sum over valid descriptors and layers (weighted by ``layer_weights``);
  the loss is the mean of that over the batch. Invalid descriptors contribute nothing.
``vgg(x, input_normalized=False)`` returns the list of feature maps of the chosen layers.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from hptransfer.ops._crops import prepare_crops, upsample_crops
from hptransfer.ops._dispatch import IMPLS
from hptransfer.ops._local_loss_fast import local_perceptual_loss_batched
from hptransfer.ops.gather_crops import gather_crops_reference
from hptransfer.ops.perceptual_distance import criterion_per_sample


def local_perceptual_loss_reference(fake: torch.Tensor, real: torch.Tensor, centers: torch.Tensor, valid: torch.Tensor,
                                    vgg, criterion: str, layer_weights: Optional[Sequence[float]] = None,
                                    local_min_crop: int = 32) -> torch.Tensor:
    """The research-code way, kept as the spec: one VGG call per descriptor in a Python loop."""
    centers, valid, size, out_size = prepare_crops(fake, real, centers, valid, local_min_crop)
    B, N = valid.shape
    total = fake.new_zeros(B, dtype=torch.float32)
    for d in range(N):
        # normalised in the gather: out-of-image pixels are 0 after normalisation (the ImageNet mean colour),
        # the convention of gather_crops(normalize=True) that the fast path fuses
        cf = gather_crops_reference(fake, centers[:, d:d + 1], size, normalize=True)
        cr = gather_crops_reference(real, centers[:, d:d + 1], size, normalize=True)
        cf, cr = upsample_crops(cf, out_size), upsample_crops(cr, out_size)
        feats_fake = vgg(cf, input_normalized=True)
        with torch.no_grad():
            feats_real = vgg(cr, input_normalized=True)
        weights = layer_weights or [1.0] * len(feats_fake)
        per = sum(w * criterion_per_sample(a, b, criterion) for w, a, b in zip(weights, feats_fake, feats_real))
        total = total + per * valid[:, d].to(per.dtype)
    return total.mean()


def local_perceptual_loss(fake: torch.Tensor, real: torch.Tensor, centers: torch.Tensor, valid: torch.Tensor, vgg,
                          criterion: str, impl: str = "auto", layer_weights: Optional[Sequence[float]] = None,
                          local_min_crop: int = 32) -> torch.Tensor:
    """Local perceptual loss of ``fake`` against ``real`` (B, 3, R, R) in [-1, 1] at the target's descriptor
    ``centers`` (B, N, 2) (y, x) pixels; descriptors with ``valid`` (B, N) False contribute nothing.
    Returns a scalar (fp32).

    impl "auto"/"fast": all 2*B*N crops gathered in one batch, VGG once per half (the real half without
    autograd), then per crop the fused distance of ``hptransfer._C``; where that cannot run, "auto"
    computes the same distance with torch on the batch (one warning; HPTRANSFER_STRICT=1 makes it an
    error) and "fast" raises. "reference": the per-descriptor loop. Precision is the caller's: the crops
    and VGG run in the autocast dtype when autocast is on, else in ``fake``'s dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return local_perceptual_loss_reference(fake, real, centers, valid, vgg, criterion, layer_weights,
                                               local_min_crop)
    return local_perceptual_loss_batched(fake, real, centers, valid, vgg, criterion, impl, layer_weights,
                                         local_min_crop)
