"""Losses: criterion schedule, perceptual losses against hand-written formulas, discriminator pairs
and GAN losses, and gradient flow from every term to every generator parameter."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import random_keypoints
from hptransfer import losses, ops, pose
from hptransfer.config import LossConfig, ModelConfig
from hptransfer.models import Generator, LocalDiscriminator, VGG16Features

LAYERS = ["relu1_2", "relu2_2"]  # shallow random VGG keeps the gradient tests fast


class TwoLayerFeatures(nn.Module):
    """A stand-in feature extractor with known features: [x, 3 * x^2]."""

    def forward(self, x, input_normalized=False):
        return [x, 3 * x * x]


@pytest.fixture(scope="module")
def vgg():
    return VGG16Features("random", layers=LAYERS)


@pytest.mark.parametrize("iterations", [10, 11, 1, 700_000])
def test_criterion_switches_exactly_at_half(iterations):
    got = [losses.criterion_for_step(s, iterations) for s in range(min(iterations, 20))]
    half = (iterations + 1) // 2  # first L1 step: the first with step >= iterations / 2
    if iterations <= 20:
        assert got == ["l2"] * half + ["l1"] * (iterations - half)
    assert losses.criterion_for_step(349_999, 700_000) == "l2"
    assert losses.criterion_for_step(350_000, 700_000) == "l1"


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_global_perceptual_loss_formula(criterion, rng):
    a = torch.randn(3, 3, 8, 8, generator=rng)
    b = torch.randn(3, 3, 8, 8, generator=rng)
    f = TwoLayerFeatures()
    diff = (lambda d: d.abs()) if criterion == "l1" else (lambda d: d * d)
    expected = 0.5 * diff(a - b).mean() + 2.0 * diff(3 * a * a - 3 * b * b).mean()
    got = losses.global_perceptual_loss(a, b, f, criterion, layer_weights=[0.5, 2.0])
    torch.testing.assert_close(got, expected)
    equal = losses.global_perceptual_loss(a, b, f, criterion)
    torch.testing.assert_close(equal, diff(a - b).mean() + diff(3 * a * a - 3 * b * b).mean())
    with pytest.raises(ValueError, match="layer weights"):
        losses.global_perceptual_loss(a, b, f, criterion, layer_weights=[1.0])


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_global_loss_fused_distance_equals_reference(criterion, vgg, rng):
    """impl "fast" (hptransfer._C's fused distance, gradient made in the forward) == the torch criterion."""
    fake = torch.rand(2, 3, 32, 32, generator=rng) * 2 - 1
    real = torch.rand(2, 3, 32, 32, generator=rng) * 2 - 1
    out = {}
    for impl in ("reference", "fast"):
        x = fake.clone().requires_grad_()
        loss = losses.global_perceptual_loss(x, real, vgg, criterion, layer_weights=[1.0, 0.5], impl=impl)
        loss.backward()
        out[impl] = (loss.detach(), x.grad)
    torch.testing.assert_close(out["fast"][0], out["reference"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["fast"][1], out["reference"][1], rtol=1e-4, atol=1e-7)


def test_discriminator_loss_calls_the_discriminator_once(rng):
    """Real and fake pairs go through the discriminators in one call; the loss equals two calls."""
    calls = []
    discriminator = LocalDiscriminator(ModelConfig(width=1 / 32, disc_channels=4), 3, 8)

    def counted(pairs):
        calls.append(pairs.shape[0])
        return discriminator(pairs)

    real = torch.randn(2, 3, 6, 8, 8, generator=rng)
    fake = torch.randn(2, 3, 6, 8, 8, generator=rng)
    valid = torch.tensor([[True, False, True], [True, True, True]])
    got = losses.discriminator_loss(counted, real, fake, valid)
    assert calls == [4]
    lr, lf = discriminator(real).float(), discriminator(fake).float()
    want = ((F.softplus(-lr) + F.softplus(lf)) * valid).sum() / valid.sum()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_global_and_local_share_the_criterion(vgg, rng):
    """With one valid descriptor per image, the local loss equals the global loss of the crops."""
    R, B = 64, 2
    fake = torch.rand(B, 3, R, R, generator=rng) * 2 - 1
    real = torch.rand(B, 3, R, R, generator=rng) * 2 - 1
    kp = torch.full((B, 18, 2), -1.0)
    kp[:, 4] = torch.tensor([[20.0, 30.0], [40.0, 12.0]])
    centers, _ = pose.local_descriptors(kp, R)
    s = pose.crop_size(R)
    cf = ops.gather_crops_reference(fake, centers[:, 4:5], s)
    cr = ops.gather_crops_reference(real, centers[:, 4:5], s)
    for crit in ("l1", "l2"):
        local = ops.local_perceptual_loss(fake, real, *pose.local_descriptors(kp, R), vgg, crit, impl="reference",
                                          local_min_crop=s)
        torch.testing.assert_close(local, losses.global_perceptual_loss(cf, cr, vgg, crit), rtol=1e-5, atol=1e-7)


def test_discriminator_pairs_geometry(rng):
    R, B = 128, 2
    ref = torch.rand(B, 3, R, R, generator=rng) * 2 - 1
    other = torch.rand(B, 3, R, R, generator=rng) * 2 - 1
    kp_r = random_keypoints(B, R, rng)
    kp_t = random_keypoints(B, R, rng)
    kp_r[0, 3] = -1  # missing in the reference only
    kp_t[1, 7] = -1  # missing in the target only
    geometry = pose.StepGeometry.from_keypoints(kp_r, kp_t, R)
    pairs = losses.local_discriminator_pairs(ref, other, geometry, impl="reference")
    s, N = R // 8, 18

    def crop(img, cy, cx):
        """Independent crop: s x s window with top-left (cy - s//2, cx - s//2), zero outside."""
        out = torch.zeros(3, s, s)
        if cy < 0 or cx < 0:
            return out
        for i in range(s):
            for j in range(s):
                y, x = cy - s // 2 + i, cx - s // 2 + j
                if 0 <= y < R and 0 <= x < R:
                    out[:, i, j] = img[:, y, x]
        return out

    assert pairs.shape == (B, N, 6, s, s)
    for b in range(B):
        for d in (0, 3, 7, 12):
            ky, kx = (int(torch.floor(v + 0.5)) for v in kp_r[b, d])
            yt, xt = (int(torch.floor(v + 0.5)) for v in kp_t[b, d])

            ry, rx = (ky, kx) if kp_r[b, d, 0] >= 0 else (-1, -1)
            ty, tx = (yt, xt) if kp_t[b, d, 0] >= 0 else (-1, -1)
            torch.testing.assert_close(pairs[b, d, :3], crop(ref[b], ry, rx), msg=f"X_d b={b} d={d}")
            torch.testing.assert_close(pairs[b, d, 3:], crop(other[b], ty, tx), msg=f"other b={b} d={d}")
    valid = geometry.pair_valid
    assert valid.shape == (B, N)
    assert not valid[0, 3] and not valid[1, 7] and valid[0, 7] and valid[1, 3]
    # limb descriptors at 256 px: invalid when a limb end is missing in either pose
    v256 = pose.StepGeometry.from_keypoints(kp_r * 2, kp_t * 2, 256).pair_valid
    assert v256.shape == (B, 31) and not v256[0, 18 + 3] and not v256[1, 18 + 6]  # limbs (3,4) and (6,7)
    # option: the reference cropped at the target's location
    at_target = pose.StepGeometry.from_keypoints(kp_r, kp_t, R, reference_at="target")
    pt = losses.local_discriminator_pairs(ref, other, at_target, impl="reference")
    torch.testing.assert_close(pt[1, 5, :3], crop(ref[1], *(int(torch.floor(v + 0.5)) for v in kp_t[1, 5])))


class FixedLogits(nn.Module):
    """A 'discriminator' returning given logits plus a trainable offset (to see gradients)."""

    def __init__(self, real, fake):
        super().__init__()
        self.real, self.fake = real, fake
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self, pairs):
        # per sample: real pairs are marked by a zero channel below (real and fake may share one call)
        is_real = (pairs[:, :, 5] == 0).flatten(1).all(1)
        idx = torch.arange(pairs.shape[0]) % self.real.shape[0]
        base = torch.where(is_real[:, None], self.real[idx], self.fake[idx])
        return base + self.offset + 0 * pairs.sum(dim=(2, 3, 4))


def test_gan_losses_formula_and_mask(rng):
    B, N = 2, 5
    real_logits = torch.randn(B, N, generator=rng)
    fake_logits = torch.randn(B, N, generator=rng)
    valid = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    pairs_real = torch.rand(B, N, 6, 4, 4, generator=rng)
    pairs_real[:, :, 5] = 0
    pairs_fake = (torch.rand(B, N, 6, 4, 4, generator=rng) + 1).requires_grad_()
    discriminator = FixedLogits(real_logits, fake_logits)
    d_loss = losses.discriminator_loss(discriminator, pairs_real, pairs_fake, valid)
    bce = F.binary_cross_entropy_with_logits
    per = bce(real_logits, torch.ones(B, N), reduction="none") + bce(fake_logits, torch.zeros(B, N), reduction="none")
    torch.testing.assert_close(d_loss, per[valid].mean())
    d_loss.backward()
    assert pairs_fake.grad is None and discriminator.offset.grad is not None  # fakes detached
    # invalid descriptors do not count, whatever their logits
    discriminator2 = FixedLogits(real_logits.masked_fill(~valid, 1e4), fake_logits.masked_fill(~valid, -1e4))
    torch.testing.assert_close(losses.discriminator_loss(discriminator2, pairs_real, pairs_fake, valid), d_loss.detach())

    discriminator.offset.grad = None
    g_loss = losses.generator_adversarial_loss(discriminator, pairs_fake, valid)
    torch.testing.assert_close(g_loss, bce(fake_logits, torch.ones(B, N), reduction="none")[valid].mean())
    g_loss.backward()
    assert discriminator.offset.grad is None and discriminator.offset.requires_grad  # D constant, flag restored
    none_valid = torch.zeros(B, N, dtype=torch.bool)
    z = losses.generator_adversarial_loss(discriminator, pairs_fake, none_valid)
    assert float(z.detach()) == 0.0 and z.requires_grad


def _setup(tiny_cfg, rng, R=64):
    g = Generator(tiny_cfg, R)
    ref = torch.rand(2, 3, R, R, generator=rng) * 2 - 1
    tgt = torch.rand(2, 3, R, R, generator=rng) * 2 - 1
    kp_r = random_keypoints(2, R, rng, missing=1)
    kp_t = random_keypoints(2, R, rng)
    return g, ref, tgt, kp_r, kp_t


@pytest.mark.parametrize("term", ["global", "local", "adv"])
def test_gradients_reach_every_generator_parameter(term, tiny_cfg, vgg, rng):
    g, ref, tgt, kp_r, kp_t = _setup(tiny_cfg, rng)
    weights = {"global": (1.0, 0.0, 0.0), "local": (0.0, 1.0, 0.0), "adv": (0.0, 0.0, 1.0)}[term]
    cfg = LossConfig(layers=LAYERS, global_weight=weights[0], local_weight=weights[1], adv_weight=weights[2],
                     disc_at_resolution=64 if term == "adv" else 1024, local_min_crop=16)
    discriminator = LocalDiscriminator(tiny_cfg, 18, 8)
    fake = g(ref, kp_t)
    out = losses.generator_loss(fake, tgt, losses.step_geometry(cfg, kp_r, kp_t, 64), vgg, cfg, "l2",
                                reference=ref, discriminator=discriminator, impl="reference")
    assert float(out[term].detach()) > 0
    out[term].backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{term}: no gradient reaches {name}"
    assert all(p.grad is None for p in discriminator.parameters())


def test_generator_loss_weights_and_stage_terms(tiny_cfg, rng):
    g, ref, tgt, kp_r, kp_t = _setup(tiny_cfg, rng)
    f = TwoLayerFeatures()
    fake = g(ref, kp_t)
    discriminator = LocalDiscriminator(tiny_cfg, 18, 8)
    cfg = LossConfig(global_weight=2.0, local_weight=0.5, adv_weight=0.1, disc_at_resolution=64, local_min_crop=8,
                     local_perceptual_at_top=True)  # both local terms, to check the weighted sum
    geometry = losses.step_geometry(cfg, kp_r, kp_t, 64)
    out = losses.generator_loss(fake, tgt, geometry, f, cfg, "l1", reference=ref, discriminator=discriminator,
                                impl="reference")
    assert set(out) == {"global", "local", "adv", "total"}
    assert all(float(out[k].detach()) > 0 for k in ("global", "local", "adv"))
    torch.testing.assert_close(out["total"], 2.0 * out["global"] + 0.5 * out["local"] + 0.1 * out["adv"])
    torch.testing.assert_close(out["global"], losses.global_perceptual_loss(fake, tgt, f, "l1"))
    # below the discriminator stage: no adversarial term, no discriminator needed
    cfg_low = LossConfig(disc_at_resolution=128, local_min_crop=8)
    low = losses.generator_loss(fake, tgt, geometry, f, cfg_low, "l2", impl="reference")
    assert float(low["adv"]) == 0.0 and float(low["local"].detach()) > 0
    # at the discriminator stage "in replacement": local term off
    top = losses.active_terms(LossConfig(disc_at_resolution=64, local_perceptual_at_top=False), 64)
    assert top == {"local": False, "adv": True}
    with pytest.raises(ValueError, match="discriminator"):
        losses.generator_loss(fake, tgt, geometry, f, cfg, "l2", impl="reference")
