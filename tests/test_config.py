"""Config loading: errors name the key and the file; overrides, including stages.N.key."""
from __future__ import annotations

import pytest

from hptransfer.config import (Config, ConfigError, ModelConfig, StageConfig, channels_at, config_from_dict,
                               load_config, save_config)


def write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_the_paper():
    cfg = load_config()
    assert [s.resolution for s in cfg.stages] == [64, 128, 256, 512, 1024]
    assert all(s.iterations == 700_000 for s in cfg.stages)
    assert cfg.train.lr == 2e-4 and cfg.train.weight_decay == 5e-4
    assert cfg.model.pose_sigma == 3.2 and cfg.model.negative_slope == 0.2


def test_file_values_and_int_to_float(tmp_path):
    p = write(tmp_path, "model: {width: 1}\ntrain: {lr: 1.0e-3, seed: 7}\n"
                        "stages: [{resolution: 64, iterations: 5, batch_size: 2}, {resolution: 128, iterations: 6}]\n")
    cfg = load_config(p)
    assert cfg.model.width == 1.0 and isinstance(cfg.model.width, float)
    assert cfg.train.lr == 1e-3 and cfg.train.seed == 7
    assert [(s.resolution, s.iterations, s.batch_size) for s in cfg.stages] == [(64, 5, 2), (128, 6, 16)]


@pytest.mark.parametrize("text, key", [
    ("model: {widht: 1.0}\n", "model.widht"),
    ("trian: {lr: 1.0}\n", "trian"),
    ("stages: [{resolution: 64, iters: 3}]\n", "stages.0.iters"),
])
def test_unknown_key_names_key_and_file(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert key in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("text, key", [
    ("model: {width: wide}\n", "model.width"),
    ("data: {flip: 3}\n", "data.flip"),
    ("train: {seed: 1.5}\n", "train.seed"),
    ("train: {precision: fp8}\n", "train.precision"),
    ("train: {log_every: true}\n", "train.log_every"),
])
def test_bad_type_names_key_and_file(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert key in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("stages, needle", [
    ("[{resolution: 64}, {resolution: 256}]", "double"),
    ("[{resolution: 64}, {resolution: 100}]", "stages.1.resolution"),
    ("[]", "empty"),
    ("[{resolution: 64, iterations: 0}]", "stages.0"),
    ("{resolution: 64}", "stages"),
])
def test_bad_stage_list(tmp_path, stages, needle):
    p = write(tmp_path, f"stages: {stages}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_overrides(tmp_path):
    p = write(tmp_path, "train: {lr: 1.0e-3}\n")
    cfg = load_config(p, ["train.lr=1e-4", "data.flip=false", "loss.layers=[relu1_2,relu2_2]",
                          "stages.0.iterations=100", "stages.4.batch_size=1", "model.pose_at_every_scale=true"])
    assert cfg.train.lr == 1e-4 and cfg.data.flip is False
    assert cfg.loss.layers == ["relu1_2", "relu2_2"]
    assert cfg.stages[0].iterations == 100 and cfg.stages[4].batch_size == 1
    assert cfg.stages[1].iterations == 700_000
    assert cfg.model.pose_at_every_scale is True


@pytest.mark.parametrize("override, needle", [
    ("model.nope=1", "model.nope"),
    ("stages.9.iterations=1", "9"),
    ("train.lr", "section.key=value"),
    ("loss.layers=[relu9_9]", "relu9_9"),
    ("train.optimizer=sgd", "train.optimizer"),
])
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = write(tmp_path, "model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(None, ["model.width=0.125", "stages.0.iterations=3"])
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    assert not (tmp_path / "resolved.yaml.tmp").exists()
    again = load_config(out)
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_channels_at():
    paper = ModelConfig()
    assert [channels_at(r, paper) for r in (32, 64, 128, 256, 512, 1024)] == [1024, 512, 256, 128, 64, 32]
    eighth = ModelConfig(width=0.125)
    assert [channels_at(r, eighth) for r in (32, 64, 1024)] == [128, 64, 4]


def test_stage_config_defaults():
    assert Config().stages[2] == StageConfig(256, 700_000, 16)


def test_override_into_a_value_is_an_error(tmp_path):
    p = write(tmp_path, "train: {lr: 1.0e-3}\n")
    with pytest.raises(ConfigError, match="train.lr is a value"):
        load_config(p, ["train.lr.x=1"])


def test_exponent_without_dot_is_a_float(tmp_path):
    p = write(tmp_path, "train: {lr: 1e-4}\nloss: {adv_weight: 5e-3}\n")  # PyYAML reads these as strings
    cfg = load_config(p)
    assert cfg.train.lr == 1e-4 and cfg.loss.adv_weight == 5e-3


def test_renamed_key_loads_under_its_new_name_with_one_warning(tmp_path, caplog):
    """A config saved before ``train.kernels`` became ``train.impl`` (runs/*/config.yaml, ablation configs)
    still loads, as the new key, with one warning naming the file and the new key; it saves the new name."""
    old = load_config(None, ["train.impl=reference", "stages.0.iterations=3"]).to_dict()
    old["train"] = {("kernels" if k == "impl" else k): v for k, v in old["train"].items()}
    p = tmp_path / "config.yaml"
    save_config(Config(), p)
    p.write_text(p.read_text().replace("  impl: auto\n", "  kernels: reference\n"))
    assert "kernels: reference" in p.read_text()
    with caplog.at_level("WARNING", logger="hptransfer.config"):
        cfg = load_config(p)
    assert cfg.train.impl == "reference"
    warnings = [r.getMessage() for r in caplog.records if r.name == "hptransfer.config"]
    assert len(warnings) == 1 and str(p) in warnings[0] and "train.impl" in warnings[0], warnings
    save_config(cfg, tmp_path / "again.yaml")
    text = (tmp_path / "again.yaml").read_text()
    assert "impl: reference" in text and "kernels" not in text
    # a saved dict (checkpoint-side configs) and a later overlay with the old key
    assert config_from_dict(old).train.impl == "reference"
    base = write(tmp_path, "train: {impl: fast}\n", "base.yaml")
    overlay = write(tmp_path, "train: {kernels: reference}\n", "overlay.yaml")
    assert load_config([base, overlay]).train.impl == "reference"  # later wins, whatever the name
    assert load_config([overlay, base]).train.impl == "fast"


def test_renamed_key_in_overrides_and_both_names_at_once(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="hptransfer.config"):
        assert load_config(None, ["train.kernels=fast"]).train.impl == "fast"
    assert any("train.kernels -> train.impl" in r.getMessage() for r in caplog.records)
    p = write(tmp_path, "train: {kernels: fast, impl: reference}\n")
    with pytest.raises(ConfigError, match="both train.kernels"):
        load_config(p)


def test_fade_settings_are_checked():
    with pytest.raises(ConfigError, match=r"model.input_fade must be in \[0, 1\]"):
        load_config(None, ["model.input_fade=1.5"])
    with pytest.raises(ConfigError, match="model.output_fade fades over model.input_fade's window"):
        load_config(None, ["model.output_fade=true"])
    assert load_config(None, ["model.input_fade=0.5", "model.output_fade=true"]).model.output_fade is True


def test_a_typo_inside_a_file_is_named_with_that_file_not_the_overrides(tmp_path):
    base = write(tmp_path, "train: {lr: 1.0e-3}\n")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model: {widht: 0.5}\n")
    with pytest.raises(ConfigError) as e:
        load_config([base, overlay], ["train.seed=1"])
    msg = str(e.value)
    assert msg.startswith(f"{overlay}: unknown key 'model.widht'") and "with overrides" not in msg
    with pytest.raises(ConfigError) as e:  # a bad value given by an override: named with the override
        load_config(base, ["train.seed=1", "train.lr=fast"])
    assert str(e.value).startswith("override 'train.lr=fast': train.lr='fast'")


def test_stages_replaced_whole_by_an_override(tmp_path):
    p = write(tmp_path, "stages: [{resolution: 64, iterations: 9, batch_size: 8}, {resolution: 128}]\n")
    cfg = load_config(p, ["stages=[{resolution: 128, iterations: 5, batch_size: 2}, "
                          "{resolution: 256, iterations: 7, batch_size: 1}]", "stages.1.iterations=8"])
    assert [(s.resolution, s.iterations, s.batch_size) for s in cfg.stages] == [(128, 5, 2), (256, 8, 1)]
