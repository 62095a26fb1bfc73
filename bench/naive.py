"""The research-code baseline of a training step, for bench_train.py: fp32, eager, no channels_last,
pose heatmaps made per sample on the CPU with numpy and then copied to the device, the local
perceptual loss as one VGG call per descriptor crop in a Python loop
(``hptransfer.ops.local_perceptual_loss_reference``), local discriminator crops by the reference
gather (python loop of slices), no fused ops. Same losses, same order as ``hptransfer.step.train_step``.
"""
from __future__ import annotations

import math
import types

import numpy as np
import torch

from hptransfer import losses, pose
from hptransfer.ops import local_perceptual_loss_reference
from hptransfer.profiling import phase


def _numpy_heatmaps(kp: np.ndarray, image_size: int, side: int, sigma: float) -> np.ndarray:
    """(18, 2) (y, x) pixels of an image_size image -> (18, side, side) float32; missing (-1) = zeros."""
    scale = side / image_size
    ys, xs = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32), indexing="ij")
    out = np.zeros((kp.shape[0], side, side), np.float32)
    for k, (y, x) in enumerate(kp):
        if y < 0 or x < 0:
            continue
        cy, cx = (y + 0.5) * scale - 0.5, (x + 0.5) * scale - 0.5
        out[k] = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma * sigma))
    return out


def _pose_maps_numpy(self, kp: torch.Tensor, dtype: torch.dtype) -> dict:
    """Generator.pose_maps the research-code way: per sample, on the CPU, copied to the device."""
    R, b = self.resolution, self.cfg.bottleneck_size
    sides = [b]
    if self.cfg.pose_at_every_scale:
        sides += [self.base * 2 ** i for i in range(int(math.log2(R // self.base)) + 1)]
    kp_np = kp.detach().cpu().numpy()
    maps = {}
    for s in sides:
        sigma = pose.default_sigma(s, self.cfg.pose_sigma, b)
        per = [torch.from_numpy(_numpy_heatmaps(kp_np[i], R, s, sigma)) for i in range(kp_np.shape[0])]
        maps[s] = torch.stack(per).to(kp.device, dtype)
    return maps


def make_naive(generator) -> None:
    """Switch a generator to the naive heatmaps (instance attribute, the class is untouched)."""
    generator.pose_maps = types.MethodType(_pose_maps_numpy, generator)
    generator.kernels = "reference"


def naive_step(generator, g_opt, vgg, cfg, reference, target, kp_ref, kp_tgt, criterion: str, disc=None,
               d_opt=None) -> dict:
    """One fp32 eager iteration: (D step), G forward, global + local (loop) + adv losses, backward, Adam."""
    R = reference.shape[-1]
    with phase("generator_forward"):
        fake = generator(reference, kp_tgt)
    if disc is not None:
        with phase("discriminator"):
            valid = losses.pair_validity(kp_ref, kp_tgt, R)
            real_pairs = losses.local_discriminator_pairs(reference, target, kp_ref, kp_tgt, R, "reference")
            fake_pairs = losses.local_discriminator_pairs(reference, fake.detach(), kp_ref, kp_tgt, R, "reference")
            d_loss = losses.discriminator_loss(disc, real_pairs, fake_pairs, valid)
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
                fake, target, kp_tgt, vgg, criterion, weights, cfg.loss.local_min_crop)
    if active["adv"] and disc is not None:
        with phase("discriminator"):
            pairs = losses.local_discriminator_pairs(reference, fake, kp_ref, kp_tgt, R, "reference")
            total = total + cfg.loss.adv_weight * losses.generator_adversarial_loss(
                disc, pairs, losses.pair_validity(kp_ref, kp_tgt, R))
    with phase("backward"):
        g_opt.zero_grad(set_to_none=True)
        total.backward()
    with phase("optimizer"):
        g_opt.step()
    return {"total": total.detach()}
