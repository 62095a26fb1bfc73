"""Named phases of a training step: NVTX ranges for Nsight Systems and optional per-phase timers.

    from hptransfer import profiling
    with profiling.phase("generator_forward"):
        fake = g(reference, kp)

Off by default: ``phase`` then costs one flag check. NVTX ranges are pushed when ``HPTRANSFER_NVTX=1``
is set or :func:`enable` was called (and CUDA is there). Times are collected only inside
``with PhaseTimer() as t:`` (CUDA events on a CUDA device, ``time.perf_counter`` otherwise);
``t.totals()`` gives seconds per phase name, summed over the phase's occurrences.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch

from hptransfer._env import flag

_nvtx_on = flag("HPTRANSFER_NVTX")
_timer: Optional["PhaseTimer"] = None


def enable(on: bool = True) -> None:
    """Switch NVTX ranges on (or off) for this process."""
    global _nvtx_on
    _nvtx_on = bool(on)


def enabled() -> bool:
    return _nvtx_on


class PhaseTimer:
    """Collects (name, start, end) per phase while active. ``cuda=True`` uses CUDA events (no sync in
    the step; :meth:`totals` synchronises once)."""

    def __init__(self, cuda: Optional[bool] = None):
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.records: list = []
        self._prev: Optional[PhaseTimer] = None

    def __enter__(self) -> "PhaseTimer":
        global _timer
        self._prev, _timer = _timer, self
        return self

    def __exit__(self, *exc) -> None:
        global _timer
        _timer = self._prev

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def totals(self) -> dict:
        """{phase name: seconds} summed over all records."""
        if self.cuda and self.records:
            torch.cuda.synchronize()
        out: dict = {}
        for name, a, b in self.records:
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + dt
        return out


@contextlib.contextmanager
def _phase(name: str):
    timer = _timer
    nvtx = _nvtx_on and torch.cuda.is_available()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    t0 = timer.start() if timer is not None else None
    try:
        yield
    finally:
        if timer is not None:
            timer.records.append((name, t0, timer.start()))
        if nvtx:
            torch.cuda.nvtx.range_pop()


_NULL = contextlib.nullcontext()


def phase(name: str):
    """Context manager around one named phase: NVTX range and/or timer record when on, nothing otherwise."""
    if not _nvtx_on and _timer is None:
        return _NULL
    return _phase(name)
