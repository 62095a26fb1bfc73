"""Preemption: SIGTERM or SIGUSR1 stops the run after the current step, with a checkpoint, on every rank.

A handler only records the signal. The trainer turns the record into a device flag
(:meth:`StopSignals.flag`, set without a host sync) and hands it to the step, whose one all-reduced
host read (``hptransfer.step.read_nonfinite``) carries it beside the finite flags: every rank learns
in the same step that some rank was signalled, so all of them write the same checkpoint and exit
with :data:`EXIT_PREEMPTED`, the status an sbatch script requeues on (docs/cluster.md).
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

import torch

log = logging.getLogger(__name__)

# sysexits.h's EX_TEMPFAIL ("try again later"): distinct from 0 (done), 1 (a bug or a failed collective),
# 2 (a user error) and from 128 + N (killed by signal N before a checkpoint could be written).
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Context manager: once :meth:`arm` was called (when training starts: before, there is nothing to
    save and a signal ends the process as usual), SIGTERM and SIGUSR1 are recorded instead of ending the
    process; the previous handlers come back on exit. Installs nothing outside the main thread, where
    Python cannot catch signals; such a caller keeps the default behaviour."""

    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[str] = None  # the first signal's name
        self._previous: dict = {}
        self._flag: Optional[torch.Tensor] = None
        self._raised = False  # the flag holds the received signal

    def __enter__(self) -> "StopSignals":
        return self

    def arm(self) -> None:
        """Record SIGTERM / SIGUSR1 from now on (idempotent)."""
        if self._previous:
            return
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        else:
            log.debug("not the main thread: SIGTERM/SIGUSR1 keep their default action")

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _record(self, signum, frame) -> None:  # a signal handler: record only (no logging, no torch)
        if self.received is None:
            self.received = signal.Signals(signum).name

    def flag(self, device: torch.device) -> torch.Tensor:
        """A 1-element float tensor on ``device``: the number of the signal this rank received, else 0 (its
        maximum over the ranks says whether, and which, one arrived: :func:`name`). The same tensor each
        call, filled on the device when the signal is first seen (no host sync)."""
        if self._flag is None or self._flag.device != device:
            self._flag = torch.zeros(1, device=device)
            self._raised = False
        if self.received is not None and not self._raised:
            self._flag.fill_(float(signal.Signals[self.received].value))
            self._raised = True
        return self._flag


def name(value: float) -> Optional[str]:
    """The signal a reduced :meth:`StopSignals.flag` names, None for 0 (no signal on any rank)."""
    return signal.Signals(int(value)).name if value > 0 else None
