"""hptransfer._C ops against plain torch: perceptual_distance (forward, backward, gradcheck, masking,
bf16 accumulation, channels_last, threads, argument checks) and the CPU gather_crops op against
gather_crops_reference. CUDA cases are marked ``cuda``."""
from __future__ import annotations

import pytest
import torch

from hptransfer import ops
from hptransfer.ops.gather_crops import gather_crops_reference

# fp32: the kernel sums in a different order than torch's mean; 1e-5 relative covers K up to ~1e5.
# bf16 inputs: compared with an fp64 sum of the same bf16 values, so only fp32 accumulation error remains.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6)}
SHAPES = [(6, 4, 5, 5), (3, 7, 3, 1), (5, 16, 8, 8)]  # odd sizes hit the scalar tails; 16*8*8 the vector path


@pytest.fixture(scope="module", autouse=True)
def _ext():
    ext = ops.extension()
    assert ext is not None, f"hptransfer._C did not load: {ops.backend_status()['extension']}"
    return ext


def dist(f, r, mask, p):
    return torch.ops.hptransfer.perceptual_distance(f, r, mask, p)


def dist_ref(f, r, mask, p):
    d = (f.double() - r.double()).abs() ** p
    return d.flatten(1).mean(dim=1) * mask.double()


def _inputs(shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    r = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    mask = (torch.rand(shape[0], generator=g) > 0.3).float().to(device)
    mask[0] = 1.0
    return f, r, mask


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_distance_forward_and_masking(shape, p):
    f, r, mask = _inputs(shape)
    got = dist(f, r, mask, p)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    torch.testing.assert_close(got.double(), dist_ref(f, r, mask, p), rtol=1e-5, atol=1e-6)
    assert (got[mask == 0] == 0).all(), "masked crops must give exactly 0"
    assert (got[mask == 1] > 0).all()
    # bool mask reads as 0/1
    torch.testing.assert_close(dist(f, r, mask.bool(), p), got)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_distance_backward_matches_autograd(shape, p):
    f, r, mask = _inputs(shape, seed=1)
    g = torch.randn(shape[0], generator=torch.Generator().manual_seed(2))
    f1, r1 = f.clone().requires_grad_(), r.clone().requires_grad_()
    (dist(f1, r1, mask, p) * g).sum().backward()
    f2, r2 = f.clone().requires_grad_(), r.clone().requires_grad_()
    (dist_ref(f2, r2, mask, p) * g.double()).sum().backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-5, atol=1e-8, msg=lambda m: f"grad fake: {m}")
    torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-5, atol=1e-8, msg=lambda m: f"grad real: {m}")
    assert (f1.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_distance_with_grad_gives_the_gradient_in_the_forward(shape, p, dtype):
    """perceptual_distance_with_grad: the distance and d(sum of distances)/d fake = grad * grad_scale from
    one pass; grad_scale is 1 except for fp16, which keeps mask * p / K out of its 16 bits."""
    f, r, mask = _inputs(shape, seed=16, dtype=dtype)
    got, grad, scale = torch.ops.hptransfer.perceptual_distance_with_grad(f, r, mask, p)
    torch.testing.assert_close(got, dist(f, r, mask, p), rtol=0, atol=0)
    f2 = f.double().requires_grad_()
    dist_ref(f2, r.double(), mask, p).sum().backward()
    assert grad.dtype == f.dtype and grad.shape == f.shape and scale.dtype == torch.float32 and scale.shape == mask.shape
    want_scale = mask * p / f[0].numel() if dtype == torch.float16 else torch.ones_like(mask)
    torch.testing.assert_close(scale, want_scale, rtol=1e-7, atol=0)
    rtol = 1e-6 if dtype == torch.float32 else 1e-3  # fp16: the difference f - r rounded once
    torch.testing.assert_close(grad.double() * scale.double().view(-1, 1, 1, 1), f2.grad, rtol=rtol, atol=1e-9)


def test_distance_backward_keeps_neither_fake_nor_real():
    """The gradient is made in the forward: changing the features afterwards (freeing them, in effect)
    cannot change the backward. Saving fake/real would raise autograd's in-place modification error."""
    f, r, mask = _inputs((4, 8, 6, 6), seed=17)
    want_f = f.clone().requires_grad_()
    dist(want_f, r, mask, 2).sum().backward()
    x, real = f.clone().requires_grad_(), r.clone()
    features = x * 1.0  # a non-leaf, as VGG features are
    loss = dist(features, real, mask, 2).sum()
    with torch.no_grad():
        features.zero_()
        real.fill_(7.0)
    loss.backward()
    torch.testing.assert_close(x.grad, want_f.grad, rtol=0, atol=0)


@pytest.mark.parametrize("p", [1, 2])
def test_distance_gradcheck_float64(p):
    f, r, mask = _inputs((3, 2, 3, 3), dtype=torch.float64, seed=3)
    f.requires_grad_()
    r.requires_grad_()
    mask = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)  # a fractional weight too
    assert torch.autograd.gradcheck(lambda a, b: dist(a, b, mask, p), (f, r), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("p", [1, 2])
def test_distance_bf16_accumulates_in_fp32(p):
    f, r, mask = _inputs((4, 64, 16, 16), dtype=torch.bfloat16, seed=4)
    got = dist(f, r, mask, p)
    assert got.dtype == torch.float32
    exact = dist_ref(f, r, mask, p)  # fp64 sum of the very same bf16 values
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6)
    # a bf16 running sum would be off by far more than that: the tolerance above is meaningful
    naive = ((f - r).abs() ** p).flatten(1).cumsum(1, dtype=torch.bfloat16)[:, -1].double() / f[0].numel() * mask.double()
    assert (naive - exact).abs().max() > 1e-3
    f.requires_grad_()
    dist(f, r, mask, p).sum().backward()
    assert f.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("layouts", [("cl", "cl"), ("cl", "c"), ("c", "cl")])
def test_distance_channels_last(layouts, p):
    f, r, mask = _inputs((4, 6, 5, 3), seed=5)
    fmt = {"cl": torch.channels_last, "c": torch.contiguous_format}
    fl = f.clone().contiguous(memory_format=fmt[layouts[0]]).requires_grad_()
    rl = r.contiguous(memory_format=fmt[layouts[1]])
    got = dist(fl, rl, mask, p)
    torch.testing.assert_close(got.double(), dist_ref(f, r, mask, p), rtol=1e-5, atol=1e-6)
    g = torch.randn(4, generator=torch.Generator().manual_seed(6))
    (got * g).sum().backward()
    f2 = f.double().requires_grad_()
    (dist_ref(f2, r, mask, p) * g.double()).sum().backward()
    torch.testing.assert_close(fl.grad.double(), f2.grad, rtol=1e-5, atol=1e-8)


def test_distance_non_contiguous_input():
    f, r, mask = _inputs((4, 6, 10, 5), seed=7)
    fs, rs = f[:, :, ::2], r[:, :, ::2]  # strided views
    torch.testing.assert_close(dist(fs, rs, mask, 2).double(), dist_ref(fs, rs, mask, 2), rtol=1e-5, atol=1e-6)


def test_distance_argument_errors():
    f, r, mask = _inputs((3, 2, 4, 4))
    with pytest.raises(RuntimeError, match="p must be 1"):
        dist(f, r, mask, 3)
    with pytest.raises(RuntimeError, match="must have the shape of fake"):
        dist(f, r[:, :1], mask, 2)
    with pytest.raises(RuntimeError, match="differs from fake dtype"):
        dist(f, r.double(), mask, 2)
    with pytest.raises(RuntimeError, match="mask must be"):
        dist(f, r, mask[:2], 2)
    with pytest.raises(RuntimeError, match="must be float32"):
        dist(f.int(), r.int(), mask, 2)
    with pytest.raises(RuntimeError, match=r"\(M, C, h, w\)"):
        dist(f[0], r[0], mask, 2)


def _threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def test_cpu_ops_same_with_one_and_two_threads():
    f, r, mask = _inputs((37, 8, 6, 6), seed=8)
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(9)) * 2 - 1
    centers = torch.rand(3, 9, 2, generator=torch.Generator().manual_seed(10)) * 48 - 4
    grad = torch.randn(27, 3, 10, 10, generator=torch.Generator().manual_seed(11))

    def run():
        fr = f.clone().requires_grad_()
        d = dist(fr, r, mask, 2)
        d.sum().backward()
        im = images.clone().requires_grad_()
        crops = torch.ops.hptransfer.gather_crops(im, centers, 10, True)
        (crops * grad).sum().backward()
        return d, fr.grad, crops, im.grad

    for a, b in zip(_threads(1, run), _threads(2, run)):
        assert torch.equal(a, b)


def _gather_case(seed=12):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 21, 17, generator=g) * 2 - 1
    centers = torch.rand(2, 7, 2, generator=g) * 26 - 3  # some crops leave the image, some overlap
    centers[0, 2] = torch.tensor([-1.0, -1.0])  # missing descriptor
    centers[1, 4] = torch.tensor([5.0, -1.0])  # one coordinate missing is missing too
    centers[1, 5] = torch.tensor([10.5, 3.5])  # round half up
    return images, centers


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("size", [6, 5])
def test_gather_cpu_op_matches_reference(size, normalize):
    images, centers = _gather_case()
    a = images.clone().requires_grad_()
    got = torch.ops.hptransfer.gather_crops(a, centers, size, normalize)
    b = images.clone().requires_grad_()
    want = gather_crops_reference(b, centers, size, normalize=normalize)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(want)
    (got * grad).sum().backward()
    (want * grad).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert a.grad.abs().sum() > 0


def test_gather_cpu_op_gradcheck_float64():
    images, centers = _gather_case(13)
    images = images[:1, :, :7, :6].double().contiguous().requires_grad_()
    centers = torch.tensor([[[1.0, 1.0], [3.2, 4.6], [6.0, 0.0], [-1.0, 2.0]]], dtype=torch.float64)  # edges, overlap, missing
    assert torch.autograd.gradcheck(lambda x: torch.ops.hptransfer.gather_crops(x, centers, 4, True), (images,))


def test_gather_cpu_op_errors():
    images, centers = _gather_case()
    with pytest.raises(RuntimeError, match=r"centers must be \(B, N, 2\)"):
        torch.ops.hptransfer.gather_crops(images, centers[:1], 4, False)
    with pytest.raises(RuntimeError, match="crop size must be >= 1"):
        torch.ops.hptransfer.gather_crops(images, centers, 0, False)
    with pytest.raises(RuntimeError, match="3-channel"):
        torch.ops.hptransfer.gather_crops(images[:, :2], centers, 4, True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + [(3, 3, 7, 7), (3, 16, 33, 33), (2, 64, 64, 64)])  # several chunks per crop
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_distance_cuda_matches_cpu(dtype, shape, p, layout):
    assert ops.backend_status()["extension_cuda"], "hptransfer._C was built without CUDA"
    f, r, mask = _inputs(shape, dtype=dtype, seed=14)
    fc = f.cuda().contiguous(memory_format=layout).requires_grad_()
    rc = r.cuda().contiguous(memory_format=layout)
    got = dist(fc, rc, mask.cuda(), p)
    torch.testing.assert_close(got.double().cpu(), dist_ref(f, r, mask, p), rtol=1e-5, atol=1e-6)
    g = torch.randn(shape[0], generator=torch.Generator().manual_seed(15))
    (got * g.cuda()).sum().backward()
    fr = f.clone().requires_grad_()
    (dist(fr, r, mask, p) * g).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(fc.grad.cpu(), fr.grad, **tol)
    again = dist(fc.detach(), rc, mask.cuda(), p)  # the chunk sums are added in a fixed order
    assert torch.equal(again, got.detach())


# ----------------------------------------------------------------------------- fp16 gradients (issue 24)
def _gradient_before_issue24(f, r, mask, p, g):
    """The fused distance's gradient as the op computed it before issue 24, which bf16, fp32 and fp64
    keep bit for bit: d distance/d fake = mask * p / K * (sign(d) | d) rounded to the feature dtype in
    the forward, times the upstream gradient cast to that dtype. The per-crop scale is mask * p / K
    in the accumulation dtype (CPU kernel) or mask * (p / K) (CUDA launcher)."""
    acc = torch.float64 if f.dtype == torch.float64 else torch.float32
    K = f[0].numel()
    m = mask.to(device=f.device, dtype=acc)
    scale = (m * p) / K if f.device.type == "cpu" else m * (p / K)
    d = f.to(acc) - r.to(acc)
    term = d.sign() if p == 1 else d
    shape = (-1,) + (1,) * (f.dim() - 1)
    dfake = (scale.view(shape) * term).to(f.dtype)
    return dfake * g.to(device=f.device, dtype=f.dtype).view(shape)


def _check_unchanged_gradient(device, dtype, shape, p, layout=torch.contiguous_format):
    f, r, mask = _inputs(shape, dtype=dtype, seed=21, device=device)
    mask[1 % shape[0]] = 0.5  # a fractional weight: the scale is not a power of two
    f, r = f.contiguous(memory_format=layout), r.contiguous(memory_format=layout)
    g = torch.randn(shape[0], generator=torch.Generator().manual_seed(22)).to(device) * 3.7  # not a bf16 value
    x = f.clone().requires_grad_()
    (dist(x, r, mask, p) * g).sum().backward()
    want = _gradient_before_issue24(f, r, mask, p, g)
    assert torch.equal(x.grad, want), f"{dtype} gradient changed: max diff {(x.grad.double() - want.double()).abs().max()}"


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_distance_gradient_of_bf16_fp32_fp64_is_bit_identical_to_before(dtype, p):
    for shape in SHAPES:
        _check_unchanged_gradient("cpu", dtype, shape, p)
    _check_unchanged_gradient("cpu", dtype, (4, 6, 5, 3), p, torch.channels_last)


@pytest.mark.cuda
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distance_gradient_of_bf16_fp32_is_bit_identical_to_before_cuda(dtype, p):
    for shape in SHAPES + [(2, 64, 64, 64)]:
        _check_unchanged_gradient("cuda", dtype, shape, p)
    _check_unchanged_gradient("cuda", dtype, (4, 6, 5, 3), p, torch.channels_last)


LOSS_SCALE = 65536.0  # GradScaler's initial scale: above fp16's largest value (65504)


@pytest.fixture(scope="module")
def features_1024px_fp16():
    """relu1_2 features of one 1024-px image in fp16 (64 x 1024 x 1024): K = 2^26, so p / K ~ 3e-8 is below
    fp16's smallest subnormal (6e-8)."""
    g = torch.Generator().manual_seed(23)
    shape = (1, 64, 1024, 1024)
    return torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half()


def _check_fp16_gradient(f, r, p):
    """Gradient of LOSS_SCALE * distance against the fp32 gradient of the same fp16 inputs: finite, no entry
    zeroed where the true value is representable in fp16, and a norm-wise relative error under 2%."""
    x = f.clone().requires_grad_()
    (dist(x, r, torch.ones(1, device=f.device), p) * LOSS_SCALE).sum().backward()
    got = x.grad
    del x
    assert got.dtype == torch.float16 and torch.isfinite(got).all(), "non-finite fp16 gradient"
    zeroed, err2, ref2 = 0, 0.0, 0.0
    for c in range(0, f.shape[1], 8):  # the fp32 reference in slices of 8 channels (memory)
        d = f[:, c:c + 8].float() - r[:, c:c + 8].float()
        ref = (d.sign() if p == 1 else d).mul_(LOSS_SCALE * p / f[0].numel())
        part = got[:, c:c + 8]
        zeroed += ((part == 0) & (ref.half() != 0)).sum().item()
        err2 += (part.float() - ref).square().sum().item()
        ref2 += ref.square().sum().item()
    assert zeroed == 0, f"{zeroed} of {got.numel()} gradient entries are 0 where fp16 holds the true value"
    assert (err2 / ref2) ** 0.5 < 0.02, f"relative error {(err2 / ref2) ** 0.5:.3g}"


@pytest.mark.parametrize("p", [1, 2])
def test_fp16_gradient_survives_1024px_features_and_a_loss_scale(features_1024px_fp16, p):
    _check_fp16_gradient(*features_1024px_fp16, p)


@pytest.mark.cuda
@pytest.mark.parametrize("p", [1, 2])
def test_fp16_gradient_survives_1024px_features_and_a_loss_scale_cuda(features_1024px_fp16, p):
    f, r = features_1024px_fp16
    _check_fp16_gradient(f.cuda(), r.cuda(), p)


# ----------------------------------------------------------------------------- CUDA launch configuration
def test_distance_launch_config_fits_every_shape_up_to_8x64x1024x1024():
    """The CUDA distance kernel's grid, computed on the host (csrc/local_loss.h) exactly as the launcher does:
    within CUDA's limits (x < 2^31, y and z <= 65535) and covering every element once, for crops up to
    (8, 64, 1024, 1024) in every dtype, 16-byte aligned or not (a view at an odd offset, an odd size: the
    scalar path, whose 1024-px crop needs 65536 chunks)."""
    ext = ops.extension()
    for M in (1, 3, 8):
        for C in (1, 3, 64):
            for side in (1, 7, 33, 512, 1023, 1024):
                K = C * side * side
                for element_size in (2, 4, 8):
                    for aligned in (True, False):
                        cfg = ext.distance_launch_config(M, K, element_size, aligned)
                        where = (M, C, side, element_size, aligned, cfg)
                        gx, gy, gz = cfg["grid"]
                        assert 1 <= gx < 2 ** 31 and 1 <= gy <= 65535 and 1 <= gz <= 65535, where
                        assert gx * gy * gz == M * cfg["chunks"] and cfg["threads"] == 256, where
                        vec = cfg["vec"]
                        assert vec == 1 or (aligned and vec == 16 // element_size and K % vec == 0), where
                        vectors, span = K // vec, cfg["chunk_vecs"]
                        # chunk c covers vectors [c * span, (c + 1) * span); the last one the scalar tail too
                        assert (cfg["chunks"] - 1) * span < max(vectors, 1) <= cfg["chunks"] * span, where
    big = ext.distance_launch_config(8, 64 * 1024 * 1024, 2, False)
    assert big["chunks"] == 65536 and big["grid"][0] == 8 * 65536  # beyond what grid.y could hold
    with pytest.raises(RuntimeError, match="more than CUDA allows"):
        ext.distance_launch_config(2 ** 16, 64 * 1024 * 1024, 2, False)


@pytest.mark.cuda
@pytest.mark.parametrize("p", [1, 2])
def test_distance_cuda_unaligned_1024px_crop(p):
    """A view at an odd offset (the scalar path) of a 64 x 1024 x 1024 crop: 65536 chunks per crop, more
    than grid.y holds; the distance and gradient equal the CPU op's."""
    base = torch.randn(2 * 64 * 1024 * 1024 + 1, generator=torch.Generator().manual_seed(24)).to(torch.bfloat16)
    f, r = base[1:].view(2, 64, 1024, 1024)[:1], base[1:].view(2, 64, 1024, 1024)[1:]
    mask = torch.ones(1)
    fc = torch.empty(fc.numel() + 1, dtype=fc.dtype, device="cuda")[1:].view(f.shape).copy_(f).requires_grad_()
    rc = torch.empty(r.numel() + 1, dtype=r.dtype, device="cuda")[1:].view(r.shape).copy_(r)
    assert fc.data_ptr() % 16 != 0
    got = dist(fc, rc, mask.cuda(), p)
    torch.testing.assert_close(got.cpu().double(), dist_ref(f, r, mask, p), rtol=1e-5, atol=1e-7)
    got.sum().backward()
    x = f.clone().requires_grad_()
    dist(x, r, mask, p).sum().backward()
    torch.testing.assert_close(fc.grad.cpu(), x.grad, rtol=1e-2, atol=1e-9)
