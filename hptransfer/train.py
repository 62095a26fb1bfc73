"""Progressive training (paper sections 3.3-3.4): 64 -> 128 -> ... px, one stage per resolution.

Three launches, same arguments::

    hptransfer train --config configs/synth_demo.yaml [section.key=value ...]
    python -m hptransfer.train --config configs/synth_demo.yaml
    deepspeed [--num_gpus N | --hostfile H] hptransfer/train.py --config X.yaml --deepspeed_config configs/ds/zero2_bf16.json

Per stage: generator at the stage's resolution (``grow()`` between stages, optimiser, loader and
DeepSpeed engines rebuilt), criterion L2 in the first half of the stage and L1 in the second, local
descriptors 18/31/44, local discriminators (their own engine and optimiser, a D step then a G step
each iteration) only at ``loss.disc_at_resolution``. A non-finite loss skips the step on every rank.
Checkpoints every ``train.checkpoint_every`` steps and at stage ends; export and a sample grid at
every stage end. Reads top to bottom: set-up, per stage (build, loop, finish), summary.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and sys.path and sys.path[0].rstrip("/").endswith("hptransfer"):
    sys.path.pop(0)  # run as a file (the deepspeed launcher): our modules must not shadow top-level names

import argparse
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from hptransfer import checkpoint as ckpt
from hptransfer import losses, ops, pose
from hptransfer.backend import Backend, Engine, make_backend
from hptransfer.config import Config, ConfigError, load_config, save_config
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
    parser.add_argument("--stop_at_step", "--stop-at-step", dest="stop_at_step", type=int, default=None,
                        help="stop after this global step (writes a checkpoint first), e.g. to test resume")
    parser.add_argument("--init-from", "--init_from", dest="init_from", default=None, metavar="CHECKPOINT",
                        help="start a new run from these generator weights only (checkpoint dir, run dir or "
                             "export dir; grown to the first stage's resolution); ignored when resuming")
    # Passed by the deepspeed launcher; the rank is read from the LOCAL_RANK environment variable.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides or [])
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    cfg = load_config(args.config, overrides)  # ConfigError: a user error, one line (hptransfer.cli)
    result = train(cfg, ds_config=args.deepspeed_config, resume=args.resume, overwrite=args.overwrite,
                   stop_at_step=args.stop_at_step,
                   init_from=args.init_from)
    if result["is_main"]:  # the summary table is in the log already
        print(f"export: {result['export']}  samples: {Path(cfg.train.out_dir) / 'samples'}  "
              f"log: {Path(cfg.train.out_dir) / 'train.log'}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # communication threads must not outlive the interpreter
    return 0


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="hptransfer train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from hptransfer.cli import run_guarded  # user errors as one line, as under `hptransfer train`

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


def _make_optimizer(cfg: Config, params, lr: float) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    return cls([p for p in params if p.requires_grad], lr=lr, betas=tuple(cfg.train.betas),
               weight_decay=cfg.train.weight_decay)


def _build_generator(cfg: Config, resolution: int, state: Optional[dict] = None, fading: bool = False):
    """A generator at ``resolution``, with the input fade's from-RGB when ``fading`` or ``state`` has it."""
    if cfg.task == "garment_flow":
        return flow_task.build_model(cfg, resolution, state)
    from hptransfer.models import Generator

    g = Generator(cfg.model, resolution)
    if fading or (state is not None and any(k.startswith(f"from_rgb.{resolution // 2}.") for k in state)):
        g.add_input_fade()
    if state is not None:
        g.load_state_dict(state)
    g.kernels = cfg.train.kernels
    g.set_activation_checkpointing(cfg.train.activation_checkpointing)
    return g


def _fades(cfg: Config, stage_idx: int) -> bool:
    """Whether stage ``stage_idx`` starts with the input fade (a grown stage, model.input_fade > 0)."""
    return stage_idx > 0 and cfg.model.input_fade > 0


def _fade_alpha(cfg: Config, stage_idx: int, step: int, iterations: int) -> float:
    """Weight of the new input path at 0-based ``step``: linear from 0 at the first step of the fade's
    window (the first round(input_fade * iterations) steps) to exactly 1 at its last step."""
    if not _fades(cfg, stage_idx):
        return 1.0
    window = max(round(cfg.model.input_fade * iterations), 1)
    return min(1.0, step / max(window - 1, 1))


def _build_vgg(cfg: Config, backend: Backend):
    from hptransfer.models import VGG16Features

    vgg = VGG16Features(weights=cfg.loss.vgg_weights, layers=tuple(cfg.loss.layers))
    vgg = vgg.to(backend.device).eval()
    for p in vgg.parameters():  # frozen: not in any optimiser, not in checkpoints
        p.requires_grad_(False)
    if backend.device.type == "cuda" and backend.channels_last:
        vgg = vgg.to(memory_format=torch.channels_last)
    return vgg


def _dataset(cfg: Config, split: str, resolution: int, flip: bool):
    if cfg.task == "garment_flow":
        return flow_task.dataset(cfg, split, resolution, flip)
    from hptransfer.data import PairDataset

    return PairDataset(cfg.data.root, split, resolution, flip=flip, fit=cfg.data.fit, skip_bad=cfg.data.skip_bad,
                       seed=cfg.train.seed)


class _Batches:
    """Endless batches of a stage with an exact position: (epoch, batches consumed in the epoch)."""

    def __init__(self, cfg: Config, dataset, batch_size: int, seed: int, backend: Backend, epoch: int, consumed: int):
        from hptransfer.data.dali import make_loader_for_config  # data.loader: torch DataLoader or DALI

        self.make = lambda e, skip: make_loader_for_config(cfg.data, dataset, batch_size, device=backend.device,
                                                           seed=seed, rank=backend.rank,
                                                           world_size=backend.world_size, epoch=e, skip_batches=skip)
        self.dataset, self.epoch, self.consumed = dataset, epoch, consumed
        self.it = None

    def next(self) -> dict:
        for _ in range(2):
            if self.it is None:
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(self.epoch)
                # A DataLoader iterator without its own generator draws its base seed from the global
                # RNG; fork so that where the iterator is made (fresh vs resumed) never shifts the RNG.
                with torch.random.fork_rng(devices=[]):
                    self.it = iter(self.make(self.epoch, self.consumed))
            try:
                batch = next(self.it)
                self.consumed += 1
                return batch
            except StopIteration:
                self.epoch, self.consumed, self.it = self.epoch + 1, 0, None
        raise RuntimeError(f"the training loader yields no batch: {len(self.dataset)} pairs are fewer than one batch "
                           f"per rank; lower the stage batch_size or add data")


def _to_device(batch: dict, backend: Backend) -> tuple:
    dev, dt = backend.device, backend.input_dtype
    fmt = torch.channels_last if dev.type == "cuda" and backend.channels_last else torch.contiguous_format
    img = lambda k: batch[k].to(dev, non_blocking=True).to(dtype=dt, memory_format=fmt)  # noqa: E731
    kp = lambda k: batch[k].to(dev, non_blocking=True).float()  # noqa: E731
    return img("reference"), img("target"), kp("kp_reference"), kp("kp_target")


# ----------------------------------------------------------------------------- training

def train(cfg: Config, *, ds_config: Optional[str] = None, resume: Optional[str] = None, overwrite: bool = False,
          stop_at_step: Optional[int] = None, callback: Optional[Callable[[dict], None]] = None,
          loss_hook: Optional[Callable[[dict, dict], dict]] = None, init_from: Optional[str] = None) -> dict:
    """Train through ``cfg.stages``. Returns {"is_main", "global_step", "skipped", "summary", "export",
    "generator_state" (fp32 CPU state dict of the final generator)}.

    ``resume``: a checkpoint path or "auto" (see :func:`_resume_point`); an out_dir that holds
    checkpoints needs ``resume`` or ``overwrite`` (which deletes them), else OutputExistsError.
    ``callback(info)`` runs after every iteration on every rank (info: stage, resolution,
    step_in_stage, global_step, criterion, disc_active, skipped, terms as floats, generator: the
    training module). ``loss_hook(terms, info) -> terms`` may replace the generator's loss terms
    before the finite check (a debug hook: the tests force a NaN through it). ``init_from``: see
    :func:`_init_from` (used only when the run does not resume).
    """
    from hptransfer.models import LocalDiscriminator

    backend = make_backend(cfg, ds_config)
    _seed_everything(cfg.train.seed + backend.rank, cfg.train.deterministic)
    out_dir = Path(cfg.train.out_dir)
    root = out_dir / "checkpoints"
    ckpt_dir, meta = _resume_point(resume, overwrite, out_dir, backend)  # before anything is written there
    # What a user can get wrong is read before anything is written: bad training data or missing VGG
    # weights stop the run with out_dir as it was.
    _dataset(cfg, cfg.data.train_split, cfg.stages[0].resolution, flip=False)
    vgg = _build_vgg(cfg, backend)
    if backend.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    backend.barrier()
    total = sum(s.iterations for s in cfg.stages)

    # Where to start: a fresh run, or a checkpoint's stage / step / data position.
    start = {"stage": 0, "step": 0, "global_step": 0, "epoch": 0, "consumed": 0, "skipped": 0, "d_skipped": 0}
    if ckpt_dir is not None:
        start.update(meta["state"])

    reporter = Reporter(out_dir, enabled=backend.is_main, tensorboard=cfg.train.tensorboard, total_steps=total,
                        initial_step=start["global_step"])
    if ckpt_dir is not None:  # after the Reporter: train.log says where the run resumed
        log.info("resuming from %s: stage %d step %d (global %d)", ckpt_dir, start["stage"], start["step"],
                 start["global_step"])
    log.info("backend: %s", backend.description)
    log.info("fast paths and versions:\n%s", ops.format_backend_status(ops.backend_status(backend.device)))
    if cfg.loss.vgg_weights == "random":
        log.warning("!" * 72 + "\n  loss.vgg_weights=random: the perceptual losses use an UNTRAINED VGG-16.\n"
                    "  Fine for tests and the CPU demo; real training needs the ImageNet weights.\n" + "!" * 72)
    impl = cfg.train.kernels
    state = dict(start)
    generator = _build_generator(cfg, cfg.stages[start["stage"]].resolution, fading=_fades(cfg, start["stage"]))
    if init_from and ckpt_dir is None:
        generator = _init_from(cfg, init_from)
    export_path = None
    g_engine: Optional[Engine] = None
    stopped = False

    for stage_idx in range(start["stage"], len(cfg.stages)):
        st = cfg.stages[stage_idx]
        R = st.resolution
        # ---- build the stage: generator at R, engines (optimisers), data
        if generator.resolution != R:
            generator.grow(input_fade=_fades(cfg, stage_idx))
        generator = backend.prepare(generator)
        g_engine = backend.engine("generator", generator, _make_optimizer(cfg, generator.parameters(), cfg.train.lr),
                                  st.batch_size)
        if cfg.train.compile:  # optional; the first steps of every stage pay the compilation
            if hasattr(g_engine, "forward_fn"):
                g_engine.forward_fn = torch.compile(generator)
            elif hasattr(getattr(g_engine, "engine", None), "compile"):
                g_engine.engine.compile()
        # From loss.disc_at_resolution on (the paper: the top stage only), as losses.active_terms says.
        disc_active = cfg.task == "transfer" and losses.active_terms(cfg.loss, R)["adv"]
        engines = {"generator": g_engine}
        d_engine = None
        if disc_active:
            disc = backend.prepare(LocalDiscriminator(cfg.model, losses.descriptors_at(cfg.loss, R), pose.crop_size(R)))
            d_engine = backend.engine("discriminator", disc, _make_optimizer(cfg, disc.parameters(), cfg.loss.disc_lr),
                                      st.batch_size)
            engines["discriminator"] = d_engine
            log.info("stage %d: local discriminators on (%d descriptors, crop %d px)", stage_idx,
                     losses.descriptors_at(cfg.loss, R), pose.crop_size(R))
        if state["stage"] != stage_idx:  # a new stage starts at its beginning
            state.update(stage=stage_idx, step=0, epoch=0, consumed=0)
        dataset = _dataset(cfg, cfg.data.train_split, R, cfg.data.flip)
        batches = _Batches(cfg, dataset, st.batch_size, cfg.train.seed + 1000 * stage_idx, backend,
                           state["epoch"], state["consumed"])
        samples = _sample_batch(cfg, R)
        if ckpt_dir is not None:  # resuming inside this stage: weights, optimisers, scaler, then RNG last
            backend.load_engines(ckpt_dir, engines)
            ckpt.load_rng(ckpt_dir, backend.rank)
            ckpt_dir = None
        reporter.stage_start(stage_idx, R, st.iterations, state["step"])
        generator.train()

        # ---- the loop
        while state["step"] < st.iterations:
            step = state["step"]
            criterion = losses.criterion_for_step(step, st.iterations)
            generator.fade_alpha = _fade_alpha(cfg, stage_idx, step, st.iterations)
            batch = batches.next()
            info = {"stage": stage_idx, "resolution": R, "step_in_stage": step, "global_step": state["global_step"],
                    "criterion": criterion, "disc_active": d_engine is not None,
                    "fade_alpha": generator.fade_alpha}
            if cfg.task == "garment_flow":
                out = flow_task.train_step(g_engine, generator, vgg, cfg, batch, backend, loss_hook=loss_hook, info=info)
            else:
                reference, target, kp_ref, kp_tgt = _to_device(batch, backend)
                out = train_step(g_engine, generator, vgg, cfg, reference, target, kp_ref, kp_tgt, criterion, impl,
                                 backend, d_engine=d_engine, loss_hook=loss_hook, info=info)
            terms, d_loss, skipped = out["terms"], out["d_loss"], out["skipped"]
            state["d_skipped"] += int(out["d_skipped"])
            if skipped:
                state["skipped"] += 1
                log.warning("stage %d step %d: non-finite loss (%s), step skipped (%d so far)", stage_idx, step,
                            {k: float(v.detach()) for k, v in terms.items()}, state["skipped"])

            state["step"] += 1
            state["global_step"] += 1
            state["epoch"], state["consumed"] = batches.epoch, batches.consumed
            last = state["step"] == st.iterations
            log_now = state["step"] % max(cfg.train.log_every, 1) == 0 or last or step == 0
            values = None
            if log_now or callback is not None:
                values = {k: float(v.detach()) for k, v in terms.items()}
                if d_loss is not None:
                    values["d"] = float(d_loss.detach())
                values = {"criterion": criterion, **values}
            reporter.step(stage_idx, state["step"], state["global_step"], st.batch_size * backend.world_size,
                          values or {}, skipped, log_now)
            if callback is not None:
                callback({**info, "skipped": skipped, "terms": values, "generator": generator})

            stop = stop_at_step is not None and state["global_step"] >= stop_at_step
            if cfg.train.sample_every > 0 and state["step"] % cfg.train.sample_every == 0 and not last:
                _write_samples(cfg, backend, g_engine, generator, samples, reporter, state)
            if last or stop or (cfg.train.checkpoint_every > 0 and state["global_step"] % cfg.train.checkpoint_every == 0):
                _save_checkpoint(cfg, backend, root, engines, state, generator)
            if stop and not last:
                stopped = True
                break

        if stopped:
            break
        # ---- stage end: samples and export (the checkpoint was written on the last step)
        _write_samples(cfg, backend, g_engine, generator, samples, reporter, state)
        export_path = _export(cfg, backend, g_engine, generator, out_dir, state)
        if stop_at_step is not None and state["global_step"] >= stop_at_step:
            stopped = True
            break
        if stage_idx + 1 < len(cfg.stages):
            # Rebuild from the fp32 master weights (gathered under ZeRO-3), then grow.
            generator = _build_generator(cfg, R, backend.full_state_dict(g_engine))

    final_state = backend.full_state_dict(g_engine) if g_engine is not None else {}
    if stopped:
        log.info("stopped at global step %d (--stop_at_step)", state["global_step"])
    table = reporter.close()
    if state["skipped"] or state["d_skipped"]:
        log.warning("skipped steps (non-finite loss): generator %d, discriminator %d", state["skipped"], state["d_skipped"])
    backend.barrier()
    return {"is_main": backend.is_main, "global_step": state["global_step"], "skipped": state["skipped"],
            "d_skipped": state["d_skipped"], "summary": table, "export": export_path, "generator_state": final_state,
            "stopped": stopped}


def _init_from(cfg: Config, path: str):
    """The generator of a new run from the weights at ``path`` only (no optimiser, RNG or step):
    an export directory, a single-process checkpoint directory, or a run directory (its latest
    checkpoint). A lower-resolution generator is grown to the first stage's resolution (new blocks
    untrained, no input fade), as a progressive run grows between stages."""
    from hptransfer.export import load_generator

    p = Path(path)
    if (p / "model.safetensors").is_file():
        exported = load_generator(p)
        state, source, resolution = exported.state_dict(), p, exported.resolution
    else:
        source = p if (p / "meta.json").is_file() else (ckpt.read_latest(p / "checkpoints") or ckpt.read_latest(p))
        if source is None or not (source / "generator.pt").is_file():
            raise ConfigError(f"--init-from {path}: no export (model.safetensors) or single-process checkpoint "
                              f"(meta.json + generator.pt) there")
        state = torch.load(source / "generator.pt", map_location="cpu", weights_only=True)["model"]
        resolution = int(ckpt.read_meta(source)["arch"]["resolution"])
    R0 = cfg.stages[0].resolution
    if resolution > R0:
        raise ConfigError(f"--init-from {path}: a {resolution}-px generator cannot start a run whose first stage "
                          f"is {R0} px")
    try:
        g = _build_generator(cfg, resolution, state)
    except RuntimeError as e:
        raise ConfigError(f"--init-from {path}: weights do not fit this config's model section: {e}") from None
    if g.fading:
        g.fade_alpha = 1.0
    while g.resolution < R0:
        g.grow()
    log.info("--init-from %s: %d-px generator weights%s (new run: fresh optimisers, step 0)", source, resolution,
             f", grown to {R0} px" if resolution < R0 else "")
    return g


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


def _eval_generator(cfg: Config, backend: Backend, g_engine: Engine, generator):
    """The generator in eval mode, fp32: the training module itself (single process) or a gathered copy."""
    if not backend.distributed:
        return generator
    g = _build_generator(cfg, generator.resolution, backend.full_state_dict(g_engine))  # collective
    g.fade_alpha = generator.fade_alpha
    return g.to(backend.device)


def _write_samples(cfg, backend, g_engine, generator, samples, reporter, state) -> None:
    if not samples:
        return
    g = _eval_generator(cfg, backend, g_engine, generator)
    if backend.is_main and cfg.task == "garment_flow":
        path = Path(cfg.train.out_dir) / "samples" / f"stage{generator.resolution}_step{state['global_step']}.png"
        reporter.image("samples", flow_task.write_samples(g, samples, path), state["global_step"])
        log.info("samples (source | garment | target region | flow | warped | target garment): %s", path)
    elif backend.is_main:
        was_training = g.training
        g.eval()
        with torch.no_grad():
            ref = samples["reference"].to(backend.device, next(g.parameters()).dtype)
            out = g(ref, samples["kp_target"].to(backend.device).float())
        g.train(was_training)
        path = Path(cfg.train.out_dir) / "samples" / f"stage{generator.resolution}_step{state['global_step']}.png"
        save_sample_grid(path, samples["reference"], samples["kp_target"], out, samples["target"])
        reporter.image("samples", path, state["global_step"])
        log.info("samples: %s", path)
    backend.barrier()


def _export(cfg, backend, g_engine, generator, out_dir: Path, state: dict) -> Path:
    from hptransfer.export import export_generator

    g = _eval_generator(cfg, backend, g_engine, generator)
    path = out_dir / "export"
    if backend.is_main:
        was_training = g.training
        write = flow_task.export_flow if cfg.task == "garment_flow" else export_generator
        write(g, path, extra={"global_step": state["global_step"], "stage": state["stage"]})
        g.train(was_training)
        what = "appearance-flow model" if cfg.task == "garment_flow" else "generator"
        log.info("exported %d-px %s to %s", generator.resolution, what, path)
    backend.barrier()
    return path


def _resume_point(resume: Optional[str], overwrite: bool, out_dir: Path, backend: Backend):
    """(checkpoint directory or None, its meta), decided ONCE on rank 0 and broadcast, so every rank
    resumes from the same checkpoint (or starts afresh) even while ``latest`` changes under them.

    Refused, on every rank alike: an out_dir holding checkpoints with neither ``resume`` nor
    ``overwrite`` (``overwrite`` deletes them on rank 0 first); a checkpoint whose ZeRO shards were
    written by another number of ranks; a checkpoint of the other backend (single process vs DeepSpeed).
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
    """Refuse what cannot load: the other backend's format, ZeRO shards of another world size."""
    wrote_ds = meta.get("backend", "single" if (ckpt_dir / "generator.pt").is_file() else "deepspeed") == "deepspeed"
    if wrote_ds != backend.distributed:
        raise error(f"{ckpt_dir} was written by {'DeepSpeed' if wrote_ds else 'a single process'}; resume it the same "
                    f"way ({'with' if wrote_ds else 'without'} --deepspeed_config)")
    ranks = meta.get("world_size", 1)
    if ranks != backend.world_size:
        zero = meta.get("zero_stage", getattr(backend, "zero_stage", 0))
        if wrote_ds and zero > 0:
            raise error(f"{ckpt_dir} holds ZeRO-{zero} optimiser shards of {ranks} ranks; this run has "
                        f"{backend.world_size}. Resume on {ranks} ranks, or start a new run from its weights "
                        f"(--init-from)")
        log.warning("checkpoint written by %s ranks, resuming on %s: the data order differs", ranks,
                    backend.world_size)


def _save_checkpoint(cfg, backend, root: Path, engines: dict, state: dict, generator) -> None:
    tmp = ckpt.begin(root, state["global_step"], backend.is_main, backend.barrier)
    meta = {"state": {k: v for k, v in state.items()}, "arch": generator.arch(), "world_size": backend.world_size,
            "backend": "deepspeed" if backend.distributed else "single",
            "zero_stage": getattr(backend, "zero_stage", 0), "engines": sorted(engines), "time": time.time()}
    backend.save_engines(tmp, engines, client_state=meta)
    ckpt.save_rng(tmp, backend.rank)
    ckpt.finish(root, tmp, meta, cfg.train.keep_checkpoints, backend.is_main, backend.barrier)


if __name__ == "__main__":
    raise SystemExit(main())
