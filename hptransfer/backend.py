"""The engine layer under the training loop: single-process PyTorch or DeepSpeed, one interface.

The loop sees an :class:`Engine` per trained model (generator; discriminator at its stage), one
micro-batch at a time; ``accumulation`` micro-batches make one optimiser step (a *window*)::

    out = engine(*inputs)          # forward (autocast applied where configured)
    engine.backward(loss)          # one backward per engine per micro-batch (ZeRO-2/3 need this)
    engine.step()                  # after every micro-batch; the optimiser steps after the window's last
    engine.skip(loss)              # instead of backward + step: a non-finite micro-batch drops its window

and a :class:`Backend` for what spans engines: rank/world, device, input dtype, the loss autocast
context, ``max_over_ranks`` (all-reduced flags, so every rank skips the same step), barriers, full fp32
state dicts (gathered under ZeRO-3) and engine checkpoints (DeepSpeed's own format, written by
EVERY rank; rank-0-only saves hang under ZeRO).

``SingleBackend`` passes everything through to plain PyTorch (``train.precision`` fp32 | bf16 |
fp16 as autocast, fp16 with a GradScaler). ``DeepSpeedBackend`` calls ``deepspeed.initialize``
with a JSON config (configs/ds/*.json), re-initialised whenever the generator grows.

Mixed precision is ONE mechanism on every device: torch autocast with fp32 weights, fp32 optimiser
state and fp32 BatchNorm buffers (DeepSpeed's ``torch_autocast`` section; a ``bf16``/``fp16``
section is translated to it on CPU and GPU alike, so the CPU tests run the engine a GPU user gets).
DeepSpeed's ``bf16``/``fp16`` modes cast the whole module, BatchNorm running statistics included,
which then lose small updates and reach the export rounded. fp16 is loss-scaled by DeepSpeed's own
GradScaler (see :meth:`DeepSpeedEngine.step` for the one DeepSpeed 0.19 gap it fills). Across ranks
BatchNorm is synchronised by :class:`AllReduceBatchNorm` on every device (torch's statistics, no host
sync per layer).
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

from hptransfer.distributed import launch
from hptransfer.distributed.launch import World
from hptransfer.errors import LaunchError

log = logging.getLogger(__name__)

_WARNED: set = set()
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Engine:
    """One model with its optimiser. Subclasses: :class:`SingleEngine`, :class:`DeepSpeedEngine`.

    A window is ``accumulation`` micro-batches, each ``forward``, then ``backward`` + ``step`` or ``skip``
    (every rank makes the same calls: the finite flags are all-reduced). A window with a skipped
    micro-batch is dropped whole: no optimiser step, and the module's buffers (BatchNorm running
    statistics) are put back as they were before its first forward."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    accumulation = 1
    _micro = 0  # micro-batches of the current window done (step or skip)
    _dropping = False  # the current window had a non-finite micro-batch
    _saved_buffers: Optional[list] = None  # the module's buffers at the window's start

    def _window_forward(self) -> None:
        """Before any forward: the window's first keeps the buffers a dropped window restores."""
        if self._saved_buffers is None:
            self._saved_buffers = [b.detach().clone() for b in self.module.buffers()]

    def _end_micro(self) -> tuple:
        """After a micro-batch's step or skip: (window ended, window dropped). At a dropped window's end
        the buffers are restored; at every end the bookkeeping starts again."""
        self._micro += 1
        if self._micro < self.accumulation:
            return False, False
        dropped = self._dropping
        if dropped and self._saved_buffers is not None:
            with torch.no_grad():
                for b, saved in zip(self.module.buffers(), self._saved_buffers):
                    b.copy_(saved)
        self._micro, self._dropping, self._saved_buffers = 0, False, None
        return True, dropped

    def __call__(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def skip(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def parameters(self):
        return self.module.parameters()

    def loss_scale(self) -> Optional[float]:
        """The fp16 loss scale (a host read: for log steps), None without loss scaling."""
        return None

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.module.parameters():
            p.grad = None


class SingleEngine(Engine):
    """Plain PyTorch: autocast in forward for bf16/fp16, a GradScaler for fp16, optional clipping;
    gradients of ``accumulation`` micro-batches summed (each loss divided by it) before the step."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "fp32", grad_clip: float = 0.0, forward_fn: Optional[Callable] = None,
                 accumulation: int = 1):
        self.module, self.optimizer, self.device = module, optimizer, device
        self.dtype = _DTYPES[precision]
        self.grad_clip = float(grad_clip)
        self.forward_fn = forward_fn or module
        self.accumulation = int(accumulation)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, *args, **kwargs):
        self._window_forward()
        with _autocast(self.device, self.dtype):
            return self.forward_fn(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        if not self._dropping:  # a dropped window's gradients are gone: nothing more to add
            self.scaler.scale(loss / self.accumulation if self.accumulation > 1 else loss).backward()

    def step(self) -> None:
        ended, dropped = self._end_micro()
        if not ended:
            return
        if not dropped:
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)  # skips the step itself on inf grads (fp16)
            self.scaler.update()
        self._zero_grad()

    def skip(self, loss: torch.Tensor) -> None:
        self._dropping = True
        self._zero_grad()  # the window's gradients so far
        self._end_micro()

    def loss_scale(self) -> Optional[float]:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else None

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class DeepSpeedEngine(Engine):
    """A ``deepspeed.DeepSpeedEngine`` behind the same interface; its ``gradient_accumulation_steps`` is
    the window (DeepSpeed divides each loss by it and steps at the boundary)."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name
        self.module = engine.module
        self.optimizer = engine.optimizer
        self.accumulation = int(engine.gradient_accumulation_steps())
        # fp16 autocast: DeepSpeed's GradScaler (in the ZeRO optimiser, or the engine's without ZeRO).
        self.scaler = (getattr(engine.optimizer, "torch_autocast_gradscaler", None)
                       or getattr(engine, "torch_autocast_z0_gradscaler", None))
        self.zero = engine.zero_optimization_stage() > 0

    def __call__(self, *args, **kwargs):
        self._window_forward()
        if not any(p.requires_grad for p in self.module.parameters()):
            # A frozen use (the discriminator inside the generator's adversarial term): DeepSpeed's
            # forward hooks its outputs and would run THIS engine's backward bookkeeping (gradient
            # buckets, post-backward reduction) inside the other engine's backward.
            from deepspeed.runtime.torch_autocast import autocast_if_enabled

            with autocast_if_enabled(self.engine):
                return self.module(*args, **kwargs)
        return self.engine(*args, **kwargs)  # the engine applies its torch_autocast section

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # steps at gradient-accumulation boundaries; zeroes grads itself
        ended, dropped = self._end_micro()
        if dropped:
            # the poisoned window (see skip): DeepSpeed's overflow check must have dropped it
            if self.engine.was_step_applied():
                raise RuntimeError(f"{self.name}: DeepSpeed applied an optimiser step whose gradients were made "
                                   "non-finite to drop it; this DeepSpeed version does not skip such steps")
        elif (ended and self.scaler is not None and self.zero
              and getattr(self.engine.optimizer, "overflow", False)):
            # DeepSpeed 0.19 under ZeRO drops an overflowing step (inf grad norm) before its GradScaler
            # sees the inf, so the scale never backs off and every later step overflows too.
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            self.scaler._growth_tracker.zero_()  # as GradScaler does after an inf: count good steps anew

    def skip(self, loss: torch.Tensor) -> None:
        if self.accumulation == 1:
            # Reached only before backward (the all-reduced finite check), so nothing is accumulated:
            # skipping both backward and step keeps DeepSpeed's micro-step counters on every rank equal.
            self._dropping = True
            self.engine.zero_grad()
            self._end_micro()
            return
        # Inside a window earlier micro-batches' gradients are already reduced into ZeRO's partitions.
        # DeepSpeed's own way to drop such a step is its overflow check at the boundary (a non-finite
        # gradient norm: no update, gradients cleared, on every ZeRO stage), so this micro-batch's
        # gradients are made NaN (later micro-batches add to NaN). Every micro-batch still has one
        # backward and one step, so the counters and the boundary's reduction run as usual.
        if not loss.requires_grad:
            raise RuntimeError(f"{self.name}: a non-finite loss without a graph cannot drop an accumulated "
                               "DeepSpeed step")
        self._dropping = True
        self.engine.backward(loss * float("nan"))
        self.step()

    def loss_scale(self) -> Optional[float]:
        """The fp16 loss scale, None without loss scaling."""
        return float(self.scaler.get_scale()) if self.scaler is not None else None


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view([1, -1] + [1] * (x.dim() - 2))


# The four per-rank pieces of a synchronised BatchNorm. On CUDA: torch's fused kernels, those its own
# SyncBatchNorm runs (fp32 statistics of bf16/fp16 inputs, channels_last). Elsewhere: the same arithmetic
# in plain torch ops, in fp32 (fp64 for fp64).
def _local_moments(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of this rank's ``x`` (non-empty)."""
    if x.is_cuda:
        mean, invstd = torch.batch_norm_stats(x, eps)
        return mean, (invstd.pow(-2) - eps).clamp_min(0.0)  # the variance as torch's SyncBatchNorm recovers it
    var, mean = torch.var_mean(x.to(_acc_dtype(x)), [0] + list(range(2, x.dim())), correction=0)
    return mean, var


def _normalize(x, weight, bias, mean, invstd, eps):
    if x.is_cuda:
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    y = (x.to(mean.dtype) - _channel_view(mean, x)) * _channel_view(scale, x)
    return (y if bias is None else y + _channel_view(bias.to(y.dtype), x)).to(x.dtype)


def _backward_sums(dy, x, mean, invstd) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's per-channel sum(dy) and sum(dy * (x - mean))."""
    if x.is_cuda:
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(dy, x, mean, invstd, None, True, False, False)
        return sum_dy, sum_dy_xmu
    dims = [0] + list(range(2, x.dim()))
    dyf = dy.to(mean.dtype)
    return dyf.sum(dims), (dyf * (x.to(mean.dtype) - _channel_view(mean, x))).sum(dims)


def _backward_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """dx from the GLOBAL sums and count: (dy - sum_dy/n - (x - mean) invstd^2 sum_dy_xmu/n) invstd weight."""
    if x.is_cuda:
        w = weight.to(mean.dtype) if weight is not None else None
        return torch.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count.to(torch.int32).view(1))
    n = count.clamp_min(1)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    xmu = x.to(mean.dtype) - _channel_view(mean, x)
    dx = dy.to(mean.dtype) - _channel_view(sum_dy / n, x) - xmu * _channel_view(invstd * invstd * sum_dy_xmu / n, x)
    return (dx * _channel_view(scale, x)).to(x.dtype)


class _AllReduceBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the batches of every rank in ``group``: one all-reduce forward, one
    backward, and no host read (counts are device tensors; no rank is masked out on the host)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum, group):
        import torch.distributed as dist

        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()
        C = x.shape[1]
        n = x.numel() // C  # from the shape: a host number without a read
        acc = _acc_dtype(x)
        # Each rank sends n * (mean - shift) and n * (var + (mean - shift)^2), summed over ranks: the global mean
        # and variance follow. shift is common to all ranks (the running mean, identical everywhere) so that
        # the sums stay small where activations have a large mean (fp32 cancellation).
        shift = running_mean.detach().to(acc) if running_mean is not None else x.new_zeros(C, dtype=acc)
        if n > 0:
            mean_local, var_local = _local_moments(x, eps)
            d = mean_local.to(acc) - shift
            local = torch.cat([d * n, (var_local.to(acc) + d * d) * n])
        else:  # an empty rank still joins the all-reduce, with nothing to add
            local = x.new_zeros(2 * C, dtype=acc)
        packed = torch.cat([local, torch.full((1,), n, dtype=acc, device=x.device)])  # count made on x's device
        dist.all_reduce(packed, group=group)
        total = packed[2 * C]
        seen = total > 0
        centred = packed[:C] / total.clamp_min(1)
        mean = shift + centred
        var = (packed[C:2 * C] / total.clamp_min(1) - centred * centred).clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            with torch.no_grad():
                # momentum None: the cumulative average, its factor a device tensor (torch reads it on the host)
                f = momentum if momentum is not None else 1.0 / num_batches_tracked.to(acc)
                unbiased = var * total / (total - 1).clamp_min(1)
                running_mean.copy_(torch.where(seen, running_mean * (1 - f) + f * mean, running_mean))
                running_var.copy_(torch.where(seen, running_var * (1 - f) + f * unbiased, running_var))
        y = _normalize(x, weight, bias, mean, invstd, eps) if n > 0 else torch.empty_like(x)
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.group = group
        return y

    @staticmethod
    def backward(ctx, dy):
        import torch.distributed as dist

        x, weight, mean, invstd, total = ctx.saved_tensors
        if not dy.is_contiguous(memory_format=torch.channels_last):
            dy = dy.contiguous()
        C = x.shape[1]
        if x.numel() > 0:
            sum_dy, sum_dy_xmu = _backward_sums(dy, x, mean, invstd)
        else:
            sum_dy = sum_dy_xmu = mean.new_zeros(C)
        # weight and bias gradients are this rank's own: the data-parallel engine averages them over ranks
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(packed, group=ctx.group)
            grad_input = (_backward_input(dy, x, mean, invstd, weight, packed[:C], packed[C:], total)
                          if x.numel() > 0 else torch.zeros_like(x))
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class AllReduceBatchNorm(nn.SyncBatchNorm):
    """BatchNorm synchronised across ranks on any device (gloo or NCCL), with no host read in forward or
    backward: one all-reduce of per-channel sums and the count (a device tensor) forward, one of the
    gradient sums backward. Torch's SyncBatchNorm drops empty ranks with a boolean mask (a host sync in
    every layer) and refuses CPU tensors.

    The same statistics as torch's: mean and biased variance over the GLOBAL batch for normalising, the
    unbiased variance into the running buffers (momentum None: the cumulative average), so every rank keeps
    identical buffers; a rank with an empty batch takes part and gets the others' statistics. Eval mode and
    a single rank run plain BatchNorm.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        self._check_input_dim(input)
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not (self.training and group is not None and dist.get_world_size(group) > 1):
            return nn.modules.batchnorm._BatchNorm.forward(self, input)  # eval or one rank: plain BatchNorm
        track = self.track_running_stats
        if track:
            self.num_batches_tracked.add_(1)
        return _AllReduceBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if track else None, self.running_var if track else None,
            self.num_batches_tracked if track else None, self.eps, self.momentum, group)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers synchronised across ranks: :class:`AllReduceBatchNorm`, the same class on every device
    (``device`` no longer chooses one; kept for the callers)."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = AllReduceBatchNorm  # same fields, only forward differs
    return module


class Backend:
    """What the loop needs besides engines. ``SingleBackend`` or ``DeepSpeedBackend``."""

    rank = 0
    world_size = 1
    local_rank = 0
    world = World()  # the launcher's description (hptransfer.distributed.launch)
    cpu_fallback: Optional[str] = None  # why train.device=auto took the CPU
    distributed = False
    device = torch.device("cpu")
    input_dtype = torch.float32
    loss_dtype: Optional[torch.dtype] = None
    description = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, module: nn.Module, sync_bn: bool = True) -> nn.Module:
        """Move to the device; channels_last on GPU. Where there are several ranks (DeepSpeedBackend) also
        BatchNorm synchronised across them, unless not ``sync_bn`` (train.sync_batchnorm: each rank's
        micro-batch alone)."""
        module = module.to(self.device)
        if self.device.type == "cuda" and self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    channels_last = True

    def loss_autocast(self):
        """Context for the loss computation (VGG in bf16/fp16 when the engine is)."""
        return _autocast(self.device, self.loss_dtype)

    def max_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (a small device tensor) with each entry's maximum over the ranks, computed on the
        device (no host read here): every rank gets the same answer."""
        return values

    def gather_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """(world_size, *values.shape): every rank's ``values`` (a small device tensor), on every rank."""
        return values.unsqueeze(0)

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (a decision made once, e.g. which checkpoint to resume)."""
        return obj

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        return [obj]

    def full_state_dict(self, engine: Engine) -> dict:
        """fp32 state dict of the whole module on CPU (collective under ZeRO-3: call on every rank)."""
        return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                for k, v in engine.module.state_dict().items()}

    def engine(self, name: str, module: nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int,
               forward_fn: Optional[Callable] = None, accumulation: int = 1) -> Engine:
        """``module`` and ``optimizer`` as an :class:`Engine` stepping every ``accumulation`` micro-batches."""
        raise NotImplementedError

    def save_engines(self, directory: Path, engines: dict) -> None:
        raise NotImplementedError

    def load_engines(self, directory: Path, engines: dict, scratch: Optional[Path] = None) -> None:
        """Every engine's state from checkpoint ``directory`` (a collective under DeepSpeed). ``scratch``:
        a folder every rank sees, for a checkpoint that must be resharded first (default: beside it)."""
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

    def engine(self, name, module, optimizer, micro_batch, forward_fn=None, accumulation=1) -> Engine:
        return SingleEngine(module, optimizer, self.device, self.precision, self.grad_clip, forward_fn, accumulation)

    def save_engines(self, directory: Path, engines: dict) -> None:
        from hptransfer.checkpoint import atomic_torch_save
        for name, eng in engines.items():
            atomic_torch_save(eng.state_dict(), Path(directory) / f"{name}.pt")

    def load_engines(self, directory: Path, engines: dict, scratch: Optional[Path] = None) -> None:
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


_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                    "fp16": torch.float16, "half": torch.float16}


ENGINE_OVERLAYS = "hptransfer_engines"
ENGINE_NAMES = ("generator", "discriminator")


def engine_ds_config(ds_cfg: dict, name: str, source: str = "<ds config>") -> dict:
    """The DeepSpeed config of engine ``name``: ``ds_cfg`` with its ``"hptransfer_engines": {name: {...}}``
    overlay merged in (mappings key by key), e.g. the generator under ZeRO-1 and the discriminator
    under ZeRO-2 (configs/ds/zero1g_zero2d_bf16.json). The overlay section itself is ours, removed."""
    overlays = ds_cfg.get(ENGINE_OVERLAYS, {})
    if not isinstance(overlays, dict) or set(overlays) - set(ENGINE_NAMES):
        raise ValueError(f"{source}: {ENGINE_OVERLAYS} must map engine names {list(ENGINE_NAMES)} to config "
                         f"sections, got {overlays!r}")

    def merge(base: dict, over: dict) -> dict:
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        return out

    return merge({k: v for k, v in ds_cfg.items() if k != ENGINE_OVERLAYS}, overlays.get(name, {}))


def resolve_ds_config(ds_cfg: dict, micro_batch: int, world_size: int, grad_clip: float,
                      source: str = "<ds config>", accumulation: int = 1) -> dict:
    """Fill the per-stage fields of a DeepSpeed config; mixed precision as torch_autocast, everywhere.

    ``accumulation`` micro-batches per optimiser step (the trainer's, from ``train.global_batch``) become
    ``gradient_accumulation_steps``. ``"bf16"``/``"fp16": {"enabled": true}`` become ``"torch_autocast"``
    with that dtype on CPU and GPU alike (fp32 weights and BatchNorm buffers; DeepSpeed loss-scales fp16
    with a GradScaler). Refused with a message naming ``source``: a gradient_accumulation_steps or
    train_batch_size of the file's own (the global batch is the experiment config's, so that it does not
    change with the node count), accumulation without ZeRO, both bf16 and fp16, and gradient clipping
    with fp16 under ZeRO (DeepSpeed 0.19 clips the loss-scaled gradients there).
    """
    cfg = copy.deepcopy(ds_cfg)
    cfg.pop("optimizer", None)  # our own torch optimiser is passed in (rebuilt at every growth)
    cfg.pop("scheduler", None)
    for key in ("gradient_accumulation_steps", "train_batch_size"):
        if cfg.get(key, "auto") not in ("auto", None) and not (key == "gradient_accumulation_steps" and cfg[key] == 1):
            raise ValueError(f"{source}: {key}={cfg[key]} is not read: set the global batch in the experiment config "
                             f"(train.global_batch or stages.N.global_batch); the trainer derives the accumulation "
                             f"steps from it and the number of ranks. Set {key} to \"auto\"")
    if accumulation > 1 and int(cfg.get("zero_optimization", {}).get("stage", 0)) == 0:
        raise ValueError(f"{source}: gradient accumulation under DeepSpeed needs ZeRO (stage 1, 2 or 3): its overflow "
                         f"check is what drops a window with a non-finite micro-batch. Use a ZeRO config, or a "
                         f"global batch of batch_size x ranks")
    cfg["gradient_accumulation_steps"] = int(accumulation)
    cfg["train_micro_batch_size_per_gpu"] = int(micro_batch)
    cfg["train_batch_size"] = int(micro_batch) * int(world_size) * int(accumulation)
    if grad_clip > 0 and cfg.get("gradient_clipping", "auto") in ("auto", 0, 0.0):
        cfg["gradient_clipping"] = float(grad_clip)
    elif cfg.get("gradient_clipping") == "auto":
        cfg.pop("gradient_clipping")
    cfg.setdefault("steps_per_print", 10**9)

    enabled = [k for k in ("bf16", "fp16") if isinstance(cfg.get(k), dict) and cfg[k].get("enabled") is True]
    if len(enabled) > 1:
        raise ValueError(f"{source}: bf16 and fp16 are both enabled; choose one")
    if enabled and cfg.get("torch_autocast", {}).get("enabled"):
        raise ValueError(f"{source}: {enabled[0]} and torch_autocast are both enabled; keep torch_autocast only")
    if enabled:
        name = enabled[0]
        dtype = "bfloat16" if name == "bf16" else "float16"
        if source not in _WARNED:
            log.info("%s: \"%s\" runs as torch_autocast %s (fp32 weights, optimiser state and BatchNorm buffers; "
                     "DeepSpeed's %s mode would cast BatchNorm running statistics too)", source, name, dtype, name)
            _WARNED.add(source)
        cfg.pop(name)
        cfg["torch_autocast"] = {"enabled": True, "dtype": dtype}
    ac = cfg.get("torch_autocast", {})
    if ac.get("enabled"):
        dt = str(ac.get("dtype", "bfloat16")).replace("torch.", "")
        if dt not in _AUTOCAST_DTYPES:
            raise ValueError(f"{source}: torch_autocast dtype {ac.get('dtype')!r}: expected bfloat16 or float16")
        ac["dtype"] = "bfloat16" if _AUTOCAST_DTYPES[dt] == torch.bfloat16 else "float16"
        if (ac["dtype"] == "float16" and cfg.get("gradient_clipping", 0) > 0
                and int(cfg.get("zero_optimization", {}).get("stage", 0)) > 0):
            raise ValueError(f"{source}: gradient clipping with fp16 under ZeRO clips the loss-scaled gradients in "
                             f"DeepSpeed 0.19 (a far too small step); use a bf16 config, or train.grad_clip=0")
    return cfg


def autocast_dtype(cfg: dict) -> Optional[torch.dtype]:
    """The dtype of a resolved config's torch_autocast section, None when it is off."""
    ac = cfg.get("torch_autocast", {})
    return _AUTOCAST_DTYPES[ac["dtype"]] if ac.get("enabled") else None


class DeepSpeedBackend(Backend):
    """DeepSpeed engines (ZeRO 1/2/3, bf16/fp16 autocast), one per trained model, re-made at every growth."""

    distributed = True

    def __init__(self, ds_config: str | Path, grad_clip: float = 0.0, channels_last: bool = True,
                 world: Optional[World] = None, device: Optional[torch.device] = None, timeout_s: int = 1800):
        """``world`` as :func:`hptransfer.distributed.launch.discover` found it (default: discovered here),
        ``device`` this rank's (default: its local GPU, else the CPU), ``timeout_s`` the process group's
        collective timeout (train.dist_timeout_s)."""
        import datetime

        import torch.distributed as dist

        world = world or launch.discover()
        self.device = device or launch.resolve_device("auto", world)[0]
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks the GPU of a GPU node
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.ds = deepspeed
        self.dist = dist
        self.source = str(ds_config)
        self.raw_config = load_ds_config(ds_config)
        self.grad_clip = grad_clip
        self.channels_last = channels_last
        # config errors before any rank waits
        cfgs = {name: resolve_ds_config(engine_ds_config(self.raw_config, name, self.source), 1, 1, grad_clip,
                                        self.source) for name in ENGINE_NAMES}
        cfg = cfgs["generator"]
        if get_accelerator().device_name() != self.device.type:
            raise LaunchError(f"DeepSpeed chose its {get_accelerator().device_name()} accelerator, but this rank "
                              f"trains on {self.device}: set DS_ACCELERATOR={self.device.type} in the environment")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # before NCCL starts: each rank its own GPU
        launch.export(world)  # srun's SLURM_* (or no launcher) as env://, so DeepSpeed never tries MPI discovery
        if world.warning:
            log.warning("%s", world.warning)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=timeout_s))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = world.local_rank
        self.world = world
        self.loss_dtype = autocast_dtype(cfg)  # inputs stay fp32: the engine autocasts its forward
        self.zero_stages = {name: int(c.get("zero_optimization", {}).get("stage", 0)) for name, c in cfgs.items()}
        self.zero_stage = max(self.zero_stages.values())  # a checkpoint holds shards where any engine does
        if len({autocast_dtype(c) for c in cfgs.values()}) > 1:
            raise ValueError(f"{self.source}: {ENGINE_OVERLAYS} may not give the engines different precisions")
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast, loss-scaled"}
        self.description = (f"DeepSpeed, {self.world_size} ranks on {self.device.type} "
                            f"({dist.get_backend()}), ZeRO-{self.zero_stages['generator']} generator, "
                            f"ZeRO-{self.zero_stages['discriminator']} discriminator, {precision[self.loss_dtype]}, "
                            f"config {self.source}")

    def prepare(self, module: nn.Module, sync_bn: bool = True) -> nn.Module:
        if self.world_size > 1 and sync_bn:
            module = sync_batchnorm(module, self.device)
        return super().prepare(module)

    def max_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        self.dist.all_reduce(values, op=self.dist.ReduceOp.MAX)
        return values

    def gather_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(values) for _ in range(self.world_size)]
        self.dist.all_gather(out, values.contiguous())
        return torch.stack(out)

    def barrier(self) -> None:
        self.dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def engine(self, name, module, optimizer, micro_batch, forward_fn=None, accumulation=1) -> Engine:
        cfg = resolve_ds_config(engine_ds_config(self.raw_config, name, self.source), micro_batch, self.world_size,
                                self.grad_clip, self.source, accumulation)
        eng, _, _, _ = self.ds.initialize(model=module, optimizer=optimizer, config=cfg)
        return DeepSpeedEngine(eng, name)

    def full_state_dict(self, engine: Engine) -> dict:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        params = dict(engine.module.named_parameters())
        for k, v in engine.module.state_dict(keep_vars=True).items():
            if k in params and engine.engine.zero_optimization_stage() > 0:
                full = safe_get_full_fp32_param(params[k])  # the fp32 master copy, gathered (ZeRO-3)
                v = full if full is not None else v
            v = v.detach()
            out[k] = v.float().cpu().clone() if v.is_floating_point() else v.cpu().clone()
        return out

    def save_engines(self, directory: Path, engines: dict) -> None:
        for name, eng in engines.items():  # every rank: each writes its ZeRO partition
            state = {}  # the run's own state is in meta.json (train._save_checkpoint)
            if eng.scaler is not None:  # DeepSpeed does not checkpoint the autocast GradScaler itself
                state["grad_scaler"] = eng.scaler.state_dict()
            eng.engine.save_checkpoint(str(directory), tag=name, client_state=state, save_latest=False)

    def load_engines(self, directory: Path, engines: dict, scratch: Optional[Path] = None) -> None:
        from hptransfer.checkpoint import read_meta
        from hptransfer.distributed import reshard

        directory = Path(directory)
        if reshard.needs_universal(read_meta(directory), self.world_size, self.zero_stages):
            clients = reshard.load_resharded(directory, {name: eng.engine for name, eng in engines.items()},
                                             scratch or directory.parent, self.is_main, self.barrier)
        else:
            clients = {}
            for name, eng in engines.items():
                path, clients[name] = eng.engine.load_checkpoint(str(directory), tag=name, load_optimizer_states=True,
                                                                 load_lr_scheduler_states=False)
                if path is None:
                    raise FileNotFoundError(f"DeepSpeed could not load {name} from {directory}")
        for name, eng in engines.items():
            if eng.scaler is not None and (clients[name] or {}).get("grad_scaler"):
                eng.scaler.load_state_dict(clients[name]["grad_scaler"])


def make_backend(cfg, ds_config: Optional[str] = None) -> Backend:
    """DeepSpeed when a DeepSpeed config is given, otherwise a single process. The launcher's world and
    ``train.device`` are checked first, before anything is written (LaunchError: several processes
    without a DeepSpeed config, ``cuda`` without a usable GPU). ``backend.world`` is the launcher's
    description, ``backend.cpu_fallback`` why ``auto`` took the CPU (None when it did not)."""
    world = launch.discover()
    launch.require_deepspeed(world, ds_config)
    device, cpu_fallback = launch.resolve_device(cfg.train.device, world)
    if ds_config:
        backend = DeepSpeedBackend(ds_config, cfg.train.grad_clip, cfg.train.channels_last, world=world, device=device,
                                   timeout_s=cfg.train.dist_timeout_s)
    else:
        backend = SingleBackend(cfg.train.precision, cfg.train.grad_clip, device=str(device),
                                channels_last=cfg.train.channels_last)
        backend.world = world
    backend.cpu_fallback = cpu_fallback
    return backend
