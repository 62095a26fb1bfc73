"""What every rank is doing, as numbers: ``out_dir/stats.jsonl`` and TensorBoard scalars.

:class:`RunStats` times each iteration on every rank (waiting for data, the whole iteration) and, at log
steps, gathers every rank's loss terms and timings in ONE collective, so that a record holds each loss
term averaged over the ranks (the global batch's loss), the mean and the slowest rank's data wait, and
the largest peak device memory. Rank 0 appends the record as one JSON line, flushed, and writes the same
scalars to TensorBoard. Fields of a line::

    step, stage, step_in_stage, resolution, time (unix s), ranks, criterion, lr, d_lr (with discriminators),
    fade_alpha, losses {term: rank mean}, img_per_s, step_ms, data_wait_ms, data_wait_ms_max,
    peak_mem_mib (null on CPU), loss_scale (null without fp16 loss scaling), skipped, d_skipped

Timings cover the iterations since the previous line (data wait + step; not the checkpoints, samples
or exports between them). A non-finite value is written as null. A run that resumes appends (steps
after its checkpoint that were logged before the interruption appear twice: the later line is the
resumed run's); a run that starts afresh starts the file anew. It also owns the per-iteration hooks of
an Nsight capture window (:class:`hptransfer.profiling.CaptureWindow`) and the NVTX range around data
loading.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from hptransfer import profiling

STATS_FILE = "stats.jsonl"


def _finite_or_none(v: Optional[float]) -> Optional[float]:
    return v if v is None or math.isfinite(v) else None


class RunStats:
    """Per-iteration timing and the log steps' rank-reduced records (see the module docstring). Made on
    every rank (the gather is a collective); only rank 0 writes."""

    def __init__(self, backend, out_dir: str | Path, tb=None, fresh: bool = True):
        self.backend = backend
        self.path = Path(out_dir) / STATS_FILE
        self.tb = tb
        self.file = open(self.path, "w" if fresh else "a") if backend.is_main else None
        self.window = profiling.CaptureWindow.from_env()
        self._t0 = 0.0
        self._clear()

    def _clear(self) -> None:
        self.wait_s = self.iter_s = 0.0
        self.iterations = 0

    # ------------------------------------------------------------------ every iteration
    def iteration_begins(self, global_step: int) -> None:
        """Before an iteration; ``global_step`` as the log numbers it (1 = the run's first)."""
        if self.window is not None:
            self.window.step_begins(global_step)
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def data(self):
        """Around fetching a batch: its wait, and an NVTX range "data"."""
        t = time.perf_counter()
        with profiling.phase("data"):
            yield
        self.wait_s += time.perf_counter() - t

    def iteration_ends(self, global_step: int) -> None:
        """After the iteration's step (its host read has synchronised the device)."""
        self.iter_s += time.perf_counter() - self._t0
        self.iterations += 1
        if self.window is not None:
            self.window.step_ends(global_step)

    # ------------------------------------------------------------------ log steps
    def record(self, *, terms: dict, images_per_iteration: int, step: int, stage: int, step_in_stage: int,
               resolution: int, criterion: str, lr: float, d_lr: Optional[float], fade_alpha: float,
               loss_scale: Optional[float], skipped: int, d_skipped: int) -> dict:
        """Gather every rank's figures (a collective: call on every rank at the same steps), write the
        line (rank 0) and return {term: rank mean} for the log. ``terms``: name -> scalar tensor, the same
        names in the same order on every rank; ``images_per_iteration``: over all ranks."""
        dev = self.backend.device
        peak = -1.0
        if dev.type == "cuda":
            peak = float(torch.cuda.max_memory_allocated(dev))
            torch.cuda.reset_peak_memory_stats(dev)
        own = torch.cat([torch.stack([v.detach().float().reshape(()) for v in terms.values()]),
                         torch.tensor([self.wait_s, self.iter_s, float(self.iterations), peak], device=dev)])
        ranks = self.backend.gather_over_ranks(own).double().cpu()  # (world, n): the log step's one host read
        n = len(terms)
        means = ranks[:, :n].mean(0).tolist()
        wait, it, count, peak = ranks[:, n], ranks[:, n + 1], ranks[:, n + 2].clamp_min(1), ranks[:, n + 3]
        step_s = float((it / count).mean())
        losses = {k: _finite_or_none(v) for k, v in zip(terms, means)}
        line = {"step": step, "stage": stage, "step_in_stage": step_in_stage, "resolution": resolution,
                "time": round(time.time(), 3), "ranks": int(ranks.shape[0]), "criterion": criterion, "lr": lr,
                **({"d_lr": d_lr} if d_lr is not None else {}), "fade_alpha": fade_alpha, "losses": losses,
                "img_per_s": images_per_iteration / step_s if step_s > 0 else None,
                "step_ms": 1e3 * step_s, "data_wait_ms": 1e3 * float((wait / count).mean()),
                "data_wait_ms_max": 1e3 * float((wait / count).max()),
                "peak_mem_mib": float(peak.max()) / 2**20 if dev.type == "cuda" else None,
                "loss_scale": loss_scale, "skipped": skipped, "d_skipped": d_skipped}
        self._clear()
        if self.file is not None:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
            self._scalars(line)
        return dict(zip(terms, means))

    def _scalars(self, line: dict) -> None:
        if self.tb is None:
            return
        scalars = {f"loss/{k}": v for k, v in line["losses"].items()}
        scalars.update({"perf/images_per_s": line["img_per_s"], "perf/step_ms": line["step_ms"],
                        "perf/data_wait_ms": line["data_wait_ms"], "perf/data_wait_ms_max": line["data_wait_ms_max"],
                        "perf/peak_mem_mib": line["peak_mem_mib"], "train/resolution": line["resolution"],
                        "train/lr": line["lr"], "train/d_lr": line.get("d_lr"), "train/fade_alpha": line["fade_alpha"],
                        "train/loss_scale": line["loss_scale"], "train/skipped": line["skipped"],
                        "train/d_skipped": line["d_skipped"]})
        for tag, value in scalars.items():
            if value is not None:
                self.tb.add_scalar(tag, value, line["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.window is not None and self.window.active:  # a run that ended inside the window
            self.window.step_ends(self.window.last)
