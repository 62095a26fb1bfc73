"""Progressive training (paper sections 3.3-3.4): 64 -> 128 -> ... px, one stage per resolution.

Three launches, same arguments::

    hptransfer train --config configs/synth_demo.yaml [section.key=value ...]
    python -m hptransfer.train --config configs/synth_demo.yaml
    deepspeed [--num_gpus N | --hostfile H] hptransfer/train.py --config X.yaml --deepspeed_config configs/ds/zero2_bf16.json

Per stage: generator at the stage's resolution (``grow()`` between stages, optimiser, loader and
DeepSpeed engines rebuilt), criterion L2 in the first half of the stage and L1 in the second, local
descriptors 18/31/44, local discriminators (their own engine and optimiser; each iteration both
losses from the same D weights, then G's step, then D's) only at ``loss.disc_at_resolution``. A
step is one optimiser step over the stage's global batch (``config.stage_global_batch``: micro-batches
accumulated where batch_size x ranks is smaller); the schedule, the fade, checkpoints and the data
position count steps. A non-finite loss skips its network's step on every rank.
Checkpoints every ``train.checkpoint_every`` steps and at stage ends; export (``export/`` and
``export/<R>px/``) and a sample grid at every stage end. Reads top to bottom: :func:`train` (set-up,
per stage: :func:`_begin_stage`, :func:`_train_stage` = the per-step loop, :func:`_end_stage`; summary),
then resume, samples, export.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and sys.path and sys.path[0].rstrip("/").endswith("hptransfer"):
    sys.path.pop(0)  # run as a file (the deepspeed launcher): our modules must not shadow top-level names

import argparse
import dataclasses
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from hptransfer import checkpoint as ckpt
from hptransfer import losses, ops, pose
from hptransfer.backend import Backend, Engine, make_backend
from hptransfer.config import Config, ConfigError, StageConfig, load_config, save_config, stage_global_batch
from hptransfer.distributed import launch, signals
from hptransfer.distributed.stats import RunStats
from hptransfer.report import Reporter, save_sample_grid
from hptransfer.step import train_step
from hptransfer import flow_task  # task: garment_flow (the appearance flow network)

log = logging.getLogger("hptransfer.train")


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, action="append",
                        help="experiment YAML (configs/*.yaml); repeat to overlay files, later wins "
                             "(e.g. --config base.yaml --config configs/ablation/pt_lpl.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4 stages.0.iterations=100")
    parser.add_argument("--out", help="output directory (shorthand for train.out_dir=...)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH|auto",
                        help="resume from a checkpoint directory, or 'auto' = out_dir/checkpoints/latest if any")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an out_dir that holds checkpoints, deleting them (without it, or "
                             "--resume, such a run stops instead of overwriting them)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                        help="DeepSpeed JSON (configs/ds/*.json); without it: single process, plain PyTorch")
    parser.add_argument("--device", dest="train_device", choices=("auto", "cuda", "cpu"), default=None,
                        help="shorthand for train.device=...: cuda refuses to start without a usable GPU; auto (the "
                             "default) takes the GPU when one works, else the CPU")
    parser.add_argument("--stop_at_step", "--stop-at-step", dest="stop_at_step", type=int, default=None,
                        help="stop after this global step (writes a checkpoint first), e.g. to test resume")
    parser.add_argument("--init-from", "--init_from", dest="init_from", default=None, metavar="CHECKPOINT",
                        help="start a new run from these generator weights only (checkpoint dir, run dir or "
                             "export dir; grown to the first stage's resolution); ignored when resuming")
    # Passed by the deepspeed launcher; the rank is read from the LOCAL_RANK environment variable.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 done (or stopped by --stop_at_step), 2 a user error (hptransfer.cli), 75
    (signals.EXIT_PREEMPTED) stopped by SIGTERM/SIGUSR1 after a checkpoint, 1 a bug or a failed collective."""
    overrides = list(args.overrides or [])
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    if args.train_device:
        overrides.append(f"train.device={args.train_device}")
    cfg = load_config(args.config, overrides)  # ConfigError: a user error, one line (hptransfer.cli)
    if launch.discover().rank != 0:  # rank 0 reports progress, the others only what goes wrong
        logging.getLogger("hptransfer").setLevel(logging.WARNING)
    try:
        result = train(cfg, ds_config=args.deepspeed_config, resume=args.resume, overwrite=args.overwrite,
                       stop_at_step=args.stop_at_step, init_from=args.init_from)
    except Exception as e:
        message = launch.collective_failure(e, cfg.train.dist_timeout_s)
        if message is None:
            raise
        log.error("%s", message)
        return 1
    out_dir = Path(cfg.train.out_dir)
    if result["is_main"] and result["preempted"]:
        print(f"stopped by {result['preempted']} at global step {result['global_step']}: checkpoint in "
              f"{out_dir / 'checkpoints'}; continue with --resume auto (exit status {signals.EXIT_PREEMPTED})")
    elif result["is_main"]:  # the summary table is in the log already
        print(f"export: {result['export']}  samples: {out_dir / 'samples'}  log: {out_dir / 'train.log'}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # communication threads must not outlive the interpreter
    return signals.EXIT_PREEMPTED if result["preempted"] else 0


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="hptransfer train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    from hptransfer.cli import parse_args_with_overrides, run_guarded  # as `hptransfer train` parses and reports

    args = parse_args_with_overrides(parser, sys.argv[1:] if argv is None else argv)
    try:
        rank = launch.discover().rank  # RANK, or SLURM_PROCID under srun
    except launch.LaunchError:
        rank = 0  # bad launcher variables: reported as one line by run_guarded below
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return run_guarded(run, args)


# ----------------------------------------------------------------------------- helpers
def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def _fused_adam_capable(params: list) -> bool:
    """Whether torch's fused Adam kernel runs these parameters: all floating point on CUDA devices."""
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def _make_optimizer(cfg: Config, params, lr: float) -> torch.optim.Optimizer:
    """``train.optimizer`` (Adam / AdamW) over the trainable ``params``: the fused kernel (one launch
    for every tensor) where all of them are on CUDA, the multi-tensor (foreach) path otherwise (on the
    CPU it gives the for-loop's numbers exactly). Under DeepSpeed this optimiser is the one passed to
    ``deepspeed.initialize`` (``backend.resolve_ds_config`` drops a config's own "optimizer" section)."""
    cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    params = [p for p in params if p.requires_grad]
    kernel = {"fused": True} if _fused_adam_capable(params) else {"foreach": True}
    return cls(params, lr=lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay, **kernel)


def _compile_generator(mode: str, generator, g_engine: Engine) -> None:
    """train.compile: "blocks" compiles each block in place, "full" the engine's whole forward; "off"
    nothing. The first steps of every stage pay the compilation."""
    if mode == "blocks":
        generator.compile_blocks()
    elif mode == "full":
        if hasattr(g_engine, "forward_fn"):
            g_engine.forward_fn = torch.compile(generator)
        else:
            g_engine.engine.compile()


def _build_generator(cfg: Config, resolution: int, state: Optional[dict] = None, fading: bool = False):
    """A generator at ``resolution``, with the fade's from-RGB (and to-RGB, model.output_fade) when
    ``fading``, or as ``state`` has them."""
    if cfg.task == "garment_flow":
        return flow_task.build_model(cfg, resolution, state)
    from hptransfer.models import Generator

    g = Generator(cfg.model, resolution)
    if state is not None:
        g.add_fade_like(state)
        g.load_state_dict(state)
    elif fading:
        g.add_input_fade()
    g.impl = cfg.train.impl
    g.set_activation_checkpointing(cfg.train.activation_checkpointing)
    return g


def _fades(cfg: Config, stage_idx: int, state: dict) -> bool:
    """Whether stage ``stage_idx`` starts with the input fade (model.input_fade > 0 and a grown stage:
    a later stage, or a first stage grown from lower-resolution --init-from weights)."""
    return cfg.model.input_fade > 0 and (stage_idx > 0 or state.get("init_grown", False))


def _fade_alpha(cfg: Config, stage_idx: int, step: int, iterations: int, state: dict) -> float:
    """Weight of the new input path at 0-based ``step``: linear from 0 at the first step of the fade's
    window (the first round(input_fade * iterations) steps) to exactly 1 at its last step."""
    if not _fades(cfg, stage_idx, state):
        return 1.0
    window = max(round(cfg.model.input_fade * iterations), 1)
    return min(1.0, step / max(window - 1, 1))


def _warmup_factor(cfg: Config, step: int) -> float:
    """The learning-rate multiplier at 0-based ``step`` of a stage: (step + 1) / N over the first
    N = train.warmup_iterations steps, then 1."""
    n = cfg.train.warmup_iterations
    return 1.0 if n <= 0 else min(1.0, (step + 1) / n)


def _set_learning_rates(run: _Run, stage: _Stage, step: int) -> float:
    """Both optimisers' learning rates at ``step`` (train.lr, loss.disc_lr, times the warm-up); the factor."""
    factor = _warmup_factor(run.cfg, step)
    for engine, base in ((stage.g_engine, run.cfg.train.lr), (stage.d_engine, run.cfg.loss.disc_lr)):
        if engine is not None:
            for group in engine.optimizer.param_groups:
                group["lr"] = base * factor
    return factor


def _build_vgg(cfg: Config, backend: Backend):
    from hptransfer.errors import WeightsUnavailable
    from hptransfer.models import VGG16Features

    try:
        vgg = VGG16Features(weights=cfg.loss.vgg_weights, layers=tuple(cfg.loss.layers))
    except WeightsUnavailable as e:
        e.message += ("; or train without them: loss.vgg_weights=random, an untrained VGG-16: the global and "
                      "local losses are then NOT perceptual (random filters, a filtered pixel loss that does not "
                      "reward texture or detail as ImageNet features do), so expect blurrier images than the "
                      "paper's")
        raise
    vgg = vgg.to(backend.device).eval()
    for p in vgg.parameters():  # frozen: not in any optimiser, not in checkpoints
        p.requires_grad_(False)
    if backend.device.type == "cuda" and backend.channels_last:
        vgg = vgg.to(memory_format=torch.channels_last)
    return vgg


# A generator step (width 1/16, 64 px, batch 4, forward + backward) under bf16 autocast took this many
# times the fp32 step on an AVX2 CPU without native bf16 (AMD EPYC, 2 threads; docs/own-data.md).
CPU_BF16_SLOWDOWN = 29


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def _matmul_gflops(seconds: float = 0.2) -> float:
    """This CPU's fp32 matmul rate, measured now (a rough yardstick for the time estimate)."""
    a = torch.full((512, 512), 0.5)  # not random: the run's RNG stays untouched
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - t0) / 1e9


def cpu_cost_warning(cfg: Config, device: torch.device) -> Optional[str]:
    """One line naming the GPU-oriented settings of ``cfg`` that a run on a CPU ``device`` pays for (bf16,
    loader workers beyond the cores, DALI, torch.compile, the paper's width), or None. Nothing is changed:
    precision and the rest stay the config's (the caller decides)."""
    if device.type != "cpu":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    costs = []
    if cfg.train.precision == "bf16":
        native = {"avx512_bf16", "amx_bf16"} & _cpu_flags()
        costs.append("train.precision=bf16 (" + (
            f"this CPU has {'/'.join(sorted(native))}: measure it against fp32" if native else
            f"this CPU has no native bf16: a bf16 generator step took {CPU_BF16_SLOWDOWN}x the fp32 step on an "
            "AVX2 CPU") + ")")
    elif cfg.train.precision == "fp16":
        costs.append("train.precision=fp16 (autocast on a CPU: not measured here, no speed-up expected; fp32 is "
                     "the CPU's precision)")
    if cfg.data.workers >= 4 and cfg.data.workers > cores // 2:  # a GPU config's count, on a small CPU
        costs.append(f"data.workers={cfg.data.workers} (this machine has {cores} cores: loader processes take "
                     f"them from training; 0 or 1 here)")
    if cfg.data.loader == "dali":
        costs.append("data.loader=dali (DALI's CPU-only mode: no GPU decoding)")
    if cfg.train.compile != "off":
        costs.append(f"train.compile={cfg.train.compile} (minutes of compilation per stage; 0.94x eager on a "
                     "2-core CPU)")
    if cfg.task == "transfer" and cfg.model.width >= 0.5:
        from hptransfer.models.summary import stage_table

        gflop = {r["resolution"]: r["gflop"] for r in stage_table(cfg.model, cfg.stages[-1].resolution)}
        total = sum(3 * gflop[s.resolution] * s.iterations * s.batch_size for s in cfg.stages)  # fwd + bwd ~ 3x
        days = total / _matmul_gflops() / 86400
        costs.append(f"model.width={cfg.model.width:g} ({gflop[cfg.stages[0].resolution]:.0f} GFLOP per "
                     f"{cfg.stages[0].resolution}-px image forward; the generator alone, forward and backward, "
                     f"at this CPU's matmul rate: about {days:,.0f} days for these stages)")
    if not costs:
        return None
    return ("GPU-oriented settings on a CPU, kept as configured: " + "; ".join(costs) +
            ". A CPU-sized config: configs/own_data_cpu.yaml (docs/own-data.md)")


def _dataset(cfg: Config, split: str, resolution: int, flip: bool):
    """The split's pair dataset at ``resolution``: a shard folder or a folder, as data.root holds."""
    if cfg.task == "garment_flow":
        return flow_task.dataset(cfg, split, resolution, flip)
    from hptransfer.data.shards import open_pair_dataset

    return open_pair_dataset(cfg.data.root, split, resolution, flip=flip, fit=cfg.data.fit,
                             skip_bad=cfg.data.skip_bad, seed=cfg.train.seed)


def _check_dataset(cfg: Config, backend: Backend) -> None:
    """Open the training data on rank 0 first (an older folder's one-time image-size scan writes its
    index there, once), then on the others; rank 0's error is raised on every rank."""
    error = None
    if backend.is_main:
        try:
            _dataset(cfg, cfg.data.train_split, cfg.stages[0].resolution, flip=False)
        except Exception as e:  # raised on every rank below: none may wait in a collective for rank 0
            error = e
    error = backend.broadcast_object(error)
    if error is not None:
        raise error
    if not backend.is_main:
        _dataset(cfg, cfg.data.train_split, cfg.stages[0].resolution, flip=False)


class _Batches:
    """Endless micro-batches of a stage with an exact position: (epoch, optimiser steps into the epoch).

    With ``accumulation`` a, rank r reads as the a "virtual ranks" r*a ... r*a+a-1 of a world of
    world_size*a ranks would (the loaders shard the epoch's permutation like DistributedSampler), one
    micro-batch of each per optimiser step. So every step takes the next global batch of the epoch's
    permutation, and each micro-batch's samples depend only on (global batch, micro-batch), not on
    how the global batch is split between ranks and accumulation."""

    def __init__(self, cfg: Config, dataset, batch_size: int, seed: int, backend: Backend, epoch: int, consumed: int,
                 accumulation: int = 1):
        from hptransfer.data.dali import make_loader_for_config  # data.loader: torch DataLoader or DALI

        a = accumulation
        # the rank's decode workers shared by its loaders (each serves 1/a of the micro-batches)
        data = dataclasses.replace(cfg.data, workers=-(-cfg.data.workers // a)) if a > 1 else cfg.data
        self.make = lambda e, skip, v: make_loader_for_config(data, dataset, batch_size, device=backend.device,
                                                              seed=seed, rank=backend.rank * a + v,
                                                              world_size=backend.world_size * a, epoch=e,
                                                              skip_batches=skip)
        self.dataset, self.epoch, self.consumed, self.accumulation = dataset, epoch, consumed, a
        self.its, self.micro = None, 0

    def next(self) -> dict:
        for _ in range(2):
            if self.its is None:
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(self.epoch)
                # A DataLoader iterator without its own generator draws its base seed from the global
                # RNG; fork so that where the iterator is made (fresh vs resumed) never shifts the RNG.
                with torch.random.fork_rng(devices=[]):
                    self.its = [iter(self.make(self.epoch, self.consumed, v)) for v in range(self.accumulation)]
            try:
                batch = next(self.its[self.micro])
            except StopIteration:
                # every virtual rank's loader has the same length: they end together, at a step's start
                assert self.micro == 0, "virtual ranks' loaders ended at different steps"
                self.epoch, self.consumed, self.its = self.epoch + 1, 0, None
                continue
            self.micro = (self.micro + 1) % self.accumulation
            if self.micro == 0:  # the step's last micro-batch
                self.consumed += 1
            return batch
        raise RuntimeError(f"the training loader yields no batch: {len(self.dataset)} pairs are fewer than one global "
                           f"batch; lower the stage batch_size or global_batch, or add data")


def _to_device(batch: dict, backend: Backend) -> tuple:
    dev, dt = backend.device, backend.input_dtype
    fmt = torch.channels_last if dev.type == "cuda" and backend.channels_last else torch.contiguous_format
    img = lambda k: batch[k].to(dev, non_blocking=True).to(dtype=dt, memory_format=fmt)  # noqa: E731
    kp = lambda k: batch[k].to(dev, non_blocking=True).float()  # noqa: E731
    return img("reference"), img("target"), kp("kp_reference"), kp("kp_target")


# ----------------------------------------------------------------------------- training
@dataclass
class _Run:
    """What every stage of one run shares. ``state`` holds the counters a checkpoint saves and a resume
    restores: stage, step (in the stage), global_step, epoch and consumed (the data position), skipped
    and d_skipped (non-finite steps of the generator and the discriminators)."""

    cfg: Config
    backend: Backend
    vgg: torch.nn.Module
    reporter: Reporter
    stats: RunStats
    state: dict
    stop_at_step: Optional[int]
    callback: Optional[Callable[[dict], None]]
    loss_hook: Optional[Callable[[dict, dict], dict]]
    signals: signals.StopSignals
    preempted: Optional[str] = None  # the signal that stopped the run (on some rank)

    def stop_reached(self) -> bool:
        return self.preempted is not None or (self.stop_at_step is not None
                                              and self.state["global_step"] >= self.stop_at_step)


@dataclass
class _Stage:
    """One stage's pieces, as :func:`_begin_stage` builds them."""

    idx: int
    spec: StageConfig
    generator: torch.nn.Module  # the training module inside g_engine
    g_engine: Engine
    d_engine: Optional[Engine]  # the local discriminators, where they train
    batches: _Batches
    samples: dict  # the fixed batch of the sample grids
    global_batch: int  # samples per optimiser step, all ranks
    accumulation: int  # micro-batches per optimiser step on each rank

    @property
    def engines(self) -> dict:  # what a checkpoint holds, in the order it is saved and loaded
        return {"generator": self.g_engine, **({"discriminator": self.d_engine} if self.d_engine is not None else {})}


def train(cfg: Config, *, ds_config: Optional[str] = None, resume: Optional[str] = None, overwrite: bool = False,
          stop_at_step: Optional[int] = None, callback: Optional[Callable[[dict], None]] = None,
          loss_hook: Optional[Callable[[dict, dict], dict]] = None, init_from: Optional[str] = None) -> dict:
    """Train through ``cfg.stages``. Returns {"is_main", "global_step", "skipped", "summary", "export",
    "generator_state" (fp32 CPU state dict of the final generator), "stopped", "preempted" (the signal's
    name, or None)}.

    SIGTERM / SIGUSR1 on any rank once the set-up is done (before, they end the process as usual:
    nothing to save yet): every rank finishes the current step, writes the checkpoint and returns with
    ``preempted`` set (see :mod:`hptransfer.distributed.signals`; the CLI exits with status 75).

    ``resume``: a checkpoint path or "auto" (see :func:`_resume_point`); an out_dir that holds
    checkpoints needs ``resume`` or ``overwrite`` (which deletes them), else OutputExistsError.
    ``callback(info)`` runs after every iteration on every rank (info: stage, resolution,
    step_in_stage, global_step, criterion, disc_active, skipped, terms as floats, generator: the
    training module). ``loss_hook(terms, info) -> terms`` may replace the generator's loss terms
    before the finite check (a debug hook: the tests force a NaN through it). ``init_from``: see
    :func:`_init_from` (used only when the run does not resume).
    """
    with signals.StopSignals() as stop_signals:
        return _train(cfg, stop_signals, ds_config=ds_config, resume=resume, overwrite=overwrite,
                      stop_at_step=stop_at_step, callback=callback, loss_hook=loss_hook, init_from=init_from)


def _train(cfg: Config, stop_signals: signals.StopSignals, *, ds_config, resume, overwrite, stop_at_step, callback,
           loss_hook, init_from) -> dict:
    backend = make_backend(cfg, ds_config)
    for i in range(len(cfg.stages)):  # every stage's global batch fits this world, before anything is written
        stage_global_batch(cfg, i, backend.world_size)
    _seed_everything(cfg.train.seed + backend.rank, cfg.train.deterministic)
    costly = cpu_cost_warning(cfg, backend.device) if backend.is_main else None
    if costly:
        log.warning("%s", costly)
    out_dir = Path(cfg.train.out_dir)
    resume_from, state = _where_to_start(resume, overwrite, out_dir, backend)  # before anything is written there
    # What a user can get wrong is read before anything is written: bad training data or missing VGG
    # weights stop the run with out_dir as it was.
    _check_dataset(cfg, backend)
    vgg = _build_vgg(cfg, backend)
    if backend.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    backend.barrier()
    reporter = Reporter(out_dir, enabled=backend.is_main, tensorboard=cfg.train.tensorboard,
                        total_steps=sum(s.iterations for s in cfg.stages), initial_step=state["global_step"])
    _log_run_start(cfg, backend, resume_from, state)  # after the Reporter: into train.log
    stats = RunStats(backend, out_dir, tb=reporter.tb, fresh=resume_from is None)
    run = _Run(cfg, backend, vgg, reporter, stats, state, stop_at_step, callback, loss_hook, stop_signals)

    # Built even where --init-from replaces it: its initialisation draws from the RNG, which later steps replay.
    if init_from and resume_from is None:
        state["init_grown"] = _init_resolution(init_from) < cfg.stages[0].resolution
    generator = _build_generator(cfg, cfg.stages[state["stage"]].resolution, fading=_fades(cfg, state["stage"], state))
    if init_from and resume_from is None:
        generator = _init_from(cfg, init_from, fade=_fades(cfg, 0, state))
    stage, export_path, stopped = None, None, False
    stop_signals.arm()  # from here on SIGTERM/SIGUSR1 stop the run after a step, with a checkpoint
    for stage_idx in range(state["stage"], len(cfg.stages)):
        stage = _begin_stage(run, stage_idx, generator, resume_from)
        resume_from = None  # a resumed run loads its checkpoint into the first stage only
        stopped = _train_stage(run, stage)
        if stopped:
            break
        export_path, generator = _end_stage(run, stage)
        stopped = run.stop_reached()
        if stopped:
            break

    final_state = backend.full_state_dict(stage.g_engine) if stage is not None else {}
    if run.preempted:
        log.warning("stopped at global step %d by %s (on at least one rank; this one: %s): checkpoint written, exit "
                    "status %d", state["global_step"], run.preempted, stop_signals.received or "none",
                    signals.EXIT_PREEMPTED)
    elif stopped:
        log.info("stopped at global step %d (--stop_at_step)", state["global_step"])
    stats.close()
    table = reporter.close()
    if state["skipped"] or state["d_skipped"]:
        log.warning("skipped steps (non-finite loss): generator %d, discriminator %d", state["skipped"], state["d_skipped"])
    backend.barrier()
    return {"is_main": backend.is_main, "global_step": state["global_step"], "skipped": state["skipped"],
            "d_skipped": state["d_skipped"], "summary": table, "export": export_path, "generator_state": final_state,
            "stopped": stopped, "preempted": run.preempted}


def _train_stage(run: _Run, stage: _Stage) -> bool:
    """The per-step loop of a stage, from ``run.state["step"]``; True where --stop_at_step stopped it."""
    cfg, backend, state, iterations = run.cfg, run.backend, run.state, stage.spec.iterations
    while state["step"] < iterations:
        step = state["step"]
        run.stats.iteration_begins(state["global_step"] + 1)
        criterion = losses.criterion_for_step(step, iterations)
        if cfg.task == "transfer" and step > 0 and criterion != losses.criterion_for_step(step - 1, iterations):
            log.info("stage %d step %d: criterion %s -> %s (paper section 3.3: L2 in the first half of each stage, "
                     "L1 in the second). The loss values jump here because they measure differently: for feature "
                     "differences below 1, |d| is larger than d^2; training did not diverge", stage.idx, step,
                     losses.criterion_for_step(step - 1, iterations).upper(), criterion.upper())
        stage.generator.fade_alpha = _fade_alpha(cfg, stage.idx, step, iterations, state)
        lr_factor = _set_learning_rates(run, stage, step)
        info = {"stage": stage.idx, "resolution": stage.spec.resolution, "step_in_stage": step,
                "global_step": state["global_step"], "criterion": criterion, "disc_active": stage.d_engine is not None,
                "fade_alpha": stage.generator.fade_alpha, "lr_factor": lr_factor}
        out = _step(run, stage, criterion, info)
        run.stats.iteration_ends(state["global_step"] + 1)
        # SIGTERM/SIGUSR1 on any rank: all stop after this step, with a checkpoint
        run.preempted = run.preempted or signals.name(out["agreed"][0])
        state["d_skipped"] += int(out["d_skipped"])
        if out["skipped"]:
            state["skipped"] += 1
            log.warning("stage %d step %d: non-finite loss (%s), step skipped (%d so far)", stage.idx, step,
                        {k: float(v.detach()) for k, v in out["terms"].items()}, state["skipped"])

        state["step"] += 1
        state["global_step"] += 1
        state["epoch"], state["consumed"] = stage.batches.epoch, stage.batches.consumed
        last = state["step"] == iterations
        log_now = state["step"] % max(cfg.train.log_every, 1) == 0 or last or step == 0 or run.preempted is not None
        values = _loss_values(criterion, out) if run.callback is not None else {}
        if log_now:
            shown = _record_stats(run, stage, criterion, out)  # rank means (a collective, every rank)
        elif run.reporter.wants_values():  # rank 0's bar, every BAR_REFRESH_S seconds: its own values, no collective
            shown = values or _loss_values(criterion, out)
        else:
            shown = {}
        run.reporter.step(stage.idx, state["step"], state["global_step"], stage.global_batch, shown, out["skipped"],
                          log_now)
        if run.callback is not None:
            run.callback({**info, "skipped": out["skipped"], "terms": values, "generator": stage.generator,
                          "generator_engine": stage.g_engine, "discriminator_engine": stage.d_engine})

        stop = run.stop_reached()
        if cfg.train.sample_every > 0 and state["step"] % cfg.train.sample_every == 0 and not (last or run.preempted):
            _write_samples(run, stage)
        if last or stop or (cfg.train.checkpoint_every > 0 and state["global_step"] % cfg.train.checkpoint_every == 0):
            _save_checkpoint(run, stage)
        if stop and (not last or run.preempted):  # preempted: the stage's samples and export wait for the resume
            return True
    return False


def _step(run: _Run, stage: _Stage, criterion: str, info: dict) -> dict:
    """One optimiser step of the task's model over ``stage.accumulation`` micro-batches: {"terms" (means
    over the micro-batches), "d_loss", "skipped", "d_skipped" (the step was dropped), "fake" (the last)}."""
    cfg, backend = run.cfg, run.backend
    # the stop flag rides in each micro-batch's one all-reduced host read: every rank stops after the same step
    agree = run.signals.flag(backend.device)
    outs = []
    for micro in range(stage.accumulation):
        with run.stats.data():
            batch = stage.batches.next()
        micro_info = {**info, "micro_step": micro}
        if cfg.task == "garment_flow":
            outs.append(flow_task.train_step(stage.g_engine, stage.generator, run.vgg, cfg, batch, backend,
                                             loss_hook=run.loss_hook, info=micro_info, agree=agree))
            continue
        reference, target, kp_ref, kp_tgt = _to_device(batch, backend)
        outs.append(train_step(stage.g_engine, stage.generator, run.vgg, cfg, reference, target, kp_ref, kp_tgt,
                               criterion, cfg.train.impl, backend, d_engine=stage.d_engine, loss_hook=run.loss_hook,
                               info=micro_info, agree=agree))
    if len(outs) == 1:
        return outs[0]
    mean = lambda values: torch.stack([v.detach().float() for v in values]).mean()  # noqa: E731
    return {"terms": {k: mean([o["terms"][k] for o in outs]) for k in outs[0]["terms"]},
            "d_loss": None if outs[0]["d_loss"] is None else mean([o["d_loss"] for o in outs]),
            "skipped": any(o["skipped"] for o in outs), "d_skipped": any(o["d_skipped"] for o in outs),
            # each micro-batch's agreed values are the same on every rank, so their maximum is too
            "agreed": [max(values) for values in zip(*(o["agreed"] for o in outs))],
            "fake": outs[-1]["fake"]}


def _loss_values(criterion: str, out: dict) -> dict:
    """This rank's loss terms as floats for the callback: criterion, terms, then "d"."""
    values = {k: float(v.detach()) for k, v in out["terms"].items()}
    if out["d_loss"] is not None:
        values["d"] = float(out["d_loss"].detach())
    return {"criterion": criterion, **values}


def _record_stats(run: _Run, stage: _Stage, criterion: str, out: dict) -> dict:
    """A log step's line of stats.jsonl (every rank: one collective); criterion and the terms' rank means
    for the log line."""
    state, g_opt = run.state, stage.g_engine.optimizer
    terms = {**out["terms"], **({"d": out["d_loss"]} if out["d_loss"] is not None else {})}
    means = run.stats.record(
        terms=terms, images_per_iteration=stage.global_batch, step=state["global_step"],
        stage=stage.idx, step_in_stage=state["step"], resolution=stage.spec.resolution, criterion=criterion,
        lr=g_opt.param_groups[0]["lr"],
        d_lr=stage.d_engine.optimizer.param_groups[0]["lr"] if stage.d_engine is not None else None,
        fade_alpha=float(stage.generator.fade_alpha), loss_scale=stage.g_engine.loss_scale(),
        skipped=state["skipped"], d_skipped=state["d_skipped"])
    return {"criterion": criterion, **means}


def _log_run_start(cfg: Config, backend: Backend, resume_from: Optional[Path], state: dict) -> None:
    """The head of train.log: the world (gathered from every rank: a collective), a CPU fallback, where
    the run resumed, the backend, the fast paths, a random-VGG warning."""
    records = backend.all_gather_object(launch.rank_record(backend.world, backend.device, backend.cpu_fallback))
    if backend.is_main:  # one banner, not one per rank
        launch.log_world(backend.world, records, torch.distributed.get_backend() if backend.distributed else None,
                         cfg.train.dist_timeout_s)
    if resume_from is not None:
        log.info("resuming from %s: stage %d step %d (global %d)", resume_from, state["stage"], state["step"],
                 state["global_step"])
    log.info("backend: %s", backend.description)
    log.info("fast paths and versions:\n%s", ops.format_backend_status(ops.backend_status(backend.device)))
    if cfg.loss.vgg_weights == "random":
        log.warning("!" * 72 + "\n  loss.vgg_weights=random: the perceptual losses use an UNTRAINED VGG-16.\n"
                    "  Fine for tests and the CPU demo; real training needs the ImageNet weights.\n" + "!" * 72)


# ----------------------------------------------------------------------------- stages
def _begin_stage(run: _Run, idx: int, generator, resume_from: Optional[Path]) -> _Stage:
    """Stage ``idx`` ready to train: the generator grown to its resolution, fresh engines and optimisers,
    the local discriminators where they train, the data from the stage's position, and, when resuming
    inside it, the checkpoint's state."""
    from hptransfer.models import LocalDiscriminator

    cfg, backend, state = run.cfg, run.backend, run.state
    st = cfg.stages[idx]
    R = st.resolution
    if generator.resolution != R:
        generator.grow(input_fade=_fades(cfg, idx, state))
    # the stage's activation checkpointing (stages.N.activation_checkpointing, else train's switch)
    generator.set_activation_checkpointing(cfg.train.activation_checkpointing if st.activation_checkpointing is None
                                           else st.activation_checkpointing)
    global_batch, accumulation = stage_global_batch(cfg, idx, backend.world_size)
    generator = backend.prepare(generator, sync_bn=cfg.train.sync_batchnorm)
    g_engine = backend.engine("generator", generator, _make_optimizer(cfg, generator.parameters(), cfg.train.lr),
                              st.batch_size, accumulation=accumulation)
    _compile_generator(cfg.train.compile, generator, g_engine)
    d_engine = None
    # From loss.disc_at_resolution on (the paper: the top stage only), as losses.active_terms says.
    if cfg.task == "transfer" and losses.active_terms(cfg.loss, R)["adv"]:
        n, crop = losses.descriptors_at(cfg.loss, R), pose.crop_size(R)
        discriminator = backend.prepare(LocalDiscriminator(cfg.model, n, crop), sync_bn=cfg.train.sync_batchnorm)
        d_engine = backend.engine("discriminator", discriminator,
                                  _make_optimizer(cfg, discriminator.parameters(), cfg.loss.disc_lr),
                                  st.batch_size, accumulation=accumulation)
        log.info("stage %d: local discriminators on (%d descriptors, crop %d px)", idx, n, crop)
    if state["stage"] != idx:  # a new stage starts at its beginning
        state.update(stage=idx, step=0, epoch=0, consumed=0)
    elif resume_from is not None:
        _map_data_position(state, st, global_batch, resume_from)
    state["global_batch"] = global_batch
    if accumulation > 1:
        log.info("stage %d: global batch %d = %d ranks x batch_size %d x %d accumulated micro-batches", idx,
                 global_batch, backend.world_size, st.batch_size, accumulation)
    batches = _Batches(cfg, _dataset(cfg, cfg.data.train_split, R, cfg.data.flip), st.batch_size,
                       cfg.train.seed + 1000 * idx, backend, state["epoch"], state["consumed"], accumulation)
    stage = _Stage(idx, st, generator, g_engine, d_engine, batches, _sample_batch(cfg, R), global_batch, accumulation)
    if resume_from is not None:
        _load_checkpoint(run, stage, resume_from)
    run.reporter.stage_start(idx, R, st.iterations, state["step"])
    switch = (st.iterations + 1) // 2  # the first step losses.criterion_for_step gives L1
    if cfg.task == "transfer" and switch < st.iterations:
        log.info("stage %d: criterion L2 for steps 0-%d, L1 from step %d (section 3.3; the loss values jump at the "
                 "switch)", idx, switch - 1, switch)
    generator.train()
    return stage


def _end_stage(run: _Run, stage: _Stage) -> tuple:
    """Samples and the export (the stage's last step wrote its checkpoint, the Reporter holds its summary
    row), then the hand-off: (export path, the next stage's generator or None where the run ends here)."""
    _write_samples(run, stage)
    export_path = _export(run, stage)
    if run.stop_reached() or stage.idx + 1 == len(run.cfg.stages):
        return export_path, None
    # Rebuilt from the fp32 master weights (gathered under ZeRO-3); _begin_stage grows it.
    return export_path, _build_generator(run.cfg, stage.spec.resolution, run.backend.full_state_dict(stage.g_engine))


# ----------------------------------------------------------------------------- resume
def _where_to_start(resume: Optional[str], overwrite: bool, out_dir: Path, backend: Backend) -> tuple:
    """(checkpoint directory or None, the run's counters): a fresh run's, or the checkpoint's stage /
    step / data position."""
    ckpt_dir, meta = _resume_point(resume, overwrite, out_dir, backend)
    state = {"stage": 0, "step": 0, "global_step": 0, "epoch": 0, "consumed": 0, "skipped": 0, "d_skipped": 0,
             "init_grown": False}
    if ckpt_dir is not None:
        state.update(meta["state"])
    return ckpt_dir, state


def _load_checkpoint(run: _Run, stage: _Stage, ckpt_dir: Path) -> None:
    """Resume inside ``stage``: weights, optimisers, scaler, then the RNG last. A DeepSpeed checkpoint of
    another number of ranks is resharded in a scratch folder of this run's checkpoints
    (``hptransfer.distributed.reshard``)."""
    run.backend.load_engines(ckpt_dir, stage.engines, scratch=Path(run.cfg.train.out_dir) / "checkpoints")
    ckpt.load_rng(ckpt_dir, run.backend.rank)


def _map_data_position(state: dict, spec: StageConfig, global_batch: int, ckpt_dir: Path) -> None:
    """The resumed stage's data position (optimiser steps into the epoch) for this run's global batch.
    The same global batch keeps it exactly; another one (a changed global_batch, or no global_batch and
    another number of ranks) moves it to the last whole new step inside the samples already seen."""
    from hptransfer.distributed.reshard import map_data_position

    # checkpoints from before train.global_batch: batch_size x the ranks that wrote them
    saved = state.get("global_batch") or spec.batch_size * ckpt.read_meta(ckpt_dir).get("world_size", 1)
    if saved == global_batch:
        return
    consumed, again = map_data_position(state["consumed"], saved, global_batch)
    log.warning("global batch %d (checkpoint) -> %d (this run): the data position moves from step %d to step %d of "
                "epoch %d (the same samples seen, %d of them again); later steps take the epoch's next samples %d "
                "at a time", saved, global_batch, state["consumed"], consumed, state["epoch"], again, global_batch)
    state["consumed"] = consumed


def _resume_point(resume: Optional[str], overwrite: bool, out_dir: Path, backend: Backend):
    """(checkpoint directory or None, its meta), decided ONCE on rank 0 and broadcast, so every rank
    resumes from the same checkpoint (or starts afresh) even while ``latest`` changes under them.

    Refused, on every rank alike: an out_dir holding checkpoints with neither ``resume`` nor
    ``overwrite`` (``overwrite`` deletes them on rank 0 first); a checkpoint of the other backend (single
    process vs DeepSpeed). ZeRO shards of another number of ranks are resharded when loaded.
    """
    from hptransfer.errors import CheckpointError, OutputExistsError

    decision = None
    if backend.is_main:
        try:
            root = out_dir / "checkpoints"
            if resume and overwrite:
                raise ValueError("--resume and --overwrite exclude each other: resume the run, or start it afresh")
            ckpt_dir = meta = None
            if resume:
                ckpt_dir = ckpt.resolve(resume, out_dir)
                if ckpt_dir is None:
                    log.info("--resume auto: no checkpoint in %s, starting fresh", root)
            elif ckpt.complete(root) or (root / ckpt.LATEST).exists():
                if not overwrite:
                    raise OutputExistsError(f"{out_dir} already holds checkpoints ({root}); resume them with --resume "
                                            f"(auto), start afresh with --overwrite (deletes them), or choose another "
                                            f"out_dir")
                log.warning("--overwrite: deleting the checkpoints in %s", root)
                shutil.rmtree(root)
            if ckpt_dir is not None:
                meta = ckpt.read_meta(ckpt_dir)
                _check_resumable(ckpt_dir, meta, backend, CheckpointError)
            decision = ("ok", ckpt_dir, meta)
        except Exception as e:  # raised on every rank below: none may wait in a collective for rank 0
            decision = ("error", e, None)
    status, value, meta = backend.broadcast_object(decision)
    if status == "error":
        raise value
    return value, meta


def _check_resumable(ckpt_dir: Path, meta: dict, backend: Backend, error) -> None:
    """Refuse what cannot load (the other backend's format); say what changes with the number of ranks."""
    wrote_ds = meta.get("backend", "single" if (ckpt_dir / "generator.pt").is_file() else "deepspeed") == "deepspeed"
    if wrote_ds != backend.distributed:
        raise error(f"{ckpt_dir} was written by {'DeepSpeed' if wrote_ds else 'a single process'}; resume it the same "
                    f"way ({'with' if wrote_ds else 'without'} --deepspeed_config), or start a new run from its "
                    f"weights (--init-from)")
    ranks = meta.get("world_size", 1)
    if ranks != backend.world_size:
        how = (" (its ZeRO optimiser shards are resharded through DeepSpeed's universal checkpoint)"
               if wrote_ds and meta.get("zero_stage", 0) > 0 else "")
        log.warning("checkpoint written by %d ranks, resuming on %d%s: weights and optimiser state carry over; "
                    "each rank's share of the data and the ranks' RNG streams change (docs/cluster.md)", ranks,
                    backend.world_size, how)


def _init_source(path: str) -> tuple:
    """``export.resolve_source`` of an --init-from path (kind, directory, metadata), or ConfigError."""
    from hptransfer.export import resolve_source

    try:
        return resolve_source(path)
    except FileNotFoundError as e:
        raise ConfigError(f"--init-from {path}: no export or training checkpoint there ({e})") from None


def _init_resolution(path: str) -> int:
    return int(_init_source(path)[2]["arch"]["resolution"])


def _init_from(cfg: Config, path: str, fade: bool = False):
    """The generator of a new run from the weights at ``path`` only (no optimiser, RNG or step): what
    ``export.load_any`` reads (an export, a single-process or DeepSpeed checkpoint, a run directory: its
    latest checkpoint). A lower-resolution generator is grown to the first stage's resolution (new blocks
    untrained), as a progressive run grows between stages: the last growth with the input fade when
    ``fade`` (model.input_fade > 0), so that a branch equals the progressive run it branches from."""
    from hptransfer.export import load_any

    source = _init_source(path)[1]
    with torch.random.fork_rng(devices=[]):  # reading weights does not move this run's RNG
        loaded = load_any(source)
    state, resolution = loaded.state_dict(), loaded.resolution
    R0 = cfg.stages[0].resolution
    if resolution > R0:
        raise ConfigError(f"--init-from {path}: a {resolution}-px generator cannot start a run whose first stage "
                          f"is {R0} px")
    try:
        g = _build_generator(cfg, resolution, state)
    except RuntimeError as e:
        raise ConfigError(f"--init-from {path}: weights do not fit this config's model section: {e}") from None
    while g.resolution < R0:
        g.grow(input_fade=fade and g.resolution * 2 == R0)
    fades = " with the input and output fades" if cfg.model.output_fade else " with the input fade"
    log.info("--init-from %s: %d-px generator weights%s (new run: fresh optimisers, step 0)", source, resolution,
             f", grown to {R0} px" + (fades if fade else "") if resolution < R0 else "")
    return g


# ----------------------------------------------------------------------------- samples, export, checkpoints
def _sample_batch(cfg: Config, resolution: int, n: int = 4) -> dict:
    """A fixed batch of up to ``n`` test pairs spread over the split (train if no test split), unflipped."""
    if cfg.task == "garment_flow":
        return flow_task.sample_batch(cfg, resolution, n)
    for split in (cfg.data.test_split, cfg.data.train_split):
        try:
            ds = _dataset(cfg, split, resolution, flip=False)
        except (FileNotFoundError, OSError, ValueError):
            continue
        picks = sorted({round(i * (len(ds) - 1) / max(n - 1, 1)) for i in range(n)}) if len(ds) else []
        items = [ds[i] for i in picks]  # spread over the split: different people, not one person's pairs
        if items:
            return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in
                    ("reference", "target", "kp_reference", "kp_target")}
    return {}


def _eval_generator(run: _Run, stage: _Stage):
    """The generator in eval mode, fp32: the training module itself (single process) or a gathered copy."""
    if not run.backend.distributed:
        return stage.generator
    g = _build_generator(run.cfg, stage.generator.resolution, run.backend.full_state_dict(stage.g_engine))  # collective
    g.fade_alpha = stage.generator.fade_alpha
    return g.to(run.backend.device)


def _write_samples(run: _Run, stage: _Stage) -> None:
    cfg, backend, samples, global_step = run.cfg, run.backend, stage.samples, run.state["global_step"]
    if not samples:
        return
    g = _eval_generator(run, stage)
    path = Path(cfg.train.out_dir) / "samples" / f"stage{stage.generator.resolution}_step{global_step}.png"
    if backend.is_main and cfg.task == "garment_flow":
        run.reporter.image("samples", flow_task.write_samples(g, samples, path), global_step)
        log.info("samples (source | garment | target region | flow | warped | target garment): %s", path)
    elif backend.is_main:
        was_training = g.training
        g.eval()
        with torch.no_grad():
            ref = samples["reference"].to(backend.device, next(g.parameters()).dtype)
            out = g(ref, samples["kp_target"].to(backend.device).float())
        g.train(was_training)
        save_sample_grid(path, samples["reference"], samples["kp_target"], out, samples["target"])
        run.reporter.image("samples", path, global_step)
        log.info("samples: %s", path)
    backend.barrier()


def _export(run: _Run, stage: _Stage) -> Path:
    """The stage's export into ``export/<R>px/`` (kept), then ``export/`` itself made the same (the latest)."""
    from hptransfer.export import export_generator

    cfg, backend, state = run.cfg, run.backend, run.state
    g = _eval_generator(run, stage)
    path = Path(cfg.train.out_dir) / "export"
    if backend.is_main:
        was_training = g.training
        write = flow_task.export_flow if cfg.task == "garment_flow" else export_generator
        name = f"{stage.generator.resolution}px"
        write(g, path / name, extra={"global_step": state["global_step"], "stage": state["stage"]})
        ckpt.publish_stage_export(path, name)
        g.train(was_training)
        what = "appearance-flow model" if cfg.task == "garment_flow" else "generator"
        log.info("exported %d-px %s to %s (and %s)", stage.generator.resolution, what, path, path / name)
    backend.barrier()
    return path


def _save_checkpoint(run: _Run, stage: _Stage) -> None:
    backend, state, engines = run.backend, run.state, stage.engines
    root = Path(run.cfg.train.out_dir) / "checkpoints"
    tmp = ckpt.begin(root, state["global_step"], backend.is_main, backend.barrier)
    meta = {"state": dict(state), "arch": stage.generator.arch(), "fade_alpha": stage.generator.fade_alpha,
            "world_size": backend.world_size,
            "backend": "deepspeed" if backend.distributed else "single",
            "zero_stage": getattr(backend, "zero_stage", 0),
            "zero_stages": {name: getattr(backend, "zero_stages", {}).get(name, 0) for name in engines},
            "engines": sorted(engines), "time": time.time(),
            "preempted": run.preempted}  # the signal that stopped the run here (a requeue script reads it)
    backend.save_engines(tmp, engines)
    ckpt.save_rng(tmp, backend.rank)
    ckpt.finish(root, tmp, meta, run.cfg.train.keep_checkpoints, backend.is_main, backend.barrier)


if __name__ == "__main__":
    raise SystemExit(main())
