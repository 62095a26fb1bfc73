"""Local perceptual loss: the fast path (batched crops, fused criterion of hptransfer._C) against the
reference loop, its fallback when the extension is missing (still batched, torch criterion), and its
errors. CUDA cases are marked ``cuda``; more GPU-path cases in test_gpu_path.py."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from conftest import descriptors, random_keypoints
from hptransfer import ops, pose
from hptransfer.models import VGG16Features
from hptransfer.ops import _dispatch
from hptransfer.ops._dispatch import FastPathUnavailable
from hptransfer.constants import IMAGENET_MEAN, IMAGENET_STD


class SmallFeatures(nn.Module):
    """A width-reduced VGG-like stand-in with VGG16Features' call signature: 3 ReLU taps, 2 poolings."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(12, 16, 3, padding=1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def forward(self, x, input_normalized=False):
        if not input_normalized:
            x = ((x + 1) * 0.5 - self.mean) / self.std
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(nn.functional.max_pool2d(a, 2)))
        c = torch.relu(self.c3(nn.functional.max_pool2d(b, 2)))
        return [a, b, c]


def _case(B, R, seed, missing=2):
    g = torch.Generator().manual_seed(seed)
    fake = torch.rand(B, 3, R, R, generator=g) * 2 - 1
    real = torch.rand(B, 3, R, R, generator=g) * 2 - 1
    kp = random_keypoints(B, R, g, missing=missing)
    kp[0, 4] = torch.tensor([1.0, R - 2.0])  # a wrist at the corner: its crops leave the image
    return fake, real, kp


def _both(fake, real, kp, vgg, criterion, **kw):
    out = []
    for impl in ("reference", "fast"):
        x = fake.clone().requires_grad_()
        loss = ops.local_perceptual_loss(x, real, *descriptors(kp, real), vgg, criterion, impl=impl, **kw)
        loss.backward()
        out.append((loss.detach(), x.grad))
    return out


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_fast_equals_reference_64px_vgg16(criterion):
    """18 descriptors, 8 px crops upsampled to 32, the real VGG-16 architecture with random weights."""
    torch.manual_seed(0)  # the same random VGG whichever tests ran before
    vgg = VGG16Features("random")
    fake, real, kp = _case(1, 64, seed=0)
    (lr, gr), (lf, gf) = _both(fake, real, kp, vgg, criterion)
    assert lr > 0
    torch.testing.assert_close(lf, lr, rtol=1e-4, atol=1e-7)
    _grads_close(gf, gr, criterion)


def _grads_close(gf, gr, criterion):
    if criterion == "l2":
        torch.testing.assert_close(gf, gr, rtol=1e-3, atol=1e-5 * float(gr.abs().max()))
    else:
        # L1's sign(f - r) flips where a feature difference is ~1e-7 and the batched convolutions round
        # differently from the per-descriptor ones: compare the whole gradient, not every element
        rel = float((gf - gr).norm() / gr.norm())
        assert rel < 1e-2, f"L1 gradients differ: relative norm {rel:.2e}"


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_fast_equals_reference_256px(criterion):
    """31 descriptors of 32 px, batch 2, with layer weights and missing keypoints (width-reduced stand-in)."""
    vgg = SmallFeatures()
    fake, real, kp = _case(2, 256, seed=1, missing=3)
    (lr, gr), (lf, gf) = _both(fake, real, kp, vgg, criterion, layer_weights=[0.5, 1.0, 2.0])
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-7)
    _grads_close(gf, gr, criterion)
    assert gf.abs().sum() > 0


def test_fast_without_autograd_and_count():
    vgg = SmallFeatures(1)
    fake, real, kp = _case(2, 128, seed=2)
    with torch.no_grad():
        ref = ops.local_perceptual_loss(fake, real, *descriptors(kp, real, 18), vgg, "l2", impl="reference", local_min_crop=16)
        fast = ops.local_perceptual_loss(fake, real, *descriptors(kp, real, 18), vgg, "l2", impl="fast", local_min_crop=16)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-7)


def test_all_descriptors_missing_gives_zero():
    vgg = SmallFeatures()
    fake, real, _ = _case(1, 64, seed=3)
    kp = torch.full((1, 18, 2), -1.0)
    x = fake.clone().requires_grad_()
    loss = ops.local_perceptual_loss(x, real, *descriptors(kp, real), vgg, "l1", impl="fast")
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().sum() == 0


def test_fast_errors():
    vgg = SmallFeatures()
    fake, real, kp = _case(1, 64, seed=4)
    centers, valid = pose.local_descriptors(kp, 64)
    with pytest.raises(ValueError, match="criterion"):
        ops.local_perceptual_loss(fake, real, centers, valid, vgg, "l3", impl="fast")
    with pytest.raises(ValueError, match="layer weights"):
        ops.local_perceptual_loss(fake, real, centers, valid, vgg, "l1", impl="fast", layer_weights=[1.0])
    with pytest.raises(ValueError, match="same shape"):
        ops.local_perceptual_loss(fake, real[..., :32, :32], centers, valid, vgg, "l1", impl="fast")
    with pytest.raises(ValueError, match="centers must be"):
        ops.local_perceptual_loss(fake, real, centers, valid[:, :5], vgg, "l1", impl="fast")


@pytest.fixture
def broken_extension(monkeypatch):
    """Simulate an extension that failed to build/load, with a fresh warn-once memory."""
    monkeypatch.setattr(_dispatch, "_load_extension", lambda: (None, "ImportError: simulated build failure"))
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.delenv("HPTRANSFER_STRICT", raising=False)


def test_auto_falls_back_with_one_warning(broken_extension):
    vgg = SmallFeatures()
    fake, real, kp = _case(1, 64, seed=5)
    want = ops.local_perceptual_loss(fake, real, *descriptors(kp, real), vgg, "l2", impl="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [ops.local_perceptual_loss(fake, real, *descriptors(kp, real), vgg, "l2", impl="auto") for _ in range(3)]
    ours = [w for w in caught if "local_perceptual_loss" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "simulated build failure" in str(ours[0].message) and issubclass(ours[0].category, RuntimeWarning)
    # the fallback keeps the batched VGG pass and computes the criterion with torch: the reference's
    # value to fp32 rounding of the batched convolutions (as the fused path), identical across calls
    for g in got:
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)
        assert torch.equal(g, got[0])


def test_fast_raises_when_extension_missing(broken_extension):
    vgg = SmallFeatures()
    fake, real, kp = _case(1, 64, seed=6)
    with pytest.raises(FastPathUnavailable, match="impl='fast' cannot run here.*simulated build failure"):
        ops.local_perceptual_loss(fake, real, *descriptors(kp, real), vgg, "l2", impl="fast")


def test_strict_turns_fallback_into_error(broken_extension, monkeypatch):
    monkeypatch.setenv("HPTRANSFER_STRICT", "1")
    fake, real, kp = _case(1, 64, seed=7)
    with pytest.raises(FastPathUnavailable, match="HPTRANSFER_STRICT"):
        ops.local_perceptual_loss(fake, real, *descriptors(kp, real), SmallFeatures(), "l2", impl="auto")


@pytest.mark.cuda
@pytest.mark.parametrize("criterion", ["l1", "l2"])
@pytest.mark.parametrize("R,B", [(64, 2), (256, 2)])
def test_fast_cuda_matches_cpu_reference(R, B, criterion):
    """bf16 autocast + channels_last on the GPU against the fp32 CPU reference: bf16 precision (~1e-2 relative)."""
    vgg = VGG16Features("random")
    fake, real, kp = _case(B, R, seed=8)
    x = fake.clone().requires_grad_()
    ref = ops.local_perceptual_loss(x, real, *descriptors(kp, real), vgg, criterion, impl="reference")
    ref.backward()
    vc = vgg.cuda()
    xc = fake.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the caller chooses the precision
        got = ops.local_perceptual_loss(xc, real.cuda(), *descriptors(kp.cuda(), real.cuda()), vc, criterion, impl="fast")
    got.backward()
    torch.testing.assert_close(got.cpu(), ref.detach(), rtol=3e-2, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(xc.grad.cpu().flatten(), x.grad.flatten(), dim=0)
    assert cos > 0.98, f"gradient direction differs: cosine {cos:.4f}"


class CountingFeatures(SmallFeatures):
    def __init__(self):
        super().__init__()
        self.calls, self.channels_last = [], []

    def forward(self, x, input_normalized=False):
        self.calls.append((x.shape[0], torch.is_grad_enabled(), input_normalized))
        self.channels_last.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return super().forward(x, input_normalized)


def test_fast_batches_vgg_calls():
    """With autograd: one call on the B*N' fake crops, one without grad on the real crops (N' valid
    descriptors); without autograd: one call on both halves. The reference calls VGG 2*N times."""
    fake, real, kp = _case(2, 64, seed=9, missing=2)  # 16 valid descriptors per image
    vgg = CountingFeatures()
    ops.local_perceptual_loss(fake.clone().requires_grad_(), real, *descriptors(kp, real), vgg, "l2", impl="fast")
    assert vgg.calls == [(32, True, True), (32, False, True)]
    vgg.calls.clear()
    with torch.no_grad():
        ops.local_perceptual_loss(fake, real, *descriptors(kp, real), vgg, "l2", impl="fast")
    assert vgg.calls == [(64, False, True)]
    vgg.calls.clear()
    ops.local_perceptual_loss(fake.clone().requires_grad_(), real, *descriptors(kp, real), vgg, "l2", impl="reference")
    assert len(vgg.calls) == 2 * 18


@pytest.mark.parametrize("bucket", [1, 8])
def test_compaction_equals_the_masked_batch(monkeypatch, bucket):
    """Dropping the crops of missing descriptors before VGG (bucketed as on CUDA with 8) gives the loss and
    gradient of the full masked batch, and VGG sees fewer crops."""
    from hptransfer.ops import _local_loss_fast

    fake, real, kp = _case(2, 64, seed=11, missing=3)  # 15 of 18 descriptors valid per image
    out = {}
    for name, b in (("masked", None), ("compacted", bucket)):
        monkeypatch.setitem(_local_loss_fast.COMPACTION_BUCKET, "cpu", b)
        vgg = CountingFeatures()
        x = fake.clone().requires_grad_()
        loss = ops.local_perceptual_loss(x, real, *descriptors(kp, real), vgg, "l2", impl="fast")
        loss.backward()
        out[name] = (loss.detach(), x.grad, vgg.calls[0][0])
    torch.testing.assert_close(out["compacted"][0], out["masked"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["compacted"][1], out["masked"][1], rtol=1e-5, atol=1e-7)
    assert out["masked"][2] == 36 and out["compacted"][2] == {1: 30, 8: 32}[bucket]


def test_real_crops_are_gathered_without_autograd(monkeypatch):
    """The fake and the real crops are gathered in two calls, the real one under no_grad: the backward's
    scatter-add (atomics on CUDA) and its fp32 image-gradient buffer then cover the fake images only."""
    from hptransfer.ops import _local_loss_fast

    calls = []
    gather = _local_loss_fast._gather

    def spy(images, *args):
        calls.append((images.shape[0], torch.is_grad_enabled()))
        return gather(images, *args)

    monkeypatch.setattr(_local_loss_fast, "_gather", spy)
    fake, real, kp = _case(2, 64, seed=12)
    x = fake.clone().requires_grad_()
    ops.local_perceptual_loss(x, real, *descriptors(kp, real), SmallFeatures(), "l2", impl="fast").backward()
    assert calls == [(2, True), (2, False)]
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_channels_last_images_give_channels_last_crops(device):
    """channels_last images (the trainer's layout on GPU, VGG's too) reach VGG as channels_last crops, gathered,
    upsampled and compacted, with the loss and gradient of the NCHW call."""
    fake, real, kp = (t.to(device) for t in _case(2, 64, seed=13, missing=3))
    out = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        vgg = CountingFeatures().to(device)
        x = fake.clone(memory_format=fmt).requires_grad_()
        loss = ops.local_perceptual_loss(x, real.contiguous(memory_format=fmt), *descriptors(kp, real), vgg, "l2",
                                         impl="fast")
        loss.backward()
        out[fmt] = (loss.detach(), x.grad, vgg.channels_last)
    (loss_cl, grad_cl, seen_cl), (loss, grad, seen) = out[torch.channels_last], out[torch.contiguous_format]
    assert seen_cl == [True, True] and seen == [False, False]
    # CUDA: cuDNN's TF32 convolutions round differently in the two layouts
    rtol = 1e-5 if device == "cpu" else 2e-3
    torch.testing.assert_close(loss_cl, loss, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(grad_cl, grad, rtol=rtol, atol=rtol * float(grad.abs().max()))
