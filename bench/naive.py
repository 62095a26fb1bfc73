"""The research-code baseline of a training step, for bench_train.py: fp32, eager, no channels_last,
pose heatmaps made per sample on the CPU and then copied to the device, the local
perceptual loss as one VGG call per descriptor crop in a Python loop
(``hptransfer.ops.local_perceptual_loss_reference``), local discriminator crops by the reference
gather (python loop of slices), no fused ops. Same losses, same order as ``hptransfer.step.train_step``.
"""
from __future__ import annotations

import types

import torch

from hptransfer import losses
from hptransfer.ops import local_perceptual_loss_reference
from hptransfer.profiling import phase


def _pose_maps_per_sample(self, kp: torch.Tensor, dtype: torch.dtype) -> dict:
    """Generator.pose_maps the research-code way: made for one sample at a time on the CPU, as a data
    loader does, then copied to the device.

    Kept naive on purpose: where and how often the maps are made (per sample, on the host, plus the
    copy) is the cost the baseline stands for. The maps themselves (which sides, which sigmas, the
    Gaussian) come from the generator's own ``pose_maps``, in its dense torch reference
    (``make_naive`` sets ``impl="reference"``), not from a copy of them here."""
    kp_cpu = kp.detach().cpu()
    per = [type(self).pose_maps(self, kp_cpu[i:i + 1], torch.float32) for i in range(kp_cpu.shape[0])]
    return {side: torch.cat([maps[side] for maps in per]).to(kp.device, dtype) for side in per[0]}


def make_naive(generator) -> None:
    """Switch a generator to the naive heatmaps (instance attribute, the class is untouched)."""
    generator.pose_maps = types.MethodType(_pose_maps_per_sample, generator)
    generator.impl = "reference"


def naive_step(generator, g_opt, vgg, cfg, reference, target, kp_ref, kp_tgt, criterion: str,
               discriminator=None, d_opt=None) -> dict:
    """One fp32 eager iteration: (D step), G forward, global + local (loop) + adv losses, backward, Adam."""
    R = reference.shape[-1]
    geometry = losses.step_geometry(cfg.loss, kp_ref, kp_tgt, R, device=reference.device)
    with phase("generator_forward"):
        fake = generator(reference, kp_tgt)
    if discriminator is not None:
        with phase("discriminator"):
            real_pairs = losses.local_discriminator_pairs(reference, target, geometry, "reference")
            fake_pairs = losses.local_discriminator_pairs(reference, fake.detach(), geometry, "reference")
            d_loss = losses.discriminator_loss(discriminator, real_pairs, fake_pairs, geometry.pair_valid)
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
    weights = cfg.loss.layer_weights
    active = losses.active_terms(cfg.loss, R)
    with phase("global_vgg"):
        global_term = losses.global_perceptual_loss(fake, target, vgg, criterion, weights, impl="reference")
        total = cfg.loss.global_weight * global_term
    if active["local"]:
        with phase("local_vgg"):
            total = total + cfg.loss.local_weight * local_perceptual_loss_reference(
                fake, target, geometry.target_centers, geometry.target_valid, vgg, criterion, weights,
                cfg.loss.local_min_crop)
    if active["adv"] and discriminator is not None:
        with phase("discriminator"):
            pairs = losses.local_discriminator_pairs(reference, fake, geometry, "reference")
            adv = losses.generator_adversarial_loss(discriminator, pairs, geometry.pair_valid)
            total = total + cfg.loss.adv_weight * adv
    with phase("backward"):
        g_opt.zero_grad(set_to_none=True)
        total.backward()
    with phase("optimizer"):
        g_opt.step()
    return {"total": total.detach()}
