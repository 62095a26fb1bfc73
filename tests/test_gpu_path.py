"""The GPU path made correct by construction, checked on the CPU where at all possible:
launches under the tensors' device, inputs on other devices moved or refused clearly, deterministic
mode that refuses atomic fast paths and upsamples crops deterministically, no silent slow path when
hptransfer._C lacks its CUDA part, and precision taken from the caller. ``cuda`` cases are marked."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import descriptors, random_keypoints
from hptransfer import ops, pose
from hptransfer.ops import _dispatch
from hptransfer.ops._dispatch import FastPathUnavailable
from hptransfer.ops._local_loss_fast import crop_dtype
from test_local_perceptual_loss import CountingFeatures, SmallFeatures, _case


@contextlib.contextmanager
def deterministic_mode():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


# ----------------------------------------------------------------------------- 1. device guards
def _record_guards(monkeypatch, module):
    seen = []

    def guard(device):
        seen.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(module, "device_guard", guard)
    return seen


def test_gather_launches_under_the_tensors_device(monkeypatch):
    """Forward and backward launches each enter the guard of the images' device."""
    from hptransfer.kernels import gather_crops as kernel_module

    seen = _record_guards(monkeypatch, kernel_module)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    centers = torch.tensor([[[5.0, 6.0], [20.0, 30.0]], [[-1.0, -1.0], [16.0, 16.0]]])
    ops.gather_crops(images, centers, 8, impl="fast", normalize=True).sum().backward()
    assert seen == [images.device, images.device]


def test_heatmaps_launch_under_the_keypoints_device(monkeypatch):
    from hptransfer.kernels import heatmaps as kernel_module

    seen = _record_guards(monkeypatch, kernel_module)
    kp = random_keypoints(2, 64, torch.Generator().manual_seed(0), missing=1)
    ops.heatmaps_multi(kp, (64, 64), [(32, 32), (64, 64)], impl="fast")
    assert seen == [kp.device]


def test_device_guard_selects_the_cuda_index():
    from hptransfer.kernels._launch import device_guard

    guard = device_guard(torch.device("cuda", 1))  # constructing it needs no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_inputs_on_different_devices_are_refused_clearly():
    fake, real, kp = _case(1, 64, seed=0)
    with pytest.raises(ValueError, match="one device.*fake on cpu, real on meta"):
        ops.local_perceptual_loss(fake, real.to("meta"), *descriptors(kp, real.to("meta")), SmallFeatures(), "l1")


@pytest.mark.cuda
def test_second_gpu_while_first_is_current():
    """Tensors on cuda:1 while cuda:0 is current: every fast path gives the CPU reference's result."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    fake, real, kp = _case(2, 64, seed=1)
    centers, _ = pose.local_descriptors(kp, 64)
    want = ops.gather_crops(fake, centers, 8, impl="reference", normalize=True)
    got = ops.gather_crops(fake.to(dev), centers, 8, impl="fast", normalize=True)  # centres on the CPU: moved
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
    maps = ops.heatmaps(kp.to(dev), (64, 64), (32, 32), impl="fast")
    torch.testing.assert_close(maps.cpu(), ops.heatmaps(kp, (64, 64), (32, 32), impl="reference"), atol=1e-5, rtol=0)
    vgg = SmallFeatures()
    ref = ops.local_perceptual_loss(fake, real, *descriptors(kp, real), vgg, "l2", impl="reference")
    out = ops.local_perceptual_loss(fake.to(dev), real.to(dev), *descriptors(kp, real.to(dev)), vgg.to(dev), "l2", impl="fast")
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-6)
    assert torch.cuda.current_device() == 0


@pytest.mark.cuda
def test_generator_takes_cpu_keypoints_with_gpu_images(tiny_cfg):
    from hptransfer.models import Generator

    g = Generator(tiny_cfg, 64).cuda().eval()
    kp = random_keypoints(1, 64, torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(g(torch.zeros(1, 3, 64, 64, device="cuda"), kp),
                                   g(torch.zeros(1, 3, 64, 64, device="cuda"), kp.cuda()))


# ----------------------------------------------------------------------------- 2. deterministic mode
def test_deterministic_mode_refuses_the_atomic_gather_backward():
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    centers = torch.tensor([[[8.0, 8.0]]])
    with deterministic_mode():
        with pytest.raises(FastPathUnavailable, match="atomic"):
            ops.gather_crops(images, centers, 4, impl="fast")
        assert not _dispatch.use_fast("gather_crops", images, "auto", atomic_backward=True)
        # forward only (no gradient wanted): the kernel is deterministic and still runs
        with torch.no_grad():
            torch.testing.assert_close(ops.gather_crops(images, centers, 4, impl="fast"),
                                       ops.gather_crops(images, centers, 4, impl="reference"))
    assert _dispatch.use_fast("gather_crops", images, "fast", atomic_backward=True)  # interpreter, mode off


@pytest.mark.parametrize("src,dst", [(8, 32), (16, 32), (5, 12), (8, 16), (32, 32)])
def test_upsample_crops_equals_bilinear_interpolate(src, dst):
    x = torch.randn(6, 3, src, src, dtype=torch.float64, requires_grad=True)
    want = F.interpolate(x, size=(dst, dst), mode="bilinear", align_corners=False)
    got = ops.upsample_crops(x, dst)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    (gw,) = torch.autograd.grad(want, x, g)
    (gg,) = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(gg, gw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("src,dst", [(8, 32), (5, 12)])
def test_upsample_crops_keeps_channels_last(src, dst):
    """channels_last crops (the GPU layout) come out channels_last, equal to the NCHW result, gradient too."""
    x = torch.randn(6, 3, src, src, dtype=torch.float64)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x.requires_grad_()
    want, got = ops.upsample_crops(x, dst), ops.upsample_crops(xc, dst)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, xc, g)[0], torch.autograd.grad(want, x, g)[0],
                               rtol=1e-12, atol=1e-12)


def test_local_loss_never_uses_bilinear_interpolate(monkeypatch):
    """F.interpolate's bilinear backward raises on CUDA in deterministic mode: neither path may call it."""
    real_interpolate = F.interpolate

    def no_bilinear(*args, **kwargs):
        if kwargs.get("mode") == "bilinear":
            raise AssertionError("bilinear F.interpolate on the local-loss path")
        return real_interpolate(*args, **kwargs)

    monkeypatch.setattr(F, "interpolate", no_bilinear)
    fake, real, kp = _case(1, 64, seed=3)
    for impl in ("reference", "fast"):
        x = fake.clone().requires_grad_()
        with deterministic_mode():
            ops.local_perceptual_loss(x, real, *descriptors(kp, real), SmallFeatures(), "l2", impl=impl, local_min_crop=16).backward()
        assert x.grad.abs().sum() > 0


def test_deterministic_plan_reports_reference_gather():
    with deterministic_mode():
        plan = ops.fast_path_plan("cuda")
    assert "deterministic" in plan["gather_crops"] and plan["deterministic"]


# ----------------------------------------------------------------------------- 4. no silent slow path
class _ExtensionWithoutCuda:
    @staticmethod
    def with_cuda():
        return False


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.delenv("HPTRANSFER_STRICT", raising=False)


def test_missing_extension_still_batches_vgg(monkeypatch, fresh_warnings):
    """Without the fused distance the VGG pass stays batched (2 calls, not 2 x N) and the result
    matches the reference; one warning says what was lost."""
    monkeypatch.setattr(_dispatch, "_load_extension", lambda: (None, "ImportError: simulated"))
    fake, real, kp = _case(2, 64, seed=4, missing=2)
    vgg = CountingFeatures()
    want = ops.local_perceptual_loss(fake, real, *descriptors(kp, real), vgg, "l2", impl="reference")
    vgg.calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = fake.clone().requires_grad_()
        got = ops.local_perceptual_loss(x, real, *descriptors(kp, real), vgg, "l2", impl="auto")
        got.backward()
    assert len(vgg.calls) == 2, vgg.calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    messages = [str(w.message) for w in caught if "local_perceptual_loss" in str(w.message)]
    assert len(messages) == 1 and "no fused distance" in messages[0]
    assert "local_perceptual_loss" in ops.backend_status()["fallbacks_taken"]


def test_plan_names_an_extension_built_without_cuda(monkeypatch):
    monkeypatch.setattr(_dispatch, "_load_extension", lambda: (_ExtensionWithoutCuda(), None))
    plan = ops.fast_path_plan("cuda")
    assert "batched VGG" in plan["local_perceptual_loss"]
    assert "FALLBACK (hptransfer._C was built without CUDA)" in plan["local_perceptual_loss"]
    cpu = ops.fast_path_plan("cpu")
    assert "fused perceptual_distance" in cpu["local_perceptual_loss"] and "FALLBACK" not in json.dumps(cpu)


def test_backend_status_has_versions_and_plan():
    status = ops.backend_status("cpu")
    assert status["versions"]["torch"] == torch.__version__
    assert {"python", "cuda", "triton", "deepspeed", "dali"} <= set(status["versions"])
    assert status["plan"]["device"] == "cpu" and "heatmaps" in status["plan"]
    text = ops.format_backend_status(status)
    assert "version torch" in text and "local_perceptual_loss on cpu" in text


def test_doctor_command():
    run = subprocess.run([sys.executable, "-m", "hptransfer", "doctor", "--json", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    assert status["versions"]["torch"] == torch.__version__ and status["plan"]["device"] == "cpu"
    text = subprocess.run([sys.executable, "-m", "hptransfer", "doctor", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "gather_crops on cpu" in text.stdout


def test_doctor_strict_fails_on_a_fallback(monkeypatch, capsys):
    from hptransfer import doctor

    monkeypatch.setattr(_dispatch, "_load_extension", lambda: (_ExtensionWithoutCuda(), None))
    args = type("Args", (), {"device": "cuda", "json": False, "strict": True})()
    assert doctor.run(args) == 1
    assert "local_perceptual_loss" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 5. precision
class DtypeSpy(SmallFeatures):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def forward(self, x, input_normalized=False):
        self.dtypes.append(x.dtype)
        return super().forward(x, input_normalized)


def test_crop_dtype_is_the_callers():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert crop_dtype(cpu, torch.float32) == torch.float32
    assert crop_dtype(cuda, torch.float32) == torch.float32  # fp32 means fp32 on the GPU too
    assert crop_dtype(cuda, torch.float16) == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert crop_dtype(cpu, torch.float32) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        assert crop_dtype(cpu, torch.float32) == torch.float16


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16, torch.float16])
def test_local_loss_crops_in_the_callers_precision(autocast_dtype):
    fake, real, kp = _case(1, 64, seed=5)
    vgg = DtypeSpy()
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        loss = ops.local_perceptual_loss(fake.clone().requires_grad_(), real, *descriptors(kp, real), vgg, "l1", impl="fast", local_min_crop=16)
    assert vgg.dtypes == [autocast_dtype or torch.float32] * 2
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.cuda
def test_cuda_fp32_local_loss_is_fp32():
    """Without autocast the GPU path is fp32 (it forced bf16 before): it matches the reference closely."""
    vgg = DtypeSpy()
    fake, real, kp = _case(2, 64, seed=6)
    ref = ops.local_perceptual_loss(fake, real, *descriptors(kp, real), vgg, "l2", impl="reference")
    vgg.dtypes.clear()
    vc = vgg.cuda()
    got = ops.local_perceptual_loss(fake.cuda(), real.cuda(), *descriptors(kp.cuda(), real.cuda()), vc, "l2", impl="fast")
    assert set(vc.dtypes) == {torch.float32}
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-6)
