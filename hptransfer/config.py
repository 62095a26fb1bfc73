"""Typed experiment configuration: dataclasses loaded from YAML, overridden from the command line.

A config file has the sections below (every key optional, defaults are the paper's settings)::

    model: {width: 1.0, ...}
    data:  {root: data/synth, ...}
    loss:  {...}
    train: {...}
    stages: [{resolution: 64, iterations: 700000, batch_size: 16}, ...]

A stage may also set ``activation_checkpointing: true | false`` (e.g. ``{resolution: 1024, iterations:
700000, batch_size: 2, activation_checkpointing: true}``): the generator recomputes its blocks' activations
in backward during that stage only (less memory, ~a third more generator compute), applied when the
stage starts. Unset (null), the stage follows ``train.activation_checkpointing``, the switch for every
stage, so a config without the key means what it meant before.

Overrides are ``section.key=value`` (value parsed as YAML, so ``train.lr=1e-4``,
``data.flip=false``, ``loss.layers=[relu1_2,relu2_2]``); ``stages.0.iterations=100`` addresses a
stage, and ``stages=[{resolution: 64, iterations: 500, batch_size: 4}, {resolution: 128, ...}]`` (one
shell argument: quote it) replaces the whole list, e.g. to train fewer or other stages. An unknown key
or a value of the wrong type raises :class:`ConfigError` naming the key and where it came from: the
file that holds it, or the override. A key that was renamed (:data:`RENAMED_KEYS`) still loads under its new name, with
one warning per file naming the file and the new key (saved configs of older runs resume as they are).
"""
from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from hptransfer.errors import ConfigError  # noqa: F401  (public name here)

log = logging.getLogger(__name__)

RESOLUTIONS = (64, 128, 256, 512, 1024)
# old "section.key" -> new "section.key" (same section): read the old name, write only the new
RENAMED_KEYS = {"train.kernels": "train.impl"}
VGG_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")


@dataclass
class ModelConfig:
    width: float = 1.0  # scales every channel count; 1.0 = the paper (1024 channels at 32x32)
    bottleneck_size: int = 32
    bottleneck_channels: int = 1024
    num_keypoints: int = 18
    pose_sigma: float = 3.2  # in pixels of the 32x32 bottleneck grid; scaled with the grid
    pose_at_every_scale: bool = False  # also inject heatmaps at every decoder scale
    negative_slope: float = 0.2
    disc_shared: bool = False  # one discriminator shared by all descriptors instead of N grouped
    disc_channels: int = 64  # first-layer width of each local discriminator
    # Share of each grown stage over which the encoder's old input path (the previous stage's
    # from-RGB on the 2x-downsampled image) fades out into the new top encoder block. 0 = the paper
    # (no fade: new blocks train from scratch). See Generator.grow.
    input_fade: float = 0.0
    # With input_fade: the output fades too, over the same window. The previous stage's to-RGB is kept
    # and the output is tanh(alpha * new + (1 - alpha) * upsampled old) before the tanh, so a grown
    # generator starts as the previous stage's output, upsampled. Without it the fresh decoder block
    # amplifies the trained deeper features' outliers into saturated regions (README "Ablation").
    output_fade: bool = False


@dataclass
class DataConfig:
    root: str = "data/synth"
    train_split: str = "train"
    test_split: str = "test"
    loader: Literal["auto", "torch", "dali"] = "auto"
    workers: int = 2
    flip: bool = True
    skip_bad: bool = False
    fit: Literal["pad", "resize"] = "pad"


@dataclass
class LossConfig:
    vgg_weights: Optional[str] = None  # file path, "random" (tests only), "auto" (download once) or None = search
    layers: list = field(default_factory=lambda: list(VGG_LAYERS))
    layer_weights: Optional[list] = None  # equal weights when None
    global_weight: float = 1.0
    local_weight: float = 1.0
    local_min_crop: int = 32  # crops smaller than this are upsampled before VGG
    # At the discriminator stage the local discriminators replace the local perceptual loss (section
    # 3.2, "in replacement"); true keeps both there.
    local_perceptual_at_top: bool = False
    # Local descriptors per image (Fig. 4): "auto" = the paper's rule by resolution (18 at 64/128 px,
    # 31 at 256/512, 44 at 1024), or 18 / 31 / 44 at every stage; 0 = no local terms at all.
    descriptors: Union[Literal["auto"], int] = "auto"
    adv_weight: float = 0.01
    disc_lr: float = 2e-4
    disc_at_resolution: int = 1024  # local discriminators train only at this stage


@dataclass
class StageConfig:
    resolution: int = 64
    iterations: int = 700_000
    batch_size: int = 16  # per rank and micro-batch
    # this stage's activation checkpointing; None = train.activation_checkpointing (see the module docstring)
    activation_checkpointing: Optional[bool] = None
    # samples per optimiser step over all ranks; None = train.global_batch (see stage_global_batch)
    global_batch: Optional[int] = None


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    lr: float = 2e-4
    weight_decay: float = 5e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    optimizer: Literal["adam", "adamw"] = "adam"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    impl: Literal["auto", "fast", "reference"] = "auto"
    activation_checkpointing: bool = False
    channels_last: bool = True  # applied on GPU only
    # torch.compile of the generator: "blocks" = each encoder/decoder block and the bottleneck (static
    # shapes per stage), "full" = its whole forward; the first steps of every stage pay the compilation.
    # true / false (earlier configs) load as "full" / "off".
    compile: Union[bool, Literal["off", "blocks", "full"]] = "off"
    deterministic: bool = False
    log_every: int = 10
    sample_every: int = 200
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    tensorboard: bool = True
    grad_clip: float = 0.0
    # Learning rates ramp linearly from lr/N to lr over the first N iterations of every stage, so that
    # Adam's first, full-size steps on the blocks added by a growth do not knock the trained ones out
    # (paper-silent; 0 = constant lr, the paper's stated schedule). Recomputed from the stage's step, so
    # a resume inside the ramp is exact.
    warmup_iterations: int = 0
    # false: no progressive training (Table 1's baseline and LPL rows): ``stages`` collapses to one
    # stage at the top resolution with the top stage's batch size and all stages' iterations.
    progressive: bool = True
    # Where the ranks train: cuda refuses to start without a usable GPU (one line, exit 2); auto takes
    # the GPU when one works, else the CPU, and says so loudly when a launcher started several ranks.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Seconds a collective (all-reduce, barrier, the start-up rendezvous) may wait for the other ranks
    # before the run fails naming the rank (torch's init_process_group timeout; its default is 30 min).
    dist_timeout_s: int = 1800
    # Samples per optimiser step over all ranks, for every stage without its own stages.N.global_batch;
    # where batch_size x ranks is smaller the gradients of several micro-batches are accumulated, so
    # the schedule does not change with the node count. None: batch_size x ranks (no accumulation).
    global_batch: Optional[int] = None
    # BatchNorm statistics over every rank's micro-batch at once (SyncBatchNorm); false: each rank's
    # micro-batch alone, which makes a run independent of how its global batch is split (docs/cluster.md).
    sync_batchnorm: bool = True


@dataclass
class FlowConfig:
    """The appearance flow network of ``task: garment_flow`` (hptransfer.models.AppearanceFlow, hptransfer.flow_losses)."""
    levels: int = 4  # pyramid levels (coarsest flow at R / 2**levels)
    channels: int = 32  # features at R/2, doubling per level up to max_channels
    max_channels: int = 256
    l1_weight: float = 1.0  # L1 inside the target garment mask
    perceptual_weight: float = 1.0  # VGG (loss.layers) inside the target garment mask
    mask_weight: float = 1.0  # 1 - soft IoU of warped and target masks
    tv_weight: float = 0.01  # flow smoothness (total variation, pixels)
    numbering: Literal["lip", "cihp", "atr"] = "lip"  # of the parsing maps
    parsing_dir: str = "parsing"  # <data.root>/<parsing_dir>/<image stem>.png


@dataclass
class Config:
    # transfer: the pose-transfer generator (the paper's network); garment_flow: the appearance flow
    # network of garment transfer (section 4.5), trained by the same trainer (hptransfer.flow_task)
    task: Literal["transfer", "garment_flow"] = "transfer"
    flow: FlowConfig = field(default_factory=FlowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list = field(default_factory=lambda: [StageConfig(r) for r in RESOLUTIONS])

    def validate(self, source: str = "<config>") -> "Config":
        if not self.stages:
            raise ConfigError(f"{source}: 'stages' is empty")
        if not self.train.progressive and len(self.stages) > 1:  # idempotent: a saved config reloads the same
            top = self.stages[-1]
            self.stages = [StageConfig(top.resolution, sum(s.iterations for s in self.stages), top.batch_size,
                                       top.activation_checkpointing, top.global_batch)]
        resolutions = [s.resolution for s in self.stages]
        for i, s in enumerate(self.stages):
            if s.resolution not in RESOLUTIONS:
                raise ConfigError(f"{source}: stages.{i}.resolution={s.resolution} is not one of {RESOLUTIONS}")
            if s.iterations < 1 or s.batch_size < 1:
                raise ConfigError(f"{source}: stages.{i} needs iterations >= 1 and batch_size >= 1")
            wanted, key = ((s.global_batch, f"stages.{i}.global_batch") if s.global_batch is not None
                           else (self.train.global_batch, "train.global_batch"))
            if wanted is not None and (wanted < 1 or wanted % s.batch_size):
                raise ConfigError(f"{source}: {key}={wanted} must be a positive multiple of stages.{i}.batch_size="
                                  f"{s.batch_size} (the per-rank micro-batch)")
        expected = [resolutions[0] * 2**i for i in range(len(resolutions))]
        if resolutions != expected:
            raise ConfigError(f"{source}: stages must double from one to the next, got {resolutions}")
        for name in self.loss.layers:
            if name not in VGG_LAYERS:
                raise ConfigError(f"{source}: loss.layers has unknown layer {name!r}; known: {VGG_LAYERS}")
        if self.loss.layer_weights is not None and len(self.loss.layer_weights) != len(self.loss.layers):
            raise ConfigError(f"{source}: loss.layer_weights must have one weight per entry of loss.layers")
        if self.loss.descriptors not in ("auto", 0, 18, 31, 44):
            raise ConfigError(f"{source}: loss.descriptors must be auto, 0, 18, 31 or 44, got {self.loss.descriptors!r}")
        if self.task == "garment_flow":
            if self.data.loader == "dali":  # the DALI pipeline reads images and keypoints, not parsing maps
                raise ConfigError(f"{source}: task garment_flow needs data.loader torch (or auto), not dali")
            self.data.loader = "torch"
        if self.model.width <= 0:
            raise ConfigError(f"{source}: model.width must be > 0")
        if not 0.0 <= self.model.input_fade <= 1.0:
            raise ConfigError(f"{source}: model.input_fade must be in [0, 1], got {self.model.input_fade}")
        if self.model.output_fade and self.model.input_fade <= 0:
            raise ConfigError(f"{source}: model.output_fade fades over model.input_fade's window; set "
                              "model.input_fade > 0 (e.g. 1.0) or output_fade false")
        if isinstance(self.train.compile, bool):
            self.train.compile = "full" if self.train.compile else "off"
        if self.train.dist_timeout_s < 1:
            raise ConfigError(f"{source}: train.dist_timeout_s must be >= 1 (seconds), got {self.train.dist_timeout_s}")
        if self.train.warmup_iterations < 0:
            raise ConfigError(f"{source}: train.warmup_iterations must be >= 0, got {self.train.warmup_iterations}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` coerced to ``tp`` (int -> float allowed) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{source}: {key}={value!r} must be one of {list(typing.get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{source}: bad value for {key}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads "1e-4" (no dot) as a string; accept it as the number it is
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key}={value!r} must be true or false")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{source}: {key}={value!r} must be a number")
    if tp in (int, float, str, bool, list, dict) and not isinstance(value, tp):
        raise ConfigError(f"{source}: {key}={value!r} must be of type {tp.__name__}")
    return value


def _build(cls, data: Any, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{source}: unknown key {full!r}; known keys: {sorted(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full, source)
        elif cls is Config and key == "stages":
            if not isinstance(value, list):
                raise ConfigError(f"{source}: stages must be a list of mappings")
            kwargs[key] = [_build(StageConfig, v, f"stages.{i}", source) for i, v in enumerate(value)]
        else:
            kwargs[key] = _check_type(value, tp, full, source)
    return cls(**kwargs)


def _rename_old_keys(raw: dict, source: str) -> dict:
    """``raw`` (one file's sections, or a dict) with the keys of :data:`RENAMED_KEYS` under their new
    names; one warning naming ``source`` and the new keys. Both names in one source: ConfigError."""
    renamed = []
    for old, new in RENAMED_KEYS.items():
        (section, old_key), new_key = old.split("."), new.split(".")[1]
        node = raw.get(section)
        if not isinstance(node, dict) or old_key not in node:
            continue
        if new_key in node:
            raise ConfigError(f"{source}: both {old} (its old name) and {new}; keep {new} only")
        raw[section] = {(new_key if k == old_key else k): v for k, v in node.items()}
        renamed.append(f"{old} -> {new}")
    if renamed:
        log.warning("%s: renamed config key%s %s (loaded under the new name; update the file)", source,
                    "s" if len(renamed) > 1 else "", ", ".join(renamed))
    return raw


def _set_override(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key}: no stage {part!r} (there are {len(node)})")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {} if not (parts[i + 1].isdigit()) else [])
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {key}: index {last!r} out of range")
        node[int(last)] = value
    else:
        node[last] = value


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return raw


def merge_overlay(base: dict, overlay: dict) -> dict:
    """``overlay`` on ``base``: mappings merge key by key (recursively), anything else (values, lists
    such as ``stages``) is replaced whole by the overlay's."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overlay(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Optional[str | Path | list] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load ``path`` (YAML) and apply ``section.key=value`` overrides; validate the result.

    ``path`` may be a list of files: each is an overlay on the ones before it (later wins, see
    :func:`merge_overlay`), e.g. ``[base.yaml, configs/ablation/pt_lpl.yaml]``; overrides come last.
    """
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    source = " + ".join(str(p) for p in paths) if paths else "<defaults>"
    raw: dict = {}
    for p in paths:
        one = _rename_old_keys(_read_yaml(p), str(p))
        _build(Config, one, "", str(p))  # a typo or bad value inside this file is named with this file
        raw = merge_overlay(raw, one)
    if "stages" not in raw:
        raw["stages"] = [dataclasses.asdict(s) for s in Config().stages]
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in RENAMED_KEYS:
            log.warning("override %s: renamed config key %s -> %s (applied under the new name)", item, key,
                        RENAMED_KEYS[key])
            key = RENAMED_KEYS[key]
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _set_override(raw, key, value)
        _build(Config, raw, "", f"override {item!r}")  # a bad key or value is named with its override
    where = source + (" (with overrides)" if overrides else "")
    return _build(Config, raw, "", where).validate(where)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    data = _rename_old_keys(dict(data), source) if isinstance(data, dict) else data
    return _build(Config, data, "", source).validate(source)


def stage_global_batch(cfg: Config, idx: int, world_size: int) -> tuple:
    """(samples per optimiser step, micro-batches accumulated per step on each rank) of stage ``idx`` on
    ``world_size`` ranks: stages.N.global_batch, else train.global_batch, else batch_size x ranks.
    ConfigError when the global batch is not a whole number of batch_size x ranks."""
    st = cfg.stages[idx]
    wanted = st.global_batch if st.global_batch is not None else cfg.train.global_batch
    per_step = st.batch_size * world_size
    if wanted is None:
        return per_step, 1
    if wanted % per_step:
        key = f"stages.{idx}.global_batch" if st.global_batch is not None else "train.global_batch"
        raise ConfigError(f"{key}={wanted} is not a multiple of stages.{idx}.batch_size={st.batch_size} x {world_size} "
                          f"ranks = {per_step}: choose a global batch divisible by {per_step}, or a batch_size "
                          f"that divides {wanted} / {world_size}")
    return wanted, wanted // per_step


def channels_at(resolution: int, model: ModelConfig) -> int:
    """Feature channels at a spatial size: bottleneck_channels at bottleneck_size, halving per doubling."""
    ch = model.bottleneck_channels * model.bottleneck_size / resolution * model.width
    return max(int(round(ch)), 4)
