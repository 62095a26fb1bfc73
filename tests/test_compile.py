"""train.compile: the fake kernels of the extension's ops (``torch.library.opcheck``: schema, fake
tensors, autograd registration, AOTAutograd), and the generator compiled ("blocks", "full") against
eager: same output and gradients, no graph break in "full", no recompilation as the fade's alpha rises.

Compilation uses the ``aot_eager`` backend: dynamo's capture and AOTAutograd's joint graph, which is
where our code can break a graph; inductor's code generation is torch's own (and takes minutes per
graph on a 2-core CPU). ``bench_train --compile blocks`` times inductor.
"""
from __future__ import annotations

import copy

import pytest
import torch

from hptransfer import ops
from hptransfer.config import ModelConfig, load_config
from hptransfer.models import Generator
from hptransfer.ops import _dispatch

from conftest import random_keypoints

R = 128  # grown once: an encoder/decoder block above the base and the input fade


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _extension():
    ext = _dispatch.extension()
    assert ext is not None, f"hptransfer._C did not load: {_dispatch._load_extension()[1]} (CI builds it)"
    return ext


# ---------------------------------------------------------------------------- fake kernels
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_distance_ops_pass_opcheck(layout, rng):
    _extension()
    fake = torch.randn(3, 4, 5, 6, generator=rng).to(memory_format=layout)
    real = torch.randn(3, 4, 5, 6, generator=rng).to(memory_format=layout)
    mask = torch.tensor([1.0, 0.0, 1.0])
    for p in (1, 2):
        torch.library.opcheck(torch.ops.hptransfer.perceptual_distance_with_grad, (fake, real, mask, p))
        torch.library.opcheck(torch.ops.hptransfer.perceptual_distance, (fake.requires_grad_(), real, mask, p))
        fake.requires_grad_(False)


def test_gather_ops_pass_opcheck(rng):
    _extension()
    images = torch.randn(2, 3, 32, 32, generator=rng)
    centers = torch.tensor([[[4.0, 5.0], [30.0, 2.0]], [[16.0, 16.0], [-1.0, 8.0]]])
    for normalize in (False, True):
        torch.library.opcheck(torch.ops.hptransfer.gather_crops, (images.requires_grad_(), centers, 8, normalize))
        images.requires_grad_(False)
        grad = torch.randn(4, 3, 8, 8, generator=rng)
        torch.library.opcheck(torch.ops.hptransfer.gather_crops_backward, (grad, centers, 32, 32, 8, normalize))


def test_heatmaps_op_passes_opcheck_and_equals_the_reference(rng):
    """The Triton heatmaps as a custom op (the interpreter runs it on the CPU here)."""
    from hptransfer.ops.heatmaps import _heatmaps_multi_op

    kp = random_keypoints(2, 64, rng, missing=1)
    args = (kp, [64, 64], [8, 8, 16, 16], [0.8, 1.6], torch.float32)
    torch.library.opcheck(_heatmaps_multi_op, args, test_utils=("test_schema", "test_faketensor"))
    got = ops.heatmaps_multi(kp, (64, 64), [(8, 8), (16, 16)], [0.8, 1.6], impl="fast")
    want = [ops.heatmaps_reference(kp, (64, 64), s, sg) for s, sg in (((8, 8), 0.8), ((16, 16), 1.6))]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_fused_distance_compiles_without_a_graph_break(rng):
    """The global loss's fused op inside a compiled function (fullgraph: a break would raise), forward
    and gradient equal to eager."""
    _extension()
    fake = torch.randn(2, 8, 16, 16, generator=rng, requires_grad=True)
    real = torch.randn(2, 8, 16, 16, generator=rng)

    def loss(f, r):
        return ops.perceptual_distance(f * 2, r, "l1", impl="fast").sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    want = loss(fake, real)
    (g_want,) = torch.autograd.grad(want, fake)
    got = compiled(fake, real)
    (g_got,) = torch.autograd.grad(got, fake)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


# ---------------------------------------------------------------------------- the generator
def _generator_pair(fading: bool):
    torch.manual_seed(0)
    cfg = ModelConfig(width=1 / 32, pose_at_every_scale=True)
    g = Generator(cfg, R // 2)
    g.impl = "reference"
    g.grow(input_fade=fading)
    g.train()
    return g, copy.deepcopy(g)


def _forward_backward(run, g, ref, kp):
    """``run`` (g, or g compiled as a whole) forward and backward; g's output and parameter gradients."""
    out = run(ref, kp)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in g.named_parameters()}
    g.zero_grad(set_to_none=True)
    return out.detach(), grads


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode,heatmaps", [("blocks", "reference"), ("full", "reference"),
                                           pytest.param("full", "fast", marks=pytest.mark.slow)])  # ~60 s
def test_compiled_generator_equals_eager_and_alpha_does_not_recompile(mode, heatmaps, rng):
    """("full", "fast"): the Triton heatmaps (interpreted here) inside the one graph."""
    eager, compiled = _generator_pair(fading=True)
    eager.impl = compiled.impl = heatmaps
    if mode == "blocks":
        compiled.compile_blocks(backend="aot_eager")
        run = compiled
    else:
        run = torch.compile(compiled, backend="aot_eager", fullgraph=True)  # a graph break raises
    ref = torch.rand(2, 3, R, R, generator=rng) * 2 - 1
    kp = random_keypoints(2, R, rng, missing=2)
    for alpha in (0.0, 0.25):  # the fade's weight changes every step: a tensor input, not a constant
        eager.fade_alpha = compiled.fade_alpha = alpha
        _assert_same(_forward_backward(run, compiled, ref, kp), _forward_backward(eager, eager, ref, kp))
        if alpha == 0.0:
            torch._dynamo.config.error_on_recompile = True  # from here on a recompilation raises
    torch._dynamo.config.error_on_recompile = False
    for a, b in zip(eager.buffers(), compiled.buffers()):  # BatchNorm statistics moved alike
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_blocks_compiles_each_block_once():
    g, _ = _generator_pair(fading=False)
    g.compile_blocks(backend="aot_eager")
    blocks = [*g.encoder.values(), g.bottleneck, *g.decoder.values()]
    first = [b._compiled_call_impl for b in blocks]
    assert all(f is not None for f in first)
    g.compile_blocks(backend="aot_eager")  # again (after a growth): compiled blocks are kept
    assert [b._compiled_call_impl for b in blocks] == first


def test_compile_config_values_and_earlier_booleans():
    assert load_config(None, ["train.compile=blocks"]).train.compile == "blocks"
    assert load_config(None, ["train.compile=true"]).train.compile == "full"  # configs written before the modes
    assert load_config(None, ["train.compile=false"]).train.compile == "off"
    with pytest.raises(Exception, match="train.compile"):
        load_config(None, ["train.compile=fast"])
