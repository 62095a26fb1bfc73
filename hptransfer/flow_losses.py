"""Losses of the appearance flow network (``task: garment_flow``). Ours: the paper (Fig. 9) names no
loss for its appearance flow network; these follow appearance-flow peers (ClothFlow, PF-AFN).

- ``l1``: mean |warped - target| over the target garment's pixels (images in [-1, 1]);
- ``perceptual``: VGG-16 features (the config's ``loss.layers``, L1) of the warped garment and of the
  target, both multiplied by the target garment mask (so only the garment is compared);
- ``mask``: 1 - soft IoU of the warped source mask and the target garment mask (overlap);
- ``tv``: total variation of every flow of the pyramid, in pixels of its own level (smooth flows
  keep prints and text legible);

``total`` = the weighted sum with the weights of the config's ``flow`` section.
"""
from __future__ import annotations

import torch

from hptransfer.ops import criterion_per_sample


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean absolute difference over the pixels (and channels) where ``mask`` is on; batch mean."""
    m = mask.to(pred.dtype)
    per = ((pred - target).abs() * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * pred.shape[1] + eps)
    return per.mean()


def soft_iou_loss(pred_mask: torch.Tensor, target_mask: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - sum(min) / sum(max) per image (soft IoU of masks in [0, 1]); batch mean."""
    p, t = pred_mask.float(), target_mask.float()
    inter = torch.minimum(p, t).sum(dim=(1, 2, 3))
    union = torch.maximum(p, t).sum(dim=(1, 2, 3))
    return (1 - (inter + eps) / (union + eps)).mean()


def flow_tv(flows: list[torch.Tensor]) -> torch.Tensor:
    """Mean absolute difference of neighbouring flow vectors, in pixels of each level, summed over levels."""
    total = flows[0].new_zeros(())
    for f in flows:
        h, w = f.shape[-2:]
        px = torch.stack((f[:, 0] * w / 2, f[:, 1] * h / 2), 1)  # normalised -> pixels
        total = total + (px[..., 1:, :] - px[..., :-1, :]).abs().mean() + (px[..., :, 1:] - px[..., :, :-1]).abs().mean()
    return total


def perceptual_in_mask(warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, vgg, layer_weights=None):
    """L1 between VGG features of the two images, each multiplied by ``mask`` first; batch mean."""
    m = mask.to(warped.dtype)
    feats_fake = vgg(warped * m)
    with torch.no_grad():
        feats_real = vgg(target * m)
    weights = list(layer_weights) if layer_weights is not None else [1.0] * len(feats_fake)
    return sum(w * criterion_per_sample(a, b, "l1") for w, a, b in zip(weights, feats_fake, feats_real)).mean()


def flow_loss(out: dict, batch: dict, vgg, flow_cfg, layer_weights=None) -> dict:
    """Terms (fp32 scalars) and ``total`` for one batch. ``out`` is :class:`AppearanceFlow`'s output,
    ``batch`` a :class:`~hptransfer.data.garment_pairs.GarmentFlowDataset` batch on the device."""
    mask = batch["target_mask"]
    terms = {"l1": masked_l1(out["warped"], batch["target"], mask),
             "mask": soft_iou_loss(out["warped_mask"], mask),
             "tv": flow_tv(out["flows"])}
    if flow_cfg.perceptual_weight > 0 and vgg is not None:
        terms["perceptual"] = perceptual_in_mask(out["warped"], batch["target"], mask, vgg, layer_weights)
    weights = {"l1": flow_cfg.l1_weight, "perceptual": flow_cfg.perceptual_weight, "mask": flow_cfg.mask_weight,
               "tv": flow_cfg.tv_weight}
    terms = {k: v.float() for k, v in terms.items()}
    terms["total"] = sum(weights[k] * v for k, v in terms.items())
    return terms
