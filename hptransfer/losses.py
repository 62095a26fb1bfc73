"""The paper's losses (eq. 2-4): global and local perceptual loss, local discriminators.

- Criterion C: L2 in the first half of each stage's iterations, L1 in the second
  (:func:`criterion_for_step`). Per layer, C is the mean over (C, H, W) of the squared or absolute
  feature difference; layers are summed with ``loss.layer_weights`` (equal when unset). The global
  and the local loss share this criterion (``ops.perceptual_distance``), so a
  crop covering the whole image gives the same number both ways.
- Global perceptual loss (eq. 2): C over the whole image, mean over the batch.
- Local perceptual loss (eq. 3): ``hptransfer.ops.local_perceptual_loss`` at the target's
  descriptors (sum over valid descriptors per image, mean over the batch).
- Local discriminators (section 3.2, Fig. 6): pairs stacked on channels, ``(X_d, X'_d)`` real and
  ``(X_d, X^_d)`` fake, following the text (the Fig. 6 caption's fake pair ``(X'_d, X^_d)`` would
  let a discriminator win by comparing two crops of the target pose, without the reference). ``X_d``
  is the reference cropped at the reference's own descriptor d (the same body part as in the
  target); ``step_geometry(..., reference_at="target")`` crops it at the target's location instead. Losses are the
  non-saturating GAN losses with logits (softplus form of BCE), averaged over valid descriptors:
  a descriptor is valid when it is valid in both the reference and the target pose.

Which terms run at a stage (:func:`active_terms`): the local perceptual loss at every stage below
``loss.disc_at_resolution`` (1024); from there on the local discriminators replace it, as the paper's
"in replacement" says (``loss.local_perceptual_at_top`` keeps both). ``loss.descriptors`` chooses
how many descriptors the local terms use (Fig. 4; "auto" = 18/31/44 by resolution).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from hptransfer import ops, pose
from hptransfer.config import LossConfig
from hptransfer.profiling import phase


def criterion_for_step(step: int, iterations: int) -> str:
    """"l2" while the 0-based ``step`` is in the first half of the stage's ``iterations``, else "l1"."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    return "l2" if 2 * step < iterations else "l1"


def global_perceptual_loss(fake: torch.Tensor, real: torch.Tensor, vgg, criterion: str,
                           layer_weights: Optional[Sequence[float]] = None, impl: str = "auto") -> torch.Tensor:
    """Eq. 2 on whole images: ``fake``, ``real`` (B, 3, H, W) in [-1, 1] -> fp32 scalar.

    sum_l w_l * mean over (C, H, W) of C(phi_l(fake), phi_l(real)), averaged over the batch;
    ``real`` goes through VGG without autograd. C per layer is ``ops.perceptual_distance`` (the fused
    op of ``hptransfer._C`` under ``impl`` "auto"/"fast": no fp32 copies of full-resolution features).
    """
    if fake.shape != real.shape:
        raise ValueError(f"fake and real must have the same shape, got {tuple(fake.shape)} and {tuple(real.shape)}")
    feats_fake = vgg(fake)
    with torch.no_grad():
        feats_real = vgg(real)
    weights = list(layer_weights) if layer_weights is not None else [1.0] * len(feats_fake)
    if len(weights) != len(feats_fake):
        raise ValueError(f"{len(weights)} layer weights for {len(feats_fake)} VGG layers")
    per = sum(w * ops.perceptual_distance(a, b, criterion, impl=impl) for w, a, b in zip(weights, feats_fake, feats_real))
    return per.mean()


def descriptors_at(loss_cfg: LossConfig, resolution: int) -> int:
    """Local descriptors per image at ``resolution`` under ``loss.descriptors`` (0 = no local terms)."""
    return pose.descriptor_count(resolution, loss_cfg.descriptors)


def step_geometry(loss_cfg: LossConfig, kp_reference: torch.Tensor, kp_target: torch.Tensor, resolution: int,
                  device: Optional[torch.device] = None, reference_at: str = "reference") -> pose.StepGeometry:
    """The step's descriptor geometry (``pose.StepGeometry``) with ``loss.descriptors`` at ``resolution``:
    built once per step, then passed to every local term."""
    return pose.StepGeometry.from_keypoints(kp_reference, kp_target, resolution, descriptors_at(loss_cfg, resolution),
                                            reference_at, device)


def local_discriminator_pairs(reference: torch.Tensor, other: torch.Tensor, geometry: pose.StepGeometry,
                              impl: str = "auto") -> torch.Tensor:
    """Crop pairs for the local discriminators: (B, N, 6, s, s), s = ``geometry.crop``.

    ``reference`` (B, 3, R, R) is cropped at ``geometry.reference_centers``; ``other`` (the target X' for
    real pairs, the generated X^ for fake ones) at ``geometry.target_centers``. Channels 0-2 hold X_d,
    3-5 the other crop. Invalid descriptors give zero crops (``geometry.pair_valid`` masks them).
    Differentiable with respect to both images.
    """
    R = geometry.resolution
    if reference.shape != other.shape or reference.dim() != 4 or reference.shape[-1] != R:
        raise ValueError(f"reference and other must both be (B, 3, {R}, {R}), "
                         f"got {tuple(reference.shape)} and {tuple(other.shape)}")
    B, N, s = reference.shape[0], geometry.count, geometry.crop
    crops_r = ops.gather_crops(reference, geometry.reference_centers, s, impl=impl)
    crops_o = ops.gather_crops(other, geometry.target_centers, s, impl=impl)
    return torch.cat([crops_r, crops_o], dim=1).reshape(B, N, 6, s, s)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of (B, N) ``values`` over valid entries; 0 (still in the graph) when none is valid."""
    w = valid.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)


def discriminator_loss(discriminator, pairs_real: torch.Tensor, pairs_fake: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss, fp32 scalar: mean over valid descriptors of
    softplus(-D(real)) + softplus(D(fake)). ``pairs_*`` (B, N, 6, s, s); ``valid`` (B, N) bool.
    ``pairs_fake`` is detached here (the generator gets no gradient from this loss). One discriminator
    call on real and fake concatenated (it has no batch statistics, so this equals two calls).
    """
    logits_real, logits_fake = discriminator(torch.cat([pairs_real, pairs_fake.detach()])).float().chunk(2)
    if valid.shape != logits_real.shape:
        raise ValueError(f"valid must be {tuple(logits_real.shape)}, got {tuple(valid.shape)}")
    return _masked_mean(F.softplus(-logits_real) + F.softplus(logits_fake), valid)


def generator_adversarial_loss(discriminator, pairs_fake: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss, fp32 scalar: mean over valid descriptors of softplus(-D(fake)).

    The discriminator's parameters are taken as constants for this call (their ``requires_grad`` is
    switched off during the forward), so only the generator receives gradients: a generator
    backward never touches discriminator gradients (which a separate DeepSpeed engine owns).
    """
    params = [p for p in discriminator.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        logits = discriminator(pairs_fake).float()
    finally:
        for p in params:
            p.requires_grad_(True)
    if valid.shape != logits.shape:
        raise ValueError(f"valid must be {tuple(logits.shape)}, got {tuple(valid.shape)}")
    return _masked_mean(F.softplus(-logits), valid)


def active_terms(loss_cfg: LossConfig, resolution: int) -> dict:
    """Which generator terms run at ``resolution``: {"local": bool, "adv": bool}.

    From ``loss.disc_at_resolution`` on the local discriminators run (adv_weight > 0) and replace
    the local perceptual loss (the paper's "in replacement"), unless ``loss.local_perceptual_at_top``
    keeps it. Zero descriptors (``loss.descriptors: 0``) switch both local terms off.
    """
    top = resolution >= loss_cfg.disc_at_resolution
    has_local = descriptors_at(loss_cfg, resolution) > 0
    adv = has_local and top and loss_cfg.adv_weight > 0
    keep_local = not adv or loss_cfg.local_perceptual_at_top
    return {"local": has_local and loss_cfg.local_weight > 0 and keep_local, "adv": adv}


def generator_loss(fake: torch.Tensor, target: torch.Tensor, geometry: pose.StepGeometry, vgg, loss_cfg: LossConfig,
                   criterion: str, *, reference: Optional[torch.Tensor] = None, discriminator=None,
                   impl: str = "auto") -> dict:
    """All generator terms at the current stage as a dict of fp32 scalars.

    ``fake`` (generated X^), ``target`` (X') and ``reference`` (X): (B, 3, R, R) in [-1, 1];
    ``geometry``: the step's descriptors (:func:`step_geometry`). Returns {"global", "local",
    "adv", "total"}: the unweighted terms (0 when inactive, see :func:`active_terms`) and
    total = global_weight * global + local_weight * local + adv_weight * adv. The adversarial term
    needs ``discriminator`` (the module, or its engine) and ``reference``.
    """
    R = fake.shape[-1]
    if geometry.resolution != R:
        raise ValueError(f"geometry is for {geometry.resolution} px, the images are {R} px")
    weights = loss_cfg.layer_weights
    terms = active_terms(loss_cfg, R)
    zero = fake.new_zeros((), dtype=torch.float32)
    with phase("global_vgg"):  # profiling phases: NVTX ranges / timers, a flag check otherwise
        out = {"global": global_perceptual_loss(fake, target, vgg, criterion, weights, impl), "local": zero, "adv": zero}
    if terms["local"]:
        with phase("local_vgg"):
            out["local"] = ops.local_perceptual_loss(fake, target, geometry.target_centers, geometry.target_valid,
                                                     vgg, criterion, impl=impl, layer_weights=weights,
                                                     local_min_crop=loss_cfg.local_min_crop)
    if terms["adv"]:
        if discriminator is None or reference is None:
            raise ValueError(f"the adversarial term is active at {R} px (loss.disc_at_resolution="
                             f"{loss_cfg.disc_at_resolution}): pass discriminator and reference")
        with phase("discriminator"):
            pairs = local_discriminator_pairs(reference, fake, geometry, impl)
            out["adv"] = generator_adversarial_loss(discriminator, pairs, geometry.pair_valid)
    out["total"] = (loss_cfg.global_weight * out["global"] + loss_cfg.local_weight * out["local"]
                    + loss_cfg.adv_weight * out["adv"])
    return out
