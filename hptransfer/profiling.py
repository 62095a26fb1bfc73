"""Named phases of a training step: NVTX ranges for Nsight Systems and optional per-phase timers.

    from hptransfer import profiling
    with profiling.phase("generator_forward"):
        fake = g(reference, kp)

Off by default: ``phase`` then costs one flag check. NVTX ranges are pushed when ``HPTRANSFER_NVTX=1``
is set or :func:`enable` was called (and CUDA is there). Times are collected only inside
``with PhaseTimer() as t:`` (CUDA events on a CUDA device, ``time.perf_counter`` otherwise);
``t.totals()`` gives seconds per phase name, summed over the phase's occurrences.
:class:`CaptureWindow` (``HPTRANSFER_PROFILE_STEPS=a-b``) limits an Nsight capture to those steps.
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


class CaptureWindow:
    """An Nsight Systems capture window over training steps: ``HPTRANSFER_PROFILE_STEPS=a-b`` (global
    steps as the log numbers them, both included; ``a`` alone = one step; a run resumed inside the window
    starts it at its first step) calls cudaProfilerStart before
    step ``a`` and cudaProfilerStop after step ``b``, for ``nsys profile --capture-range=cudaProfilerApi``;
    NVTX ranges (the step's phases, data loading) are on inside the window. Does nothing without CUDA."""

    ENV = "HPTRANSFER_PROFILE_STEPS"

    def __init__(self, first: int, last: int, cuda: Optional[bool] = None):
        self.first, self.last = first, last
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.active = self.done = False
        self._nvtx_before = _nvtx_on

    @classmethod
    def from_env(cls, environ=None) -> Optional["CaptureWindow"]:
        """The window the environment asks for, None when unset; ValueError naming the variable when malformed."""
        import os
        import re

        value = (os.environ if environ is None else environ).get(cls.ENV, "").strip()
        if not value:
            return None
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", value)
        if m is None or int(m.group(2) or m.group(1)) < int(m.group(1)) or int(m.group(1)) < 1:
            raise ValueError(f"environment variable {cls.ENV}={value!r}: expected FIRST-LAST global steps "
                             f"(1-based, FIRST <= LAST), e.g. 100-110")
        return cls(int(m.group(1)), int(m.group(2) or m.group(1)))

    def step_begins(self, step: int) -> None:
        if self.first <= step <= self.last and not (self.active or self.done) and self.cuda:  # also a resume inside it
            global _nvtx_on
            self._nvtx_before, _nvtx_on = _nvtx_on, True
            torch.cuda.synchronize()  # the window starts with the step, not with work queued before it
            torch.cuda.profiler.start()
            self.active = True

    def step_ends(self, step: int) -> None:
        if step >= self.last and self.active:
            global _nvtx_on
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            _nvtx_on, self.active, self.done = self._nvtx_before, False, True
