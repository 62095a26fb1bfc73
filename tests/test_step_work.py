"""Issue 16, the training step doing less work: the optimiser's kernel by device (fused Adam on CUDA,
foreach otherwise) and activation checkpointing per stage (stages.N.activation_checkpointing, defaulting
to train.activation_checkpointing), from the config to the generator."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hptransfer import train as train_mod
from hptransfer.config import Config, ConfigError, StageConfig, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------------------- optimiser
def _params(device="cpu"):
    return [torch.nn.Parameter(torch.randn(4, 3, device=device)), torch.nn.Parameter(torch.randn(5, device=device)),
            torch.nn.Parameter(torch.randn(2, device=device), requires_grad=False)]


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_cpu_parameters_get_foreach_not_fused(name, cls):
    cfg = Config()
    cfg.train.optimizer = name
    opt = train_mod._make_optimizer(cfg, _params(), 1e-3)
    assert type(opt) is cls
    assert not opt.defaults["fused"] and opt.defaults["foreach"] is True
    assert len(opt.param_groups[0]["params"]) == 2  # the frozen one is left out, as before
    assert opt.defaults["weight_decay"] == cfg.train.weight_decay and opt.defaults["betas"] == tuple(cfg.train.betas)


def test_fused_only_when_every_parameter_is_on_cuda():
    p = _params()
    assert not train_mod._fused_adam_capable(p) and not train_mod._fused_adam_capable([])
    # a parameter on the meta device stands in for "not CUDA" next to the CPU ones
    assert not train_mod._fused_adam_capable(p[:1] + [torch.nn.Parameter(torch.zeros(2, device="meta"))])


def test_cuda_capable_parameters_get_the_fused_kernel(monkeypatch):
    """With the device check saying CUDA (monkeypatched: torch's fused Adam also runs CPU tensors, so the
    optimiser can be built here), _make_optimizer asks for fused=True and not foreach."""
    seen = []
    monkeypatch.setattr(train_mod, "_fused_adam_capable", lambda params: seen.append(len(params)) or True)
    opt = train_mod._make_optimizer(Config(), _params(), 1e-3)
    assert seen == [2]  # asked about the trainable parameters only
    assert opt.defaults["fused"] is True and not opt.defaults["foreach"]


def test_fused_and_foreach_give_the_same_steps_on_cpu():
    """The kernel is a speed choice only: 5 steps of the for-loop, foreach and fused Adam agree exactly."""
    cfg = Config()
    results = []
    for kernel in ({}, {"foreach": True}, {"fused": True}):
        torch.manual_seed(0)
        ps = _params()[:2]
        opt = torch.optim.Adam(ps, lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
                               **kernel)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append([p.detach().clone() for p in ps])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.cuda
def test_cuda_parameters_get_the_fused_kernel():
    opt = train_mod._make_optimizer(Config(), _params("cuda"), 1e-3)
    assert opt.defaults["fused"] is True
    mixed = train_mod._make_optimizer(Config(), _params("cuda")[:1] + _params("cpu")[:1], 1e-3)
    assert not mixed.defaults["fused"] and mixed.defaults["foreach"] is True


# ----------------------------------------------------------------------------- config
def test_stage_checkpointing_defaults_to_none_and_loads(tmp_path):
    assert StageConfig().activation_checkpointing is None and Config().stages[4].activation_checkpointing is None
    p = tmp_path / "c.yaml"
    p.write_text("train: {activation_checkpointing: true}\n"
                 "stages: [{resolution: 64, iterations: 2, activation_checkpointing: false}, {resolution: 128}]\n")
    cfg = load_config(p, ["stages.1.activation_checkpointing=true"])
    assert [s.activation_checkpointing for s in cfg.stages] == [False, True]
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg
    p.write_text("stages: [{resolution: 64, activation_checkpointing: sometimes}]\n")
    with pytest.raises(ConfigError, match="stages.0.activation_checkpointing"):
        load_config(p)


def test_non_progressive_collapse_keeps_the_top_stage_checkpointing():
    cfg = load_config(CONFIGS / "h36m_1024.yaml", ["train.progressive=false"])
    assert len(cfg.stages) == 1 and cfg.stages[0].resolution == 1024 and cfg.stages[0].activation_checkpointing


@pytest.mark.parametrize("name", ["h36m_1024", "youtube_1024"])
def test_1024_configs_checkpoint_the_1024_stage_only(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    resolved = {s.resolution: (cfg.train.activation_checkpointing if s.activation_checkpointing is None
                               else s.activation_checkpointing) for s in cfg.stages}
    assert resolved == {64: False, 128: False, 256: False, 512: False, 1024: True}
    assert cfg.stages[-1].batch_size == 2


# ----------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from hptransfer.data import synth

    root = tmp_path_factory.mktemp("synth")
    synth.synthesize(root, identities=4, poses=3, size=64, seed=0)
    return root


def test_each_stage_sets_its_checkpointing_on_the_generator(data_root, tmp_path, monkeypatch):
    """train.activation_checkpointing=true with stage 0 set to false: the generator trains stage 0
    without checkpointing and stage 1 (unset) with it, each set by set_activation_checkpointing when
    the stage starts."""
    from hptransfer.models import Generator
    from hptransfer.train import train

    monkeypatch.setenv("HPTRANSFER_NO_BAR", "1")
    calls = []
    real = Generator.set_activation_checkpointing

    def record(self, enabled):
        calls.append((self.resolution, bool(enabled)))
        real(self, enabled)

    monkeypatch.setattr(Generator, "set_activation_checkpointing", record)
    cfg = load_config(None, [
        "model.width=0.03125", "loss.vgg_weights=random", "loss.layers=[relu1_2]", "loss.descriptors=0",
        "train.impl=reference", "train.tensorboard=false", "train.sample_every=100", "train.checkpoint_every=100",
        "data.workers=0", f"data.root={data_root}", f"train.out_dir={tmp_path / 'run'}",
        "train.activation_checkpointing=true",
        "stages=[{resolution: 64, iterations: 1, batch_size: 2, activation_checkpointing: false}, "
        "{resolution: 128, iterations: 1, batch_size: 2}]"])
    seen = []
    result = train(cfg, callback=lambda info: seen.append((info["resolution"], info["generator"].checkpointing)))
    assert result["global_step"] == 2
    assert seen == [(64, False), (128, True)]
    # the stage's call comes last before its steps: (64, False) after the build's global switch, then (128, True)
    assert (64, False) in calls and calls[-1] == (128, True)
    assert calls.index((64, False)) < calls.index((128, True))
