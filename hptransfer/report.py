"""What a person sees during training: progress bar, log file, TensorBoard, sample grids, summary.

Everything here runs on rank 0 only (the trainer makes a :class:`Reporter` with ``enabled=False``
on other ranks, and every method then does nothing).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hptransfer._env import flag
from hptransfer.images import draw_skeleton, save_grid, to_uint8

log = logging.getLogger("hptransfer.train")


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


SAMPLE_COLUMNS = ("reference", "target pose", "generated", "ground truth")


def save_sample_grid(path: str | Path, reference: torch.Tensor, kp_target: torch.Tensor, generated: torch.Tensor,
                     target: torch.Tensor) -> None:
    """PNG rows of: reference | target skeleton | generated | ground truth, under a strip naming the
    columns (:data:`SAMPLE_COLUMNS`). Images (B, 3, R, R) in [-1, 1]."""
    R = reference.shape[-1]
    ref, gen, gt = (to_uint8(x).permute(0, 2, 3, 1).cpu().numpy() for x in (reference, generated, target))
    rows = [[ref[i], draw_skeleton(kp_target[i], R), gen[i], gt[i]] for i in range(ref.shape[0])]
    save_grid(path, rows, SAMPLE_COLUMNS)


# The bar's loss values and img/s are refreshed at most this often (reading the losses costs a host sync).
BAR_REFRESH_S = 1.0


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


class Reporter:
    """tqdm bar + ``out_dir/train.log`` + optional TensorBoard + the end-of-run summary table.

    The console: one bar per stage (one count, ``step/iterations`` of the stage, described as
    "stage k (R px)" as the log lines number stages), its loss values and img/s refreshed every
    :data:`BAR_REFRESH_S` seconds when the trainer passes values (:meth:`wants_values` says when);
    log lines are written above the bar (console handlers go through ``tqdm.write`` while the
    Reporter is open: tqdm's ``logging_redirect_tqdm``), so they never cut it in two."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True, total_steps: int = 0,
                 initial_step: int = 0):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.total_steps = total_steps  # the log lines say "global N of total"; initial_step: unused (per-stage bar)
        self.stats: dict[int, dict] = {}
        self.bar = None
        self.tb = None
        self._handler = None
        self._redirect = None
        self._bar_at = (0.0, 0)  # (time, images of the stage) at the bar's last refresh
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(self.out_dir / "train.log")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logging.getLogger("hptransfer").addHandler(self._handler)
        self._level = logging.getLogger("hptransfer").level
        if logging.getLogger("hptransfer").getEffectiveLevel() > logging.INFO:
            logging.getLogger("hptransfer").setLevel(logging.INFO)  # the log file gets INFO lines
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out_dir / "tb"))
            except Exception as e:  # tensorboard is optional: the run goes on without it
                log.warning("TensorBoard disabled: %s", e)

    def stage_start(self, stage: int, resolution: int, iterations: int, step_in_stage: int = 0) -> None:
        if not self.enabled:
            return
        s = self.stats.setdefault(stage, {"resolution": resolution, "iterations": iterations, "time": 0.0,
                                          "images": 0, "skipped": 0, "last": {}})
        s["t0"] = time.perf_counter()
        self._bar_at = (s["t0"], s["images"])
        log.info("stage %d: %d px, %d iterations (from step %d)", stage, resolution, iterations, step_in_stage)
        desc = f"stage {stage} ({resolution}px)"
        if self.bar is None:
            self._open_bar(iterations, step_in_stage, desc)
            return
        self.bar.set_description(desc, refresh=False)
        self.bar.set_postfix({}, refresh=False)
        self.bar.reset(total=iterations)
        if step_in_stage:
            self.bar.update(step_in_stage)

    def _open_bar(self, total: int, initial: int, desc: str) -> None:
        """The bar, at the first stage (a bar before it would show an empty count), and from then on the
        root logger's console handler writing through ``tqdm.write``, above the bar."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, unit="it",
                        disable=flag("HPTRANSFER_NO_BAR"))
        if not self.bar.disable and any(_is_console(h) for h in logging.root.handlers):
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def wants_values(self) -> bool:
        """Whether the bar would show new loss values now: the trainer then reads them (a host sync) and
        passes them to :meth:`step` even off the log steps."""
        return (self.bar is not None and not self.bar.disable
                and time.perf_counter() - self._bar_at[0] >= BAR_REFRESH_S)

    def step(self, stage: int, step_in_stage: int, global_step: int, images: int, terms: dict, skipped: bool,
             log_now: bool) -> None:
        """One finished iteration: advance the bar (its values from ``terms`` when given: current, not the
        last log step's); log when ``log_now`` (``terms`` then holds the rank means; the TensorBoard scalars
        are written by hptransfer.distributed.stats.RunStats)."""
        if not self.enabled:
            return
        s = self.stats[stage]
        now = time.perf_counter()
        s["time"] += now - s["t0"]
        s["t0"] = now
        s["images"] += images
        s["skipped"] += int(skipped)
        if not skipped:
            s["last"] = dict(terms)
        if self.bar is not None:
            if terms and (log_now or now - self._bar_at[0] >= BAR_REFRESH_S):  # before update(): drawn with it
                t_prev, img_prev = self._bar_at
                post = {"img/s": f"{(s['images'] - img_prev) / max(now - t_prev, 1e-9):.1f}"}
                post.update({k: v if isinstance(v, str) else _fmt(v) for k, v in terms.items()})
                self.bar.set_postfix(post, refresh=False)
                self._bar_at = (now, s["images"])
            self.bar.update(1)
        if not log_now:
            return
        ips = s["images"] / max(s["time"], 1e-9)
        log.info("stage %d step %d/%d (global %d%s) %s img/s=%.1f%s", stage, step_in_stage, s["iterations"],
                 global_step, f" of {self.total_steps}" if self.total_steps else "",
                 " ".join(f"{k}={v if isinstance(v, str) else _fmt(v)}" for k, v in terms.items()),
                 ips, " SKIPPED (non-finite loss)" if skipped else "")

    def image(self, tag: str, path: Path, global_step: int) -> None:
        if self.tb is not None and Path(path).is_file():
            from PIL import Image
            self.tb.add_image(tag, np.asarray(Image.open(path)), global_step, dataformats="HWC")

    def summary(self) -> str:
        """The per-stage table (also logged)."""
        head = ["stage", "res", "iters", "time_s", "img/s", "skipped", "final loss terms"]
        rows = []
        for stage, s in sorted(self.stats.items()):
            terms = " ".join(f"{k}={v if isinstance(v, str) else _fmt(v)}" for k, v in s["last"].items())
            rows.append([str(stage), str(s["resolution"]), str(s["iterations"]), f"{s['time']:.1f}",
                         f"{s['images'] / max(s['time'], 1e-9):.1f}", str(s["skipped"]), terms])
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        table = "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])
        return table

    def close(self) -> Optional[str]:
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
        table = self.summary()
        log.info("summary:\n%s", table)
        if self.tb is not None:
            self.tb.close()
        if self._handler is not None:
            logging.getLogger("hptransfer").removeHandler(self._handler)
            logging.getLogger("hptransfer").setLevel(self._level)
            self._handler.close()
        return table
