"""Fused Triton heatmaps against the dense torch reference (``hptransfer.ops.heatmaps_reference``).

On a machine without a GPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1);
``cuda`` cases run the compiled kernel where a GPU is present.
"""
from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_DEVICES
from hptransfer.ops import FastPathUnavailable
from hptransfer.ops import heatmaps, heatmaps_multi, heatmaps_reference

# (dtype, atol): fp32 differs only by exp() rounding; bf16/fp16 by one unit in the last place
# of values <= 1 (2^-8 for bf16, 2^-11 for fp16), since both round slightly different fp32 values.
DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -8 + 1e-6), (torch.float16, 2 ** -11 + 1e-6)]


def _keypoints(B, image, gen, device):
    kp = torch.rand(B, 18, 2, generator=gen) * torch.tensor([image[0] + 4.0, image[1] + 4.0]) - 2
    kp[0, 3] = -1                      # missing
    kp[-1, 7, 1] = -1                  # half missing counts as missing
    kp[-1, 8] = torch.tensor([0.0, 0.0])  # corner
    return kp.to(device)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("B,image,sizes", [
    (1, (64, 64), [(32, 32)]),
    (3, (40, 28), [(8, 8), (13, 17), (40, 28)]),  # odd sizes, non-square image, several sizes in one launch
    (8, (256, 176), [(32, 32), (64, 64)]),
])
def test_fast_equals_reference(device, dtype, atol, B, image, sizes, rng):
    kp = _keypoints(B, image, rng, device)
    fast = heatmaps_multi(kp, image, sizes, None, impl="fast", dtype=dtype)
    for (h, w), got in zip(sizes, fast):
        want = heatmaps_reference(kp, image, (h, w), dtype=dtype)
        assert got.shape == (B, 18, h, w) and got.dtype == dtype and got.device == kp.device
        err = (got.float() - want.float()).abs()
        assert err.max() <= atol, f"size {(h, w)}: max error {err.max():.3g} at {divmod(int(err.argmax()), h * w)}"
        assert (got[0, 3] == 0).all() and (got[-1, 7] == 0).all(), "missing keypoints must give zero maps"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_sigma_is_honoured(device):
    kp = torch.tensor([[[10.0, 12.0]] * 18]).to(device)
    for sigma in (1.0, 2.5):
        m = heatmaps(kp, (32, 32), (32, 32), sigma=sigma, impl="fast")[0, 0].float().cpu()
        assert m[10, 12] == pytest.approx(1.0, abs=1e-6)
        assert m[10, 12 + 2] == pytest.approx(float(torch.exp(torch.tensor(-4.0 / (2 * sigma ** 2)))), abs=1e-6)


def test_fast_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(FastPathUnavailable, match="CUDA"):
        heatmaps(torch.zeros(1, 18, 2), (64, 64), (32, 32), impl="fast")


def test_auto_on_cpu_is_the_reference(monkeypatch):
    import hptransfer.kernels.heatmaps as k

    def boom(*a, **kw):
        raise AssertionError("auto must not run the kernel on a CPU tensor")

    monkeypatch.setattr(k, "heatmaps_triton_flat", boom)
    kp = torch.rand(2, 18, 2) * 63
    torch.testing.assert_close(heatmaps(kp, (64, 64), (32, 32)), heatmaps_reference(kp, (64, 64), (32, 32)))
