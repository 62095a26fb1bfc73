"""Where a run starts, single process: an out_dir holding checkpoints is never overwritten by
accident (--resume or --overwrite), a dangling ``latest`` falls back to the newest complete
checkpoint, the resume decision is rank 0's (broadcast), what cannot load is refused clearly (the
other backend's format) and ZeRO shards of another world size go to resharding. Also the DeepSpeed
config translation (one mixed-precision mechanism on CPU and GPU; the accumulation steps are the
trainer's). The synchronised BatchNorm has its own tests (tests/test_sync_batchnorm.py).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hptransfer import checkpoint as ckpt
from hptransfer.errors import CheckpointError, OutputExistsError
from hptransfer.train import _resume_point, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from test_train import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth"))


def _cfg(data_root, out, iterations=1):
    from test_train import tiny_cfg

    return tiny_cfg(data_root, out, "train.sample_every=0", "loss.layers=[relu1_2]",
                    f"stages=[{{resolution: 64, iterations: {iterations}, batch_size: 2}}]")


def _write_checkpoints(root: Path, steps) -> None:
    for step in steps:
        tmp = ckpt.begin(root, step, True)
        ckpt.finish(root, tmp, {"state": {"global_step": step}}, keep=0, is_main=True)


# ----------------------------------------------------------------------------- out_dir and resume
def test_out_dir_with_checkpoints_needs_resume_or_overwrite(data_root, tmp_path):
    os.environ["HPTRANSFER_NO_BAR"] = "1"
    out = tmp_path / "run"
    first = train(_cfg(data_root, out))
    assert ckpt.read_latest(out / "checkpoints").name == "step_00000001"
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(OutputExistsError, match="already holds checkpoints.*--resume.*--overwrite"):
        train(_cfg(data_root, out, iterations=2))
    # refused before anything was written: the old run's config and checkpoints are untouched
    assert (out / "config.yaml").read_text() == config_before
    assert [p.name for p in ckpt.complete(out / "checkpoints")] == ["step_00000001"]
    with pytest.raises(ValueError, match="exclude each other"):
        train(_cfg(data_root, out), resume="auto", overwrite=True)
    # --overwrite starts afresh: the old checkpoints go, the new run's are all that is left
    _write_checkpoints(out / "checkpoints", [7])  # a later step of the old run that must not survive
    again = train(_cfg(data_root, out), overwrite=True)
    assert [p.name for p in ckpt.complete(out / "checkpoints")] == ["step_00000001"]
    assert again["global_step"] == 1
    assert all(torch.equal(first["generator_state"][k], again["generator_state"][k]) for k in first["generator_state"])


def test_resume_of_a_finished_run_reexports(data_root, tmp_path):
    """What a second `make demo` does: resuming a finished run trains nothing and exports again."""
    out = tmp_path / "run"
    first = train(_cfg(data_root, out))
    (out / "export" / "model.safetensors").unlink()
    again = train(_cfg(data_root, out), resume="auto")
    assert again["global_step"] == 1 and (out / "export" / "model.safetensors").is_file()
    assert all(torch.equal(first["generator_state"][k], again["generator_state"][k]) for k in first["generator_state"])


def test_dangling_latest_falls_back_to_newest_complete(tmp_path, caplog):
    root = tmp_path / "out" / "checkpoints"
    _write_checkpoints(root, [1, 2, 3])
    ckpt.begin(root, 4, True)  # a crash while writing step 4: only its .tmp- directory exists
    (root / ckpt.LATEST).write_text("step_00000009\n")  # names a checkpoint that is gone
    with caplog.at_level(logging.WARNING, logger="hptransfer.checkpoint"):
        assert ckpt.resolve("auto", tmp_path / "out").name == "step_00000003"
    assert "not a complete checkpoint" in caplog.text and "step_00000003" in caplog.text
    assert ckpt.resolve(str(root), tmp_path).name == "step_00000003"  # a checkpoints root given as a path
    (root / ckpt.LATEST).unlink()  # a crash between the rename and the pointer
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hptransfer.checkpoint"):
        assert ckpt.find_latest(root).name == "step_00000003"
    assert "is missing" in caplog.text
    assert ckpt.find_latest(tmp_path / "empty") is None


class _Rank1:
    """Rank 1 of two: its own view of the disk is never consulted; rank 0's decision arrives by broadcast."""

    rank, world_size, is_main, distributed, zero_stage = 1, 2, False, True, 2

    def __init__(self, decision):
        self.decision, self.sent = decision, []

    def broadcast_object(self, obj):
        self.sent.append(obj)
        return self.decision


def test_resume_decision_is_rank0s(tmp_path):
    chosen = tmp_path / "out" / "checkpoints" / "step_00000003"
    meta = {"state": {"global_step": 3}}
    backend = _Rank1(("ok", chosen, meta))
    # rank 1 sees no checkpoint at all (tmp_path/out does not exist on its "disk"), yet resumes rank 0's
    assert _resume_point("auto", False, tmp_path / "out", backend) == (chosen, meta)
    assert backend.sent == [None]
    refused = OutputExistsError("out already holds checkpoints")
    with pytest.raises(OutputExistsError):  # rank 0's refusal is raised on rank 1 too: nobody hangs
        _resume_point(None, False, tmp_path / "out", _Rank1(("error", refused, None)))


class _Backend:
    def __init__(self, distributed, world_size, zero_stage=0):
        self.distributed, self.world_size, self.zero_stage = distributed, world_size, zero_stage
        self.rank, self.is_main = 0, True

    def broadcast_object(self, obj):
        return obj


def test_zero_shards_of_another_world_size_resume_resharded(tmp_path, caplog):
    from hptransfer.distributed.reshard import needs_universal

    out = tmp_path / "out"
    root = out / "checkpoints"
    tmp = ckpt.begin(root, 5, True)
    (tmp / "generator").mkdir()
    meta = {"state": {"global_step": 5}, "world_size": 2, "backend": "deepspeed", "zero_stage": 2,
            "zero_stages": {"generator": 2}, "engines": ["generator"]}
    ckpt.finish(root, tmp, meta, keep=0, is_main=True)
    with caplog.at_level(logging.WARNING, logger="hptransfer.train"):
        assert _resume_point("auto", False, out, _Backend(True, 4, 2))[0].name == "step_00000005"
    assert "written by 2 ranks, resuming on 4" in caplog.text and "resharded" in caplog.text
    with pytest.raises(CheckpointError, match="written by DeepSpeed.*--init-from"):
        _resume_point("auto", False, out, _Backend(False, 1))
    # what goes through DeepSpeed's universal checkpoint: ZeRO shards of another world size or stage
    assert needs_universal(meta, 4, {"generator": 2}) and needs_universal(meta, 1, {"generator": 2})
    assert not needs_universal(meta, 2, {"generator": 2})
    assert needs_universal(meta, 2, {"generator": 3})
    assert not needs_universal({**meta, "zero_stages": {"generator": 0}}, 4, {"generator": 0})  # no shards
    assert not needs_universal({**meta, "backend": "single"}, 4, {"generator": 2})
    older = {k: v for k, v in meta.items() if k != "zero_stages"}  # before per-engine stages were recorded
    assert needs_universal(older, 1, {"generator": 2}) and not needs_universal(older, 2, {"generator": 2})


def test_checkpoint_meta_names_backend_and_zero_stage(data_root, tmp_path):
    train(_cfg(data_root, tmp_path))
    meta = ckpt.read_meta(ckpt.read_latest(tmp_path / "checkpoints"))
    assert meta["backend"] == "single" and meta["zero_stage"] == 0 and meta["world_size"] == 1


# ----------------------------------------------------------------------------- DeepSpeed configs
def test_ds_configs_are_autocast_on_every_device():
    from hptransfer.backend import autocast_dtype, load_ds_config, resolve_ds_config

    from hptransfer.backend import ENGINE_NAMES, engine_ds_config

    for path, name in ((p, n) for p in sorted((ROOT / "configs" / "ds").glob("zero*_*.json")) for n in ENGINE_NAMES):
        cfg = resolve_ds_config(engine_ds_config(load_ds_config(path), name, str(path)), micro_batch=4, world_size=2,
                                grad_clip=0.0, source=str(path))
        assert "hptransfer_engines" not in cfg
        want = torch.bfloat16 if "bf16" in path.name else torch.float16
        assert autocast_dtype(cfg) == want and "bf16" not in cfg and "fp16" not in cfg, path
        assert cfg["train_batch_size"] == 8 and cfg["gradient_accumulation_steps"] == 1
        cfg = resolve_ds_config(engine_ds_config(load_ds_config(path), name, str(path)), micro_batch=4, world_size=2,
                                grad_clip=0.0, source=str(path), accumulation=3)  # train.global_batch 24 on 2 ranks
        assert cfg["train_batch_size"] == 24 and cfg["gradient_accumulation_steps"] == 3
    # DeepSpeed's own bf16/fp16 sections (casting the module, BatchNorm buffers included) are translated
    for name, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        cfg = resolve_ds_config({name: {"enabled": True}, "zero_optimization": {"stage": 2}}, 2, 2, 0.0)
        assert cfg["torch_autocast"] == {"enabled": True, "dtype": dtype} and name not in cfg
    clip = resolve_ds_config({"bf16": {"enabled": True}, "gradient_clipping": "auto"}, 2, 2, 1.0)
    assert clip["gradient_clipping"] == 1.0


def test_engine_overlays_give_each_engine_its_own_section():
    from hptransfer.backend import engine_ds_config

    raw = {"zero_optimization": {"stage": 2, "overlap_comm": True}, "steps_per_print": 10,
           "hptransfer_engines": {"generator": {"zero_optimization": {"stage": 1}}}}
    g, d = engine_ds_config(raw, "generator"), engine_ds_config(raw, "discriminator")
    assert g["zero_optimization"] == {"stage": 1, "overlap_comm": True}  # merged key by key
    assert d["zero_optimization"] == {"stage": 2, "overlap_comm": True} and d["steps_per_print"] == 10
    assert raw["zero_optimization"]["stage"] == 2  # the raw config is not modified
    with pytest.raises(ValueError, match="hptransfer_engines must map engine names"):
        engine_ds_config({"hptransfer_engines": {"generatr": {}}}, "generator", "x.json")


@pytest.mark.parametrize("bad, match", [
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2 is not read: set the global batch"),
    ({"train_batch_size": 64}, "train_batch_size=64 is not read: set the global batch"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both enabled"),
    ({"torch_autocast": {"enabled": True, "dtype": "int8"}}, "expected bfloat16 or float16"),
    ({"torch_autocast": {"enabled": True, "dtype": "float16"}, "zero_optimization": {"stage": 2},
      "gradient_clipping": 1.0}, "clips the loss-scaled gradients"),
])
def test_ds_config_refusals_name_the_file(bad, match):
    from hptransfer.backend import resolve_ds_config

    with pytest.raises(ValueError, match=match) as e:
        resolve_ds_config(bad, 2, 2, 0.0, source="my_ds.json")
    assert "my_ds.json" in str(e.value)


def test_accumulation_needs_zero():
    from hptransfer.backend import resolve_ds_config

    with pytest.raises(ValueError, match="my_ds.json: gradient accumulation under DeepSpeed needs ZeRO"):
        resolve_ds_config({"zero_optimization": {"stage": 0}}, 2, 2, 0.0, source="my_ds.json", accumulation=2)
    assert resolve_ds_config({"zero_optimization": {"stage": 0}}, 2, 2, 0.0)["gradient_accumulation_steps"] == 1


def test_accumulation_of_the_ds_config_refused_before_any_rank_starts(tmp_path):
    from hptransfer.backend import DeepSpeedBackend

    path = tmp_path / "gas.json"
    path.write_text(json.dumps({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ValueError, match=f"{path}: gradient_accumulation_steps=4"):
        DeepSpeedBackend(path)


# ----------------------------------------------------------------------------- the DeepSpeed engine wrapper
class _FakeZeroOptimizer:
    def __init__(self, scaler):
        self.torch_autocast_gradscaler, self.overflow = scaler, False


class _FakeDeepSpeed:
    """The parts of a deepspeed.DeepSpeedEngine the wrapper touches."""

    def __init__(self, module, scaler=None):
        self.module, self.optimizer, self.calls = module, _FakeZeroOptimizer(scaler), 0

    def zero_optimization_stage(self):
        return 2

    def gradient_accumulation_steps(self):
        return 1

    def torch_autocast_enabled(self):
        return False

    def step(self):
        self.optimizer.overflow = True  # this step's gradients overflowed: DeepSpeed dropped it

    def __call__(self, *args):
        self.calls += 1
        return self.module(*args)


def test_fp16_loss_scale_backs_off_when_zero_drops_an_overflowing_step():
    from hptransfer.backend import DeepSpeedEngine

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler.scale(torch.ones(()))  # DeepSpeed's backward scales the loss first
    eng = DeepSpeedEngine(_FakeDeepSpeed(nn.Linear(2, 2), scaler), "generator")
    eng.step()
    eng.step()
    assert eng.loss_scale() == 256.0  # halved per dropped step, as GradScaler does after an inf
    assert scaler.state_dict()["_growth_tracker"] == 0


def test_frozen_discriminator_bypasses_the_deepspeed_forward():
    """The generator's adversarial term runs the frozen discriminator; DeepSpeed's forward would hook
    its outputs and run the discriminator engine's gradient reduction inside the generator's backward
    (an IndexError in DeepSpeed 0.19's ZeRO-2 buckets)."""
    from hptransfer.backend import DeepSpeedEngine
    from hptransfer.losses import generator_adversarial_loss

    fake = _FakeDeepSpeed(nn.Sequential(nn.Linear(4, 1), nn.Flatten(-2)))  # (B, N, 4) -> (B, N) logits
    eng = DeepSpeedEngine(fake, "discriminator")
    x = torch.randn(3, 4, requires_grad=True)
    loss = generator_adversarial_loss(eng, x.unsqueeze(0), torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    assert fake.calls == 0 and x.grad is not None  # the module ran, the engine's forward did not
    assert all(p.requires_grad and p.grad is None for p in fake.module.parameters())
    eng(x.unsqueeze(0))  # trainable: DeepSpeed's forward
    assert fake.calls == 1
