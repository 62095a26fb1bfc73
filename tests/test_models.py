"""Generator, local discriminators and VGG-16 features: shapes, exact parameter counts from the
paper's layout (computed here, not read from the model), growth, checkpointing and weight loading."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TINY_WIDTH, random_keypoints
from hptransfer.config import ModelConfig
from hptransfer.models import Generator, LocalDiscriminator, VGG16Features
from hptransfer.models import vgg as vgg_module

STAGES = (64, 128, 256, 512, 1024)


def ch(r: int, width: float) -> int:
    """The paper's channel rule written independently: 1024 at 32x32, halving per doubling (min 4)."""
    return max(int(round(1024 * 32 / r * width)), 4)


def expected_params(R: int, width: float, pose_every: bool = False) -> int:
    """Parameter count of the generator at R from the layout in the generator's docstring."""
    conv3 = lambda cin, cout: 9 * cin * cout + 2 * cout  # conv3x3 without bias + BN (gamma, beta)
    extra = 18 if pose_every else 0
    cb = ch(32, width)
    total = conv3(cb + 18, cb) + conv3(cb, cb)  # bottleneck
    r = 64
    while r <= R:
        c, c2 = ch(r, width), ch(r // 2, width)
        total += conv3(c, c) + conv3(c, c2)  # encoder
        total += conv3(2 * c2 + extra, c) + conv3(c, c)  # decoder
        r *= 2
    cR = ch(R, width)
    return total + (3 * cR + cR) + (cR * 3 + 3)  # from_rgb, to_rgb (1x1 with bias)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- generator

@pytest.mark.parametrize("width", [1.0, TINY_WIDTH])
def test_parameter_counts_every_stage(width):
    with torch.device("meta"):
        g = Generator(ModelConfig(width=width), 64)
    for R in STAGES:
        assert g.resolution == R
        assert n_params(g) == expected_params(R, width), f"stage {R}"
        if R < 1024:
            g.grow()
    if width == 1.0:  # the paper's bottleneck: 1024 x 32 x 32, from-RGB to 32 channels at 1024
        assert g.bottleneck.conv2.conv.out_channels == 1024
        assert g.from_rgb["1024"].conv.out_channels == 32


def test_parameter_count_pose_every_scale():
    with torch.device("meta"):
        g = Generator(ModelConfig(width=TINY_WIDTH, pose_at_every_scale=True), 256)
    assert n_params(g) == expected_params(256, TINY_WIDTH, pose_every=True)


def test_channels_at_every_stage():
    w = TINY_WIDTH
    with torch.device("meta"):
        g = Generator(ModelConfig(width=w), 1024)
    for r in STAGES:
        enc, dec = g.encoder[str(r)], g.decoder[str(r)]
        assert (enc.conv1.conv.in_channels, enc.conv1.conv.out_channels) == (ch(r, w), ch(r, w))
        assert (enc.conv2.conv.in_channels, enc.conv2.conv.out_channels) == (ch(r, w), ch(r // 2, w))
        assert (dec.conv1.conv.in_channels, dec.conv1.conv.out_channels) == (2 * ch(r // 2, w), ch(r, w))
        assert (dec.conv2.conv.in_channels, dec.conv2.conv.out_channels) == (ch(r, w), ch(r, w))
    assert g.bottleneck.conv1.conv.in_channels == ch(32, w) + 18


def test_forward_shapes_every_stage(tiny_cfg, rng):
    g = Generator(tiny_cfg, 64).eval()
    for R in (64, 128, 256):
        x = torch.rand(2, 3, R, R, generator=rng) * 2 - 1
        y = g(x, random_keypoints(2, R, rng, missing=3))
        assert y.shape == (2, 3, R, R) and y.dtype == torch.float32
        assert y.abs().max() <= 1.0 and torch.isfinite(y).all()
        if R < 256:
            g.grow()


def test_bottleneck_shape_and_skips(tiny_cfg, rng):
    g = Generator(tiny_cfg, 128).eval()
    seen = {}
    g.bottleneck.register_forward_hook(lambda m, args, out: seen.update(bneck_in=args[0].shape, maps=args[1]))
    g.decoder["128"].register_forward_hook(lambda m, args, out: seen.update(skip=args[1].shape))
    kp = random_keypoints(2, 128, rng)
    g(torch.zeros(2, 3, 128, 128), kp)
    assert seen["bneck_in"] == (2, ch(32, TINY_WIDTH), 32, 32)
    assert seen["skip"] == (2, ch(64, TINY_WIDTH), 128, 128)
    # heatmaps at the bottleneck: 18 maps on the 32x32 grid, peak near kp / 4
    maps = seen["maps"]
    assert maps.shape == (2, 18, 32, 32)
    peak = maps[0, 0].flatten().argmax()
    y, x = divmod(int(peak), 32)
    assert abs(y - ((kp[0, 0, 0] + 0.5) / 4 - 0.5)) <= 0.5 and abs(x - ((kp[0, 0, 1] + 0.5) / 4 - 0.5)) <= 0.5


def test_output_depends_on_pose(tiny_cfg, rng):
    g = Generator(tiny_cfg, 64).eval()
    x = torch.rand(1, 3, 64, 64, generator=rng) * 2 - 1
    kp = random_keypoints(1, 64, rng)
    kp2 = kp.clone()
    kp2[0, 4] = torch.tensor([5.0, 50.0])
    assert not torch.allclose(g(x, kp), g(x, kp2))


def test_pose_at_every_scale(rng):
    cfg = ModelConfig(width=TINY_WIDTH, pose_at_every_scale=True)
    g = Generator(cfg, 128).eval()
    assert g.decoder["128"].conv1.conv.in_channels == 2 * ch(64, TINY_WIDTH) + 18
    maps = g.pose_maps(random_keypoints(2, 128, rng), torch.float32)
    assert {s: m.shape[-1] for s, m in maps.items()} == {32: 32, 64: 64, 128: 128}
    # sigma scales with the map: the paper's 3.2 on 32x32 is 12.8 px on 128x128
    m = maps[128][0, 0]
    assert float(m.max()) > 0.99
    y = g(torch.zeros(2, 3, 128, 128), random_keypoints(2, 128, rng))
    assert y.shape == (2, 3, 128, 128)


def test_growth_keeps_weights_and_adds_exact_modules(tiny_cfg, rng):
    g = Generator(tiny_cfg, 64)
    g(torch.rand(2, 3, 64, 64, generator=rng), random_keypoints(2, 64, rng))  # move BN stats
    for R in (64, 128, 256, 512):
        before = {k: v.clone() for k, v in g.state_dict().items()}
        g.grow()
        after = g.state_dict()
        new, old = 2 * R, R
        added = {k for k in after if k not in before}
        removed = {k for k in before if k not in after}
        assert {k.split(".")[0] + "." + k.split(".")[1] for k in added} == {
            f"encoder.{new}", f"decoder.{new}", f"from_rgb.{new}", f"to_rgb.{new}"}
        assert removed == {f"from_rgb.{old}.conv.weight", f"from_rgb.{old}.conv.bias",
                           f"to_rgb.{old}.conv.weight", f"to_rgb.{old}.conv.bias"}
        for k, v in before.items():
            if k in after:
                assert torch.equal(after[k], v), k
        assert g.resolution == new
    with pytest.raises(RuntimeError, match="1024"):
        g.grow()


def test_forward_after_growth_trains(tiny_cfg, rng):
    g = Generator(tiny_cfg, 64)
    g.grow()
    y = g(torch.rand(2, 3, 128, 128, generator=rng) * 2 - 1, random_keypoints(2, 128, rng))
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


def test_input_fade_blends_old_and_new_input_paths(tiny_cfg, rng):
    """grow(input_fade=True) keeps the old from-RGB: at alpha 0 the deeper blocks get exactly the
    64-px path's input and the new top encoder (path and skip) has no effect, at alpha 1 the old path
    gets zero gradients; the inference state dict drops it and loads via from_arch."""
    torch.manual_seed(0)
    g = Generator(tiny_cfg, 64)
    old_from_rgb = g.from_rgb["64"]
    g.grow(input_fade=True)
    assert g.fading and g.fade_alpha == 0.0 and g.from_rgb["64"] is old_from_rgb
    x, kp = torch.rand(2, 3, 128, 128, generator=rng) * 2 - 1, random_keypoints(2, 128, rng)
    seen = {}
    g.encoder["64"].register_forward_hook(lambda m, inp, out: seen.__setitem__("in", inp[0].detach()))
    g(x, kp)
    torch.testing.assert_close(seen["in"], old_from_rgb(torch.nn.functional.avg_pool2d(x, 2)), rtol=0, atol=0)
    for alpha in (0.0, 0.3, 1.0):
        g.zero_grad()
        g.fade_alpha = alpha
        g(x, kp).square().mean().backward()
        old, new = g.from_rgb["64"].conv.weight.grad, g.from_rgb["128"].conv.weight.grad
        assert old is not None and new is not None, alpha  # no unused parameters at any alpha
        assert (old.abs().sum() > 0) == (alpha < 1) and (new.abs().sum() > 0) == (alpha > 0), alpha
        assert g.decoder["128"].conv1.conv.weight.grad.abs().sum() > 0  # the new decoder block always trains
    state = g.inference_state_dict()
    assert not any(k.startswith("from_rgb.64.") for k in state) and "from_rgb.128.conv.weight" in state
    h = Generator.from_arch(g.arch())
    h.load_state_dict(state, strict=True)
    g.eval(), h.eval()
    assert torch.equal(g(x, kp), h(x, kp))  # alpha is 1: the old path is off
    # a generator built at 128 takes a fading checkpoint once the fade's from-RGB is added
    k = Generator(tiny_cfg, 128)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        k.load_state_dict(g.state_dict())
    k.add_input_fade()
    k.load_state_dict(g.state_dict(), strict=True)
    g.grow()  # the next growth drops the fade's from-RGB
    assert not g.fading and set(g.from_rgb) == {"256"}


@pytest.mark.parametrize("pose_at_every_scale", [False, True])
def test_output_fade_starts_as_the_previous_output_upsampled(tiny_cfg, rng, pose_at_every_scale):
    """model.output_fade: grow keeps the old to-RGB too; at alpha 0 the grown generator's output is
    exactly the previous generator's output on the 2x-downsampled image, nearest-upsampled; between,
    both to-RGBs train; at alpha 1 the old one has zero gradients; exports and from_arch drop it, and a
    generator built at 128 takes the fading state once the fade's modules are added."""
    import copy
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, input_fade=1.0, output_fade=True, pose_at_every_scale=pose_at_every_scale)
    torch.manual_seed(0)
    g = Generator(cfg, 64)
    g(torch.rand(4, 3, 64, 64, generator=rng) * 2 - 1, random_keypoints(4, 64, rng))  # BN running stats move
    previous = copy.deepcopy(g).eval()
    old_to_rgb = g.to_rgb["64"]
    g.grow(input_fade=True)
    assert g.fading and g.to_rgb["64"] is old_to_rgb and set(g.to_rgb) == {"64", "128"}
    g.eval()
    x, kp = torch.rand(2, 3, 128, 128, generator=rng) * 2 - 1, random_keypoints(2, 128, rng)
    kp64 = (kp + 0.5) / 2 - 0.5  # the same points in the 64-px frame (pixel centres aligned)
    expected = F.interpolate(previous(F.avg_pool2d(x, 2), kp64), scale_factor=2.0, mode="nearest")
    torch.testing.assert_close(g(x, kp), expected, rtol=0, atol=1e-5)
    g.fade_alpha = 0.5
    assert (g(x, kp) - expected).abs().max() > 1e-2  # the new path takes part
    g.train()
    for alpha in (0.0, 0.3, 1.0):
        g.zero_grad()
        g.fade_alpha = alpha
        g(x, kp).square().mean().backward()
        old, new = g.to_rgb["64"].conv.weight.grad, g.to_rgb["128"].conv.weight.grad
        assert old is not None and new is not None, alpha
        assert (old.abs().sum() > 0) == (alpha < 1) and (new.abs().sum() > 0) == (alpha > 0), alpha
    state = g.inference_state_dict()
    assert not any(k.startswith(("from_rgb.64.", "to_rgb.64.")) for k in state) and "to_rgb.128.conv.weight" in state
    h = Generator.from_arch(g.arch())
    h.load_state_dict(state, strict=True)
    g.eval(), h.eval()
    assert torch.equal(g(x, kp), h(x, kp))  # alpha 1: both old paths are off
    k = Generator(cfg, 128)
    k.add_input_fade()
    assert set(k.to_rgb) == {"64", "128"}
    k.load_state_dict(g.state_dict(), strict=True)
    g.grow(input_fade=False)  # the next growth drops the fade's modules
    assert set(g.to_rgb) == {"256"} and set(g.from_rgb) == {"256"}


def test_export_roundtrip_from_arch(tiny_cfg, rng):
    g = Generator(tiny_cfg, 64)
    g.grow()
    g.grow()
    g(torch.rand(2, 3, 256, 256, generator=rng) * 2 - 1, random_keypoints(2, 256, rng))
    g.eval()
    h = Generator.from_arch(g.arch())
    h.load_state_dict(g.state_dict(), strict=True)
    h.eval()
    x, kp = torch.rand(1, 3, 256, 256, generator=rng) * 2 - 1, random_keypoints(1, 256, rng)
    assert torch.equal(g(x, kp), h(x, kp))
    assert g.arch()["resolution"] == 256 and g.arch()["model"]["width"] == TINY_WIDTH


def test_activation_checkpointing_same_grads_and_bn_stats(tiny_cfg, rng):
    torch.manual_seed(0)
    a = Generator(tiny_cfg, 128)
    b = Generator(tiny_cfg, 128)
    b.load_state_dict(a.state_dict())
    b.set_activation_checkpointing(True)
    x, kp = torch.rand(2, 3, 128, 128, generator=rng) * 2 - 1, random_keypoints(2, 128, rng)
    for m in (a, b):
        m(x, kp).square().mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda s: f"{n}: {s}")
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:  # the recomputation in backward must not update BN running stats a second time
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=lambda s: f"{k}: {s}")


def test_he_init_and_zero_bias():
    g = Generator(ModelConfig(width=0.25), 64)
    w = g.encoder["64"].conv1.conv.weight  # 128 -> 128, fan_in 1152
    expected = math.sqrt(2.0 / (1 + 0.2 ** 2)) / math.sqrt(w[0].numel())
    assert abs(float(w.detach().std()) / expected - 1) < 0.05
    assert torch.count_nonzero(g.from_rgb["64"].conv.bias) == 0
    assert torch.count_nonzero(g.to_rgb["64"].conv.bias) == 0


def test_bad_inputs_have_clear_errors(tiny_cfg, rng):
    g = Generator(tiny_cfg, 64)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        g(torch.zeros(1, 3, 128, 128), random_keypoints(1, 128, rng))
    with pytest.raises(ValueError, match="kp must be"):
        g(torch.zeros(1, 3, 64, 64), torch.zeros(1, 17, 2))
    with pytest.raises(ValueError, match="resolution"):
        Generator(tiny_cfg, 96)


# ---------------------------------------------------------------- local discriminator

def disc_params_one(crop: int, c: int) -> int:
    """One discriminator: stride-2 4x4 convs with bias down to 2x2 (c, 2c, 4c, 8c, 8c..), 1x1 head."""
    total, cin = 0, 6
    for i in range(int(math.log2(crop)) - 1):
        cout = c * min(2 ** i, 8)
        total += 16 * cin * cout + cout
        cin = cout
    return total + cin + 1


@pytest.mark.parametrize("shared", [False, True])
def test_discriminator_shapes_and_params(shared, rng):
    cfg = ModelConfig(disc_channels=4, disc_shared=shared)
    d = LocalDiscriminator(cfg, 31, 32)
    assert n_params(d) == disc_params_one(32, 4) * (1 if shared else 31)
    out = d(torch.randn(3, 31, 6, 32, 32, generator=rng))
    assert out.shape == (3, 31)
    with pytest.raises(ValueError, match=r"\(B, 31, 6, 32, 32\)"):
        d(torch.randn(3, 30, 6, 32, 32))
    with pytest.raises(ValueError, match="power of two"):
        LocalDiscriminator(cfg, 31, 24)


def test_paper_discriminator_size_at_1024():
    with torch.device("meta"):
        d = LocalDiscriminator(ModelConfig(), 44, 128)
    assert n_params(d) == 44 * disc_params_one(128, 64)


def test_grouped_discriminators_are_independent_and_match_single(rng):
    N, s = 5, 16
    grouped = LocalDiscriminator(ModelConfig(disc_channels=4), N, s)
    single = LocalDiscriminator(ModelConfig(disc_channels=4, disc_shared=True), 1, s)
    pairs = torch.randn(2, N, 6, s, s, generator=rng)
    logits = grouped(pairs)
    # descriptor d of the grouped model == a single discriminator holding group d's weights
    for d in range(N):
        sd = {}
        for (k, w) in grouped.state_dict().items():
            per = w.shape[0] // N
            sd[k] = w[d * per:(d + 1) * per]
        single.load_state_dict(sd)
        torch.testing.assert_close(single(pairs[:, d:d + 1])[:, 0], logits[:, d], rtol=1e-4, atol=1e-5)
    # changing descriptor 2's pair changes only logit 2
    pairs2 = pairs.clone()
    pairs2[:, 2] += 1
    changed = (grouped(pairs2) - logits).abs() > 1e-6
    assert changed[:, 2].all() and not changed[:, [0, 1, 3, 4]].any()


def test_shared_discriminator_same_input_same_logit(rng):
    d = LocalDiscriminator(ModelConfig(disc_channels=4, disc_shared=True), 3, 8)
    p = torch.randn(1, 1, 6, 8, 8, generator=rng).expand(1, 3, 6, 8, 8)
    out = d(p)
    assert torch.allclose(out[0, 0], out[0, 1]) and torch.allclose(out[0, 0], out[0, 2])


# ---------------------------------------------------------------- VGG-16

def test_layer_index_map_matches_torchvision_layout():
    from torchvision.models.vgg import cfgs, make_layers
    names, block, conv = {}, 1, 0
    for i, m in enumerate(make_layers(cfgs["D"])):
        if isinstance(m, nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(m, nn.Conv2d):
            conv += 1
        elif isinstance(m, nn.ReLU):
            names[f"relu{block}_{conv}"] = i
    assert {k: names[k] for k in vgg_module.LAYER_INDEX} == vgg_module.LAYER_INDEX


def test_loads_torchvision_state_dict(tmp_path, rng):
    from torchvision.models.vgg import cfgs, make_layers
    torch.manual_seed(1)
    tv = make_layers(cfgs["D"]).eval()
    sd = {f"features.{k}": v for k, v in tv.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # the real file has a classifier: ignored
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(sd, path)
    v = VGG16Features(str(path))
    x = torch.rand(2, 3, 32, 32, generator=rng) * 2 - 1
    ours = v(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    h = ((x + 1) / 2 - mean) / std
    refs = []
    with torch.no_grad():
        for i, layer in enumerate(tv):
            h = layer(h)
            if i in (3, 8, 15, 22):
                refs.append(h.clone())
            if i == 22:
                break
    assert len(ours) == 4
    for a, b in zip(ours, refs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(v.features) == 23  # truncated after relu4_3


def test_missing_weights_error_names_every_place(tmp_path, monkeypatch):
    env_path = tmp_path / "nowhere" / "vgg.pth"
    monkeypatch.setenv("HPTRANSFER_VGG16", str(env_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as e:
        VGG16Features()
    msg = str(e.value)
    assert str(env_path) in msg and str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg
    assert "HPTRANSFER_VGG16" in msg and "loss.vgg_weights" in msg
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        VGG16Features(str(tmp_path / "missing.pth"))


def test_weights_found_through_env(tmp_path, monkeypatch):
    src = VGG16Features("random", layers=["relu1_2"])
    path = tmp_path / "w.pth"
    full = {f"features.{i}.{p}": torch.randn(s) for i, (p, s) in
            [(0, ("weight", (64, 3, 3, 3))), (0, ("bias", (64,))), (2, ("weight", (64, 64, 3, 3))), (2, ("bias", (64,)))]}
    torch.save(full, path)
    monkeypatch.setenv("HPTRANSFER_VGG16", str(path))
    v = VGG16Features(layers=["relu1_2"])
    assert torch.equal(v.features[0].weight, full["features.0.weight"])
    assert v.source == str(path) and src.source == "random"


def test_random_weights_warn_and_frozen(caplog, rng):
    with caplog.at_level(logging.WARNING):
        v = VGG16Features("random", layers=["relu2_2", "relu1_2"])
    assert "NOT perceptual" in caplog.text
    assert all(not p.requires_grad for p in v.parameters())
    v.train()
    assert not v.training
    x = (torch.rand(1, 3, 16, 16, generator=rng) * 2 - 1).requires_grad_()
    a, b = v(x)
    assert a.shape == (1, 128, 8, 8) and b.shape == (1, 64, 16, 16)  # order as requested
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_and_channels_last_inputs(rng):
    v = VGG16Features("random", layers=["relu1_2", "relu2_2"])
    x = torch.rand(2, 3, 16, 16, generator=rng) * 2 - 1
    ref = v(x)
    for a, b in zip(v(x.contiguous(memory_format=torch.channels_last)), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(v(x.to(torch.bfloat16)), ref):  # computed in the weights' dtype
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = v(x)
    assert out[0].dtype == torch.bfloat16
    torch.testing.assert_close(out[1].float(), ref[1], rtol=0.1, atol=0.1)


# ---------------------------------------------------------------- model-summary

def expected_gflop(R: int, width: float) -> float:
    """Conv FLOPs of one image forward, 2 * Cin * Cout * k * k * Hout * Wout per conv."""
    conv = lambda cin, cout, k, side: 2 * cin * cout * k * k * side * side
    cb = ch(32, width)
    f = conv(3, ch(R, width), 1, R) + conv(ch(R, width), 3, 1, R)
    f += conv(cb + 18, cb, 3, 32) + conv(cb, cb, 3, 32)
    r = 64
    while r <= R:
        c, c2 = ch(r, width), ch(r // 2, width)
        f += conv(c, c, 3, r) + conv(c, c2, 3, r) + conv(2 * c2, c, 3, r) + conv(c, c, 3, r)
        r *= 2
    return f / 1e9


def test_summary_table_matches_formulas():
    from hptransfer.models.summary import stage_table
    rows = stage_table(ModelConfig(width=1.0), 1024)
    assert [r["resolution"] for r in rows] == list(STAGES)
    for r in rows:
        R = r["resolution"]
        assert r["channels"] == ch(R, 1.0)
        assert r["params"] == expected_params(R, 1.0)
        assert r["gflop"] == pytest.approx(expected_gflop(R, 1.0), rel=1e-9)
    assert 180 < rows[0]["gflop"] < 200  # design.md: ~184-194 GFLOP per 64x64 image at the paper's width


def test_summary_cli_runs(capsys):
    from hptransfer.cli import main
    assert main(["model-summary", "--resolution", "128", "--width", str(TINY_WIDTH), "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP" in out and "forward at 128x128, batch 2, cpu" in out
    assert f"{expected_params(128, TINY_WIDTH):,}" in out


def test_bf16_autocast_channels_last_and_growth_keeps_format(tiny_cfg, rng):
    g = Generator(tiny_cfg, 64).to(memory_format=torch.channels_last).eval()
    g.grow()
    w = g.encoder["128"].conv1.conv.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not g.encoder["128"].training
    x = (torch.rand(2, 3, 128, 128, generator=rng) * 2 - 1).contiguous(memory_format=torch.channels_last)
    kp = random_keypoints(2, 128, rng)
    ref = g(x, kp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = g(x, kp)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 128, 128)
    torch.testing.assert_close(y.float(), ref, rtol=0.1, atol=0.1)
