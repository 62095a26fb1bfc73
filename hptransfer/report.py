"""What a person sees during training: progress bar, log file, TensorBoard, sample grids, summary.

Everything here runs on rank 0 only (the trainer makes a :class:`Reporter` with ``enabled=False``
on other ranks, and every method then does nothing).
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hptransfer._env import flag
from hptransfer.images import draw_skeleton, to_uint8

log = logging.getLogger("hptransfer.train")


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def save_sample_grid(path: str | Path, reference: torch.Tensor, kp_target: torch.Tensor, generated: torch.Tensor,
                     target: torch.Tensor) -> None:
    """PNG rows of: reference | target skeleton | generated | ground truth. Images (B, 3, R, R) in [-1, 1]."""
    from PIL import Image

    R = reference.shape[-1]
    ref, gen, gt = (to_uint8(x).permute(0, 2, 3, 1).cpu().numpy() for x in (reference, generated, target))
    pad = 2
    rows = []
    for i in range(ref.shape[0]):
        cells = [ref[i], draw_skeleton(kp_target[i], R), gen[i], gt[i]]
        row = np.full((R, 4 * R + 3 * pad, 3), 255, np.uint8)
        for j, c in enumerate(cells):
            row[:, j * (R + pad): j * (R + pad) + R] = c
        rows.append(row)
    grid = np.concatenate([np.concatenate([r, np.full((pad, r.shape[1], 3), 255, np.uint8)]) for r in rows])[:-pad]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid).save(tmp, format="PNG")
    os.replace(tmp, path)


class Reporter:
    """tqdm bar + ``out_dir/train.log`` + optional TensorBoard + the end-of-run summary table."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True, total_steps: int = 0,
                 initial_step: int = 0):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.stats: dict[int, dict] = {}
        self.bar = None
        self.tb = None
        self._handler = None
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
        from tqdm import tqdm
        self.bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, unit="it",
                        disable=flag("HPTRANSFER_NO_BAR"))

    def stage_start(self, stage: int, resolution: int, iterations: int, step_in_stage: int = 0) -> None:
        if not self.enabled:
            return
        s = self.stats.setdefault(stage, {"resolution": resolution, "iterations": iterations, "time": 0.0,
                                          "images": 0, "skipped": 0, "last": {}})
        s["t0"] = time.perf_counter()
        log.info("stage %d: %d px, %d iterations (from step %d)", stage, resolution, iterations, step_in_stage)

    def step(self, stage: int, step_in_stage: int, global_step: int, images: int, terms: dict, skipped: bool,
             log_now: bool) -> None:
        """One finished iteration: update the bar; log when ``log_now`` (``terms``: the rank means; the
        TensorBoard scalars are written by hptransfer.distributed.stats.RunStats)."""
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
            self.bar.update(1)
        if not log_now:
            return
        ips = s["images"] / max(s["time"], 1e-9)
        post = {"px": s["resolution"], "img/s": f"{ips:.1f}"}
        post.update({k: _fmt(v) for k, v in terms.items() if k != "criterion"})
        if self.bar is not None:
            self.bar.set_description(f"stage {stage} ({s['resolution']}px) {step_in_stage}/{s['iterations']}")
            self.bar.set_postfix(post, refresh=False)
        log.info("stage %d step %d/%d (global %d) %s img/s=%.1f%s", stage, step_in_stage, s["iterations"],
                 global_step, " ".join(f"{k}={v if isinstance(v, str) else _fmt(v)}" for k, v in terms.items()),
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
        table = self.summary()
        log.info("summary:\n%s", table)
        if self.tb is not None:
            self.tb.close()
        if self._handler is not None:
            logging.getLogger("hptransfer").removeHandler(self._handler)
            logging.getLogger("hptransfer").setLevel(self._level)
            self._handler.close()
        return table
