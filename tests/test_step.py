"""hptransfer.step.train_step against the trainer's loop written out directly; phase timers; NVTX off/on."""
from __future__ import annotations

import copy

import pytest
import torch

from hptransfer import losses, pose, profiling
from hptransfer.backend import SingleBackend
from hptransfer.config import LossConfig
from hptransfer.models import Generator, LocalDiscriminator, VGG16Features
from hptransfer.step import PHASES, train_step

from conftest import random_keypoints

R = 64
LAYERS = ["relu1_2", "relu2_2"]


def _loss_cfg(with_discriminator: bool) -> LossConfig:
    return LossConfig(vgg_weights="random", layers=LAYERS, local_min_crop=8, adv_weight=0.1,
                      disc_at_resolution=R if with_discriminator else 1024, local_perceptual_at_top=True)  # every term runs


class _Cfg:  # train_step reads cfg.loss only
    def __init__(self, loss):
        self.loss = loss


@pytest.fixture(scope="module")
def vgg():
    return VGG16Features(weights="random", layers=LAYERS)


def _inputs(rng, batch=2):
    ref = torch.rand(batch, 3, R, R, generator=rng) * 2 - 1
    tgt = torch.rand(batch, 3, R, R, generator=rng) * 2 - 1
    return ref, tgt, random_keypoints(batch, R, rng, missing=1), random_keypoints(batch, R, rng)


def _models(tiny_cfg, with_discriminator: bool):
    torch.manual_seed(0)
    g = Generator(tiny_cfg, R)
    g.impl = "reference"
    d = LocalDiscriminator(tiny_cfg, pose.descriptor_count(R), pose.crop_size(R)) if with_discriminator else None
    return g, d


def _engines(backend, g, d):
    ge = backend.engine("generator", g, torch.optim.Adam(g.parameters(), lr=1e-3), 2)
    de = backend.engine("discriminator", d, torch.optim.Adam(d.parameters(), lr=1e-3), 2) if d is not None else None
    return ge, de


def test_generator_loss_marks_its_phases(tiny_cfg, vgg, rng):
    from hptransfer.profiling import PhaseTimer

    g, d = _models(tiny_cfg, with_discriminator=True)
    ref, tgt, kr, kt = _inputs(rng)
    fake = g(ref, kt)
    with PhaseTimer() as t:
        cfg = _loss_cfg(with_discriminator=True)
        a = losses.generator_loss(fake, tgt, losses.step_geometry(cfg, kr, kt, R), vgg, cfg, "l1", reference=ref,
                                  discriminator=d, impl="reference")
    assert {"global_vgg", "local_vgg", "discriminator"} <= set(t.totals())
    assert float(a["adv"].detach()) != 0 and float(a["local"].detach()) != 0


@pytest.mark.parametrize("with_discriminator", [False, True])
def test_train_step_matches_the_loop_written_out(tiny_cfg, vgg, rng, with_discriminator):
    ref, tgt, kr, kt = _inputs(rng)
    cfg = _loss_cfg(with_discriminator)
    backend = SingleBackend("fp32", device="cpu")
    g1, d1 = _models(tiny_cfg, with_discriminator)
    g2, d2 = copy.deepcopy(g1), copy.deepcopy(d1)

    ge, de = _engines(backend, g1, d1)
    out = train_step(ge, g1, vgg, _Cfg(cfg), ref, tgt, kr, kt, "l2", "reference", backend, d_engine=de)
    assert not out["skipped"] and not out["d_skipped"]
    assert (out["d_loss"] is not None) == with_discriminator

    # the loop written out with plain optimisers: D's loss on the detached fake and G's terms from the same
    # D weights, then G's backward and step, then D's (pix2pixHD's order)
    go = torch.optim.Adam(g2.parameters(), lr=1e-3)
    fake = g2(ref, kt)
    geometry = pose.StepGeometry(R, R // 8, *pose.local_descriptors(kt, R), *pose.local_descriptors(kr, R))
    if with_discriminator:
        do = torch.optim.Adam(d2.parameters(), lr=1e-3)
        d_loss = losses.discriminator_loss(d2, losses.local_discriminator_pairs(ref, tgt, geometry, "reference"),
                                           losses.local_discriminator_pairs(ref, fake.detach(), geometry, "reference"),
                                           geometry.pair_valid)
        torch.testing.assert_close(out["d_loss"], d_loss)
    terms = losses.generator_loss(fake, tgt, geometry, vgg, cfg, "l2", reference=ref, discriminator=d2, impl="reference")
    terms["total"].backward()
    go.step()
    if with_discriminator:
        d_loss.backward()
        do.step()
    torch.testing.assert_close(out["terms"]["total"], terms["total"])
    pairs = [(g1, g2)] + ([(d1, d2)] if with_discriminator else [])
    for m1, m2 in pairs:
        for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
            torch.testing.assert_close(a, b, msg=f"{name} differs after one step")
    assert any(not torch.equal(a, b) for a, b in zip(g1.parameters(), _models(tiny_cfg, with_discriminator)[0].parameters()))


def test_non_finite_loss_skips_and_restores_buffers(tiny_cfg, vgg, rng):
    ref, tgt, kr, kt = _inputs(rng)
    backend = SingleBackend("fp32", device="cpu")
    g, _ = _models(tiny_cfg, with_discriminator=False)
    before = copy.deepcopy(g.state_dict())
    ge, _ = _engines(backend, g, None)

    def nan_hook(terms, info):
        assert info == {"step_in_stage": 3}
        return {**terms, "total": terms["total"] * float("nan")}

    out = train_step(ge, g, vgg, _Cfg(_loss_cfg(False)), ref, tgt, kr, kt, "l2", "reference", backend,
                     loss_hook=nan_hook, info={"step_in_stage": 3})
    assert out["skipped"]
    for k, v in g.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=f"{k} changed on a skipped step")


def test_one_host_read_per_step_and_a_non_finite_d_loss_skips_only_d(tiny_cfg, vgg, rng, monkeypatch):
    """Both finite flags are read together, once; a non-finite D loss leaves D as it was and G still steps."""
    from hptransfer import step as step_module

    ref, tgt, kr, kt = _inputs(rng)
    backend = SingleBackend("fp32", device="cpu")
    g, d = _models(tiny_cfg, with_discriminator=True)
    g_before, d_before = copy.deepcopy(g.state_dict()), copy.deepcopy(d.state_dict())
    ge, de = _engines(backend, g, d)
    reads, real_read = [], step_module.read_nonfinite
    monkeypatch.setattr(step_module, "read_nonfinite", lambda b, *v, **kw: reads.append(len(v)) or real_read(b, *v, **kw))
    real_d_loss = losses.discriminator_loss
    monkeypatch.setattr(losses, "discriminator_loss", lambda *a: real_d_loss(*a) * float("nan"))
    out = train_step(ge, g, vgg, _Cfg(_loss_cfg(True)), ref, tgt, kr, kt, "l2", "reference", backend, d_engine=de)
    assert reads == [2]
    assert out["d_skipped"] and not out["skipped"]
    assert all(torch.equal(v, d_before[k]) for k, v in d.state_dict().items())
    assert any(not torch.equal(v, g_before[k]) for k, v in g.state_dict().items())


def test_phase_timer_records_every_phase(tiny_cfg, vgg, rng):
    ref, tgt, kr, kt = _inputs(rng)
    backend = SingleBackend("fp32", device="cpu")
    g, d = _models(tiny_cfg, with_discriminator=True)
    ge, de = _engines(backend, g, d)
    with profiling.PhaseTimer(cuda=False) as t:
        train_step(ge, g, vgg, _Cfg(_loss_cfg(True)), ref, tgt, kr, kt, "l2", "reference", backend, d_engine=de)
    totals = t.totals()
    assert set(totals) == set(PHASES)
    assert all(v > 0 for v in totals.values())
    assert sum(1 for name, *_ in t.records if name == "discriminator") == 3  # D loss, adversarial term, D step


def test_nvtx_off_makes_no_calls_and_on_pushes_named_ranges(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    monkeypatch.setattr(profiling, "_nvtx_on", False)
    with profiling.phase("backward"):
        pass
    assert calls == []
    profiling.enable()
    with profiling.phase("backward"):
        pass
    profiling.enable(False)
    assert calls == [("push", "backward"), ("pop",)]
