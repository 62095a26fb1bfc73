"""Helpers shared by the benchmarks: device naming, timing, NVTX ranges, result JSON.

Timing: on a GPU ``triton.testing.do_bench`` (median of many runs, with cache flushes between);
on the CPU the median of repeated ``time.perf_counter`` runs after warm-up. Results go to
``bench/results/<name>-<device>.json`` with :func:`environment` (device, versions, CPU flags, backend
status, git commit and date).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def device_name(device=None) -> str:
    """'cpu' or the GPU's name in lower case with dashes (e.g. 'nvidia-h100-80gb-hbm3') of ``device``;
    by default the GPU where there is one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-").lower()
    return device.type


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def nvtx(name: str):
    """An NVTX range on a GPU (visible in Nsight Systems), nothing on the CPU."""
    return torch.cuda.nvtx.range(name) if torch.cuda.is_available() else contextlib.nullcontext()


def median_ms(fn: Callable[[], object], device, warmup: int = 3, repeat: int = 20) -> float:
    """Median wall time of ``fn()`` in milliseconds (do_bench on CUDA)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def git_commit() -> str:
    """HEAD's hash (+ "-dirty" with uncommitted changes to tracked files); where the tree came without
    its git directory (a copy sent to a GPU machine) HPTRANSFER_GIT_COMMIT names it, else "unknown"."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD"], capture_output=True).returncode
        return head + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - a tarball or a copy has no git
        return os.environ.get("HPTRANSFER_GIT_COMMIT", "unknown")


def cpu_info() -> dict:
    """The CPU's model, its instruction-set flags (from /proc/cpuinfo where there is one) and the
    vector ISA torch dispatches to: CPU timings depend on them."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:  # x86 / Arm
                flags = value.strip()
    except OSError:  # not Linux
        pass
    return {"model": model, "flags": flags, "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count()}


def gpu_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count, "count": torch.cuda.device_count()}


def environment(device=None) -> dict:
    """Device (``device``'s name; default the GPU where there is one), versions, CPU (model and flags),
    GPU, ``hptransfer.ops.backend_status()`` (with the versions of DeepSpeed and DALI), commit and date:
    stored with every result file, the one place benchmarks take their metadata from. Call it after
    the timed work: backend_status lists the fallbacks the run took."""
    from hptransfer.ops import backend_status

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads(), "cpu": cpu_info(),
            "gpu": gpu_info(), "backend_status": backend_status(device), "git_commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class HostReads:
    """Counts the aten ops that make the host wait for a device value, on any device (CUDA's sync debug
    mode exists only there): ``.item()``/``float()``/``bool()`` (``_local_scalar_dense``), ``nonzero``,
    ``masked_select``, ``unique``, ``equal``, boolean-mask indexing, and copies from a device to the CPU.
    ``with HostReads() as reads: ...`` then ``reads.counts`` ({op: calls}) and ``reads.where`` ({op: the
    Python stack of its first call}). ``pause()`` stops counting inside a deliberate read. It sees aten ops only: ``tolist()``/``numpy()`` on a CPU tensor read memory
    without one (on CUDA they show as a copy to the CPU)."""

    ALWAYS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal",
              "aten._unique2", "aten.unique_dim", "aten.unique_consecutive"}

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        owner = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if owner.counting:
                    name = owner.host_read(func, args, kwargs or {})
                    if name:
                        owner.counts[name] = owner.counts.get(name, 0) + 1
                        if name not in owner.where:
                            owner.where[name] = "".join(traceback.format_stack(limit=12)[:-1])
                return func(*args, **(kwargs or {}))

        self.counts: dict = {}
        self.where: dict = {}
        self.counting = True
        self._mode = _Mode()

    @classmethod
    def host_read(cls, func, args, kwargs) -> str | None:
        name = str(func.overloadpacket)
        if name in cls.ALWAYS:
            return name
        if name in ("aten.index", "aten.index_put", "aten.index_put_"):
            index = args[1] if len(args) > 1 else []
            if any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in index or []):
                return f"{name} (boolean mask)"
        if name in ("aten._to_copy", "aten.copy_"):
            src = args[1] if name == "aten.copy_" else args[0]
            dst = args[0].device if name == "aten.copy_" else kwargs.get("device")
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None \
                    and torch.device(dst).type == "cpu":
                return f"{name} (to the CPU)"
        return None

    @contextlib.contextmanager
    def pause(self):
        counting, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = counting

    def __enter__(self) -> "HostReads":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def result_path(name: str) -> Path:
    return RESULTS / f"{name}-{device_name()}.json"


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (dicts) with ``columns``; floats shown with 3 significant digits."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in cells)])
