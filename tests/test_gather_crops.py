"""Triton multi-crop gather (forward) and scatter-add (backward) against the slice-and-pad reference.

On a machine without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1);
``cuda`` cases run the compiled kernels where a GPU is present. Shapes stay small for the interpreter.
"""
from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_DEVICES
from hptransfer.ops import FastPathUnavailable, gather_crops, gather_crops_reference

# (dtype, atol, grad atol): the forward copies values; with normalisation the fp32 arithmetic runs in
# another order (x * scale + shift), which can land one ulp of the output dtype away for normalised
# values up to |2.7| (bf16: 2^-6, fp16: 2^-9). The backward sums overlapping crops in fp32 with
# atomics, in another order than autograd (a few fp32 ulp), then casts to the input dtype.
DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 2 ** -6, 6e-2), (torch.float16, 2 ** -9, 1e-2)]


def _inputs(B, C, H, W, N, gen, device, dtype):
    images = (torch.rand(B, C, H, W, generator=gen) * 2 - 1).to(device=device, dtype=dtype)
    # centres spread past the borders so crops are partly or wholly outside
    centers = torch.rand(B, N, 2, generator=gen) * torch.tensor([H + 10.0, W + 10.0]) - 5
    centers[0, 1] = -1                       # invalid
    centers[-1, 2, 0] = -1                   # half invalid counts as invalid
    centers[0, 3] = torch.tensor([H / 2, W / 2])
    centers[0, 4] = centers[0, 3]            # two identical crops: gradients add up
    centers[-1, 5] = torch.tensor([H + 40.0, W + 40.0])  # wholly outside
    centers[0, 6] = torch.tensor([2.5, 3.5])  # rounding half up
    return images, centers.to(device)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype,atol,gatol", DTYPES)
@pytest.mark.parametrize("B,C,H,W,N,size,normalize,channels_last", [
    (1, 3, 16, 16, 18, 4, False, False),
    (2, 3, 17, 13, 31, 5, True, True),       # odd sizes, normalisation, channels_last output
    (3, 4, 12, 20, 44, 6, False, True),
    (8, 3, 8, 8, 18, 2, True, False),
])
def test_fast_equals_reference(device, dtype, atol, gatol, B, C, H, W, N, size, normalize, channels_last, rng):
    images, centers = _inputs(B, C, H, W, N, rng, device, dtype)
    a = images.clone().requires_grad_()
    # The spec for low precision: fp32 arithmetic, one rounding to the output dtype.
    b = images.float().clone().requires_grad_()
    fast = gather_crops(a, centers, size, impl="fast", normalize=normalize, channels_last=channels_last)
    ref = gather_crops_reference(b, centers, size, normalize=normalize, out_dtype=dtype, channels_last=channels_last)
    assert fast.shape == (B * N, C, size, size) and fast.dtype == dtype
    assert fast.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    err = (fast.float() - ref.float()).abs()
    assert err.max() <= atol, f"forward: max error {err.max():.3g} at crop {int(err.flatten(1).amax(1).argmax())}"
    grad = torch.randn(fast.shape, generator=rng).to(device=device, dtype=dtype)
    fast.backward(grad)
    ref.backward(grad)
    gerr = (a.grad.float() - b.grad.float()).abs()
    assert gerr.max() <= gatol, f"backward: max error {gerr.max():.3g} at {tuple(int(i) for i in torch.nonzero(gerr == gerr.max())[0])}"
    assert (fast[1] == 0).all() and (fast[(B - 1) * N + 2] == 0).all(), "invalid descriptors give zero crops"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_overlaps_add_and_invalid_get_no_gradient(device):
    images = torch.zeros(1, 1, 8, 8, device=device, requires_grad=True)
    centers = torch.tensor([[[4.0, 4.0], [4.0, 4.0], [-1.0, -1.0]]], device=device)
    crops = gather_crops(images, centers, 2, impl="fast")
    crops.sum().backward()
    g = images.grad[0, 0].cpu()
    assert g[3:5, 3:5].eq(2).all(), "two identical crops: every pixel under them gets gradient 2"
    assert g.sum() == 8


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_channels_last_input(device, rng):
    images, centers = _inputs(2, 3, 12, 12, 18, rng, device, torch.float32)
    cl = images.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gather_crops(cl, centers, 4, impl="fast"), gather_crops_reference(images, centers, 4))


def test_fast_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(FastPathUnavailable, match="CUDA"):
        gather_crops(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 2), 4, impl="fast")


def test_missing_kernel_module_falls_back(monkeypatch):
    """A kernel that cannot be imported must not crash "auto"; "fast" must say why."""
    from hptransfer.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_triton", lambda op="": (False, "ImportError: simulated"))
    with pytest.raises(FastPathUnavailable, match="simulated"):
        gather_crops(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 2), 4, impl="fast")
    out = gather_crops(torch.ones(1, 3, 8, 8), torch.full((1, 2, 2), 4.0), 4, impl="auto")
    assert out.shape == (2, 3, 4, 4) and out.eq(1).all()
