"""DeepSpeed checkpoints on another number of ranks, and without any ranks.

**Resume on another world size (or ZeRO stage).** A ZeRO checkpoint holds each rank's flat partition
of the fp32 master weights and of Adam's ``exp_avg`` / ``exp_avg_sq``; DeepSpeed refuses to load it on
another data-parallel size. Its *universal checkpoint* is the layout that does not depend on the
partitioning: one folder per parameter (``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``), written by
``deepspeed.checkpoint.ds_to_universal`` and read back by ``load_checkpoint`` with the engine's
``load_universal`` switch, which re-partitions every state for the new ranks. Here:

1. rank 0 converts each engine's tag directory (``generator/``, ``discriminator/``) into a scratch
   folder beside the run's checkpoints (:func:`convert`), the others wait;
2. every rank loads it (:func:`load_universal`): weights, Adam state and step, the ZeRO optimiser's
   global state; DeepSpeed's universal load skips the module's state dict, so the BatchNorm running
   statistics are copied from the checkpoint's model-states file here;
3. the scratch folder is deleted.

The conversion is DeepSpeed's own code (it also runs as ``python -m deepspeed.checkpoint.ds_to_universal``);
it costs one read of the checkpoint and one write of the same bytes. Our trainer passes its own torch
Adam to ``deepspeed.initialize``: ZeRO wraps it, so its state is ZeRO's flat partitions like any other.

**Without ranks.** :func:`consolidated_state_dict` gathers an engine's fp32 weights and buffers on the
CPU with DeepSpeed's ``zero_to_fp32`` (no process group), for export, eval, infer and ``--init-from``.
DeepSpeed's files are pickles that need ``weights_only=False``: read checkpoints you wrote; share exports.

:func:`map_data_position` moves a stage's data position between global batch sizes.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

log = logging.getLogger(__name__)

SCRATCH_PREFIX = ".universal-"


def needs_universal(meta: dict, world_size: int, zero_stages: dict) -> bool:
    """Whether a DeepSpeed checkpoint (its ``meta.json``) must go through the universal layout to load
    on ``world_size`` ranks with engines under ``zero_stages`` ({engine name: stage})."""
    if meta.get("backend") != "deepspeed":
        return False
    saved_stages = meta.get("zero_stages") or {name: meta.get("zero_stage", 0) for name in meta.get("engines", [])}
    zero = any(saved_stages.get(name, 0) > 0 for name in saved_stages)
    other_world = meta.get("world_size", 1) != world_size
    other_stage = any(name in zero_stages and zero_stages[name] != stage for name, stage in saved_stages.items())
    return zero and (other_world or other_stage)


def _quietly(fn, *args, **kwargs):
    """Run a DeepSpeed tool that prints progress to stdout; its output goes to the debug log."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        result = fn(*args, **kwargs)
    log.debug("%s", out.getvalue())
    return result


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def convert(tag_dir: Path, out_dir: Path) -> dict:
    """One engine's ZeRO checkpoint (``step_*/<engine>/``) in DeepSpeed's universal layout at ``out_dir``
    (replaced if present). Run on ONE rank. Returns {"seconds", "bytes_read", "bytes_written"}."""
    from deepspeed.checkpoint import ds_to_universal

    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    # inject_missing_state: our checkpoints carry no Megatron-style "universal_checkpoint_info" (tensor/
    # pipeline-parallel patterns); DeepSpeed fills in the empty one that plain data parallelism needs.
    args = SimpleNamespace(input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    _quietly(ds_to_universal.main, args)
    return {"seconds": time.perf_counter() - t0, "bytes_read": _bytes(tag_dir), "bytes_written": _bytes(out_dir)}


def _model_states_file(tag_dir: Path) -> Path:
    """The rank-0 model-states file of a tag directory (ZeRO-1/2 and ZeRO-3 name it differently)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (Path(tag_dir) / name).is_file():
            return Path(tag_dir) / name
    raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model-states file (mp_rank_00_model_states.pt)")


@contextlib.contextmanager
def _universal_switch(engine):
    """The engine's ``checkpoint.load_universal`` setting on for one load: it is read at load time only
    (``DeepSpeedEngine.load_universal_checkpoint()``), and the engines were built before we knew."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def load_universal(engine, universal_root: Path, tag: str, source_tag_dir: Path) -> dict:
    """Load the universal checkpoint ``universal_root/tag`` into a ``deepspeed.DeepSpeedEngine`` on every
    rank (collective), then the module's buffers from ``source_tag_dir``; returns the client state."""
    with _universal_switch(engine):
        path, client = engine.load_checkpoint(str(universal_root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the universal checkpoint {Path(universal_root) / tag}")
    saved = torch.load(_model_states_file(source_tag_dir), map_location="cpu", weights_only=False)["module"]
    persistent = set(engine.module.state_dict())  # buffers in the state dict (not e.g. a cached tensor)
    with torch.no_grad():
        for name, buf in engine.module.named_buffers():
            if name not in persistent:
                continue
            if name not in saved:
                raise KeyError(f"{source_tag_dir}: the checkpoint has no buffer {name}")
            buf.copy_(saved[name])
    return client or {}


def load_resharded(directory: Path, engines: dict, scratch_root: Path, is_main: bool, barrier) -> dict:
    """Load ``directory``'s engines ({name: deepspeed engine}) written by another number of ranks (or
    ZeRO stage): convert on rank 0 into ``scratch_root/.universal-<checkpoint>/``, load on every rank,
    delete the scratch. Returns {name: client state}."""
    directory = Path(directory)
    scratch = Path(scratch_root) / f"{SCRATCH_PREFIX}{directory.name}"
    if is_main:
        scratch.parent.mkdir(parents=True, exist_ok=True)
        if scratch.exists():  # left by a run killed while resharding
            shutil.rmtree(scratch)
        for name in engines:
            stats = convert(directory / name, scratch / name)
            log.info("resharding %s/%s: universal checkpoint written in %.1f s (read %.1f MB, wrote %.1f MB)",
                     directory.name, name, stats["seconds"], stats["bytes_read"] / 1e6, stats["bytes_written"] / 1e6)
    barrier()
    clients = {}
    t0 = time.perf_counter()
    for name, engine in engines.items():
        clients[name] = load_universal(engine, scratch, name, directory / name)
    barrier()  # every rank has read the scratch folder
    if is_main:
        shutil.rmtree(scratch, ignore_errors=True)
        log.info("resharding %s: loaded on every rank in %.1f s", directory.name, time.perf_counter() - t0)
    return clients


def consolidated_state_dict(checkpoint_dir: Path, tag: str) -> dict:
    """The full fp32 state dict (weights and BatchNorm buffers) of engine ``tag`` of a DeepSpeed
    checkpoint, on the CPU, with no process group (DeepSpeed's zero_to_fp32; every ZeRO stage)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ImportError(f"{checkpoint_dir} is a DeepSpeed checkpoint; reading it needs deepspeed installed "
                          f"(requirements.txt): {e}") from None
    state = _quietly(get_fp32_state_dict_from_zero_checkpoint, str(checkpoint_dir), tag=tag)
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in state.items()}


def map_data_position(consumed_steps: int, old_global_batch: int, new_global_batch: int) -> tuple:
    """(optimiser steps into the epoch, samples seen again) for a run whose global batch changed.

    Every optimiser step takes the next ``global_batch`` samples of the epoch's permutation, whatever
    the split between ranks, micro-batches and accumulation (see ``train._Batches``), so the samples
    seen are a prefix of it: ``consumed_steps * old_global_batch``. The new position is the last whole
    new step inside that prefix; the samples after it are seen again (fewer than one new global batch).
    """
    seen = consumed_steps * old_global_batch
    steps = seen // new_global_batch
    return steps, seen - steps * new_global_batch
