"""The engine layer under the training loop: single-process PyTorch or DeepSpeed, one interface.

The loop sees an :class:`Engine` per trained model (generator; discriminator at its stage)::

    out = engine(*inputs)          # forward (autocast applied where configured)
    engine.backward(loss)          # one backward per engine per step (ZeRO-2/3 need this)
    engine.step()                  # optimiser step (+ clipping, loss scaling), grads zeroed
    engine.skip()                  # drop this step's grads: a non-finite loss never reaches weights

and a :class:`Backend` for what spans engines: rank/world, device, input dtype, the loss autocast
context, ``any_true`` (an all-reduced flag so every rank skips the same step), barriers, full fp32
state dicts (gathered under ZeRO-3) and engine checkpoints (DeepSpeed's own format, written by
EVERY rank; rank-0-only saves hang under ZeRO).

``SingleBackend`` passes everything through to plain PyTorch (``train.precision`` fp32 | bf16 |
fp16 as autocast, fp16 with a GradScaler). ``DeepSpeedBackend`` calls ``deepspeed.initialize``
with a JSON config (configs/ds/*.json), re-initialised whenever the generator grows.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

_WARNED: set = set()
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Engine:
    """One model with its optimiser. Subclasses: :class:`SingleEngine`, :class:`DeepSpeedEngine`."""

    module: nn.Module
    optimizer: torch.optim.Optimizer

    def __call__(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def parameters(self):
        return self.module.parameters()

    def skip(self) -> None:
        """Zero the gradients and do not step (a non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.module.parameters():
            p.grad = None


class SingleEngine(Engine):
    """Plain PyTorch: autocast in forward for bf16/fp16, a GradScaler for fp16, optional clipping."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "fp32", grad_clip: float = 0.0, forward_fn: Optional[Callable] = None):
        self.module, self.optimizer, self.device = module, optimizer, device
        self.dtype = _DTYPES[precision]
        self.grad_clip = float(grad_clip)
        self.forward_fn = forward_fn or module
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, *args, **kwargs):
        with _autocast(self.device, self.dtype):
            return self.forward_fn(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)  # skips the step itself on inf grads (fp16)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class DeepSpeedEngine(Engine):
    """A ``deepspeed.DeepSpeedEngine`` behind the same interface."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name
        self.module = engine.module
        self.optimizer = engine.optimizer

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # steps at gradient-accumulation boundaries; zeroes grads itself

    def skip(self) -> None:
        # Reached only before backward (the all-reduced finite check), so nothing is accumulated:
        # skipping both backward and step keeps DeepSpeed's micro-step counters on every rank equal.
        self.engine.zero_grad()


class Backend:
    """What the loop needs besides engines. ``SingleBackend`` or ``DeepSpeedBackend``."""

    rank = 0
    world_size = 1
    local_rank = 0
    distributed = False
    device = torch.device("cpu")
    input_dtype = torch.float32
    loss_dtype: Optional[torch.dtype] = None
    description = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move to the device; channels_last on GPU; SyncBatchNorm across ranks on CUDA."""
        module = module.to(self.device)
        if self.device.type == "cuda" and self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    channels_last = True

    def loss_autocast(self):
        """Context for the loss computation (VGG in bf16/fp16 when the engine is)."""
        return _autocast(self.device, self.loss_dtype)

    def any_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (all ranks get the same answer)."""
        return bool(flag)

    def mean(self, value: float) -> float:
        return float(value)

    def barrier(self) -> None:
        pass

    def full_state_dict(self, engine: Engine) -> dict:
        """fp32 state dict of the whole module on CPU (collective under ZeRO-3: call on every rank)."""
        return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                for k, v in engine.module.state_dict().items()}

    def engine(self, name: str, module: nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int,
               forward_fn: Optional[Callable] = None) -> Engine:
        raise NotImplementedError

    def save_engines(self, directory: Path, engines: dict, client_state: Optional[dict] = None) -> None:
        raise NotImplementedError

    def load_engines(self, directory: Path, engines: dict) -> None:
        raise NotImplementedError


class SingleBackend(Backend):
    """One process, plain PyTorch (CPU or one GPU)."""

    def __init__(self, precision: str = "fp32", grad_clip: float = 0.0, device: Optional[str] = None,
                 channels_last: bool = True):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = precision
        self.grad_clip = grad_clip
        self.channels_last = channels_last
        self.loss_dtype = _DTYPES[precision] if precision != "fp32" else None
        self.description = f"single process on {self.device}, {precision}"

    def engine(self, name, module, optimizer, micro_batch, forward_fn=None) -> Engine:
        return SingleEngine(module, optimizer, self.device, self.precision, self.grad_clip, forward_fn)

    def save_engines(self, directory: Path, engines: dict, client_state: Optional[dict] = None) -> None:
        from hptransfer.checkpoint import atomic_torch_save
        for name, eng in engines.items():
            atomic_torch_save(eng.state_dict(), Path(directory) / f"{name}.pt")

    def load_engines(self, directory: Path, engines: dict) -> None:
        for name, eng in engines.items():
            path = Path(directory) / f"{name}.pt"
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint {directory} has no {name}.pt")
            eng.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))


def load_ds_config(path: str | Path) -> dict:
    """Read a DeepSpeed JSON config; a clear error naming the file when it is missing or bad."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {p}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: top level must be an object")
    return cfg


def resolve_ds_config(ds_cfg: dict, micro_batch: int, world_size: int, grad_clip: float, on_cuda: bool,
                      source: str = "<ds config>") -> dict:
    """Fill the per-stage fields of a DeepSpeed config; translate bf16 to torch_autocast on CPU.

    On CPU, DeepSpeed's ``"bf16": {"enabled": true}`` casts the module to bf16 and BatchNorm then
    fails (bf16 input, fp32 running stats), while ``torch_autocast`` bf16 trains: so it is translated.
    fp16 needs a GPU (loss scaling of a CPU fp16 module is not supported): a clear error.
    """
    cfg = copy.deepcopy(ds_cfg)
    cfg.pop("optimizer", None)  # our own torch optimiser is passed in (rebuilt at every growth)
    cfg.pop("scheduler", None)
    gas = int(cfg.get("gradient_accumulation_steps", 1) if cfg.get("gradient_accumulation_steps") != "auto" else 1)
    cfg["gradient_accumulation_steps"] = gas
    cfg["train_micro_batch_size_per_gpu"] = int(micro_batch)
    cfg["train_batch_size"] = int(micro_batch) * gas * int(world_size)
    if grad_clip > 0 and cfg.get("gradient_clipping", "auto") in ("auto", 0, 0.0):
        cfg["gradient_clipping"] = float(grad_clip)
    elif cfg.get("gradient_clipping") == "auto":
        cfg.pop("gradient_clipping")
    cfg.setdefault("steps_per_print", 10**9)
    if not on_cuda:
        if cfg.get("fp16", {}).get("enabled"):
            raise ValueError(f"{source}: fp16 needs a CUDA GPU; on CPU use a bf16 config (run as torch_autocast) or fp32")
        if cfg.get("bf16", {}).get("enabled"):
            (log.warning if source not in _WARNED else log.debug)("%s: bf16 on CPU breaks BatchNorm under DeepSpeed's bf16 mode; "
                        "running it as torch_autocast bf16 instead (fp32 weights, bf16 compute)", source)
            _WARNED.add(source)
            cfg["bf16"] = {"enabled": False}
            cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return cfg


class DeepSpeedBackend(Backend):
    """DeepSpeed engines (ZeRO 1/2/3, bf16/fp16), one per trained model, re-made at every growth."""

    distributed = True

    def __init__(self, ds_config: str | Path, grad_clip: float = 0.0, channels_last: bool = True):
        import deepspeed
        import torch.distributed as dist

        self.ds = deepspeed
        self.dist = dist
        self.source = str(ds_config)
        self.raw_config = load_ds_config(ds_config)
        self.grad_clip = grad_clip
        self.channels_last = channels_last
        deepspeed.init_distributed()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        cfg = resolve_ds_config(self.raw_config, 1, self.world_size, grad_clip, self.device.type == "cuda", self.source)
        if cfg.get("bf16", {}).get("enabled"):
            self.input_dtype = self.loss_dtype = torch.bfloat16
        elif cfg.get("fp16", {}).get("enabled"):
            self.input_dtype = self.loss_dtype = torch.float16
        elif cfg.get("torch_autocast", {}).get("enabled"):
            self.loss_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
                str(cfg["torch_autocast"].get("dtype", "bfloat16")).replace("torch.", ""), torch.bfloat16)
        self.zero_stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
        self.description = (f"DeepSpeed, {self.world_size} ranks on {self.device.type} "
                            f"({dist.get_backend()}), ZeRO-{self.zero_stage}, config {self.source}")

    def prepare(self, module: nn.Module) -> nn.Module:
        if self.device.type == "cuda" and self.world_size > 1:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # refuses CPU tensors: CUDA only
        return super().prepare(module)

    def any_true(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        t = torch.tensor([float(value)], device=self.device, dtype=torch.float64)
        self.dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def barrier(self) -> None:
        self.dist.barrier()

    def engine(self, name, module, optimizer, micro_batch, forward_fn=None) -> Engine:
        cfg = resolve_ds_config(self.raw_config, micro_batch, self.world_size, self.grad_clip,
                                self.device.type == "cuda", self.source)
        eng, _, _, _ = self.ds.initialize(model=module, optimizer=optimizer, config=cfg)
        return DeepSpeedEngine(eng, name)

    def full_state_dict(self, engine: Engine) -> dict:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        params = dict(engine.module.named_parameters())
        for k, v in engine.module.state_dict(keep_vars=True).items():
            if k in params and self.zero_stage > 0:
                full = safe_get_full_fp32_param(params[k])  # the fp32 master copy, gathered (ZeRO-3)
                v = full if full is not None else v
            v = v.detach()
            out[k] = v.float().cpu().clone() if v.is_floating_point() else v.cpu().clone()
        return out

    def save_engines(self, directory: Path, engines: dict, client_state: Optional[dict] = None) -> None:
        for name, eng in engines.items():  # every rank: each writes its ZeRO partition
            eng.engine.save_checkpoint(str(directory), tag=name, client_state={"hptransfer": client_state or {}},
                                       save_latest=False)

    def load_engines(self, directory: Path, engines: dict) -> None:
        for name, eng in engines.items():
            path, _ = eng.engine.load_checkpoint(str(directory), tag=name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
            if path is None:
                raise FileNotFoundError(f"DeepSpeed could not load {name} from {directory}")


def make_backend(cfg, ds_config: Optional[str] = None) -> Backend:
    """DeepSpeed when a DeepSpeed config is given, otherwise a single process."""
    if ds_config:
        return DeepSpeedBackend(ds_config, cfg.train.grad_clip, cfg.train.channels_last)
    return SingleBackend(cfg.train.precision, cfg.train.grad_clip, channels_last=cfg.train.channels_last)
