"""Backend discovery, remembered once per process, and the impl= decision."""
from __future__ import annotations

import functools
import importlib
import logging
import os
import platform
import warnings
from typing import Optional

import torch

from hptransfer._env import TRUE as ENV_TRUE, flag

log = logging.getLogger(__name__)

IMPLS = ("auto", "fast", "reference")


class FastPathUnavailable(RuntimeError):
    """impl="fast" was asked for where the fast path cannot run."""


def _strict() -> bool:
    return flag("HPTRANSFER_STRICT")


@functools.lru_cache(maxsize=None)
def _load_extension():
    """Import hptransfer._C once; remember the failure reason instead of retrying every call."""
    if flag("HPTRANSFER_NO_EXT"):
        return None, "disabled by HPTRANSFER_NO_EXT"
    try:
        from hptransfer import _C  # noqa: F401
    except Exception as e:  # ImportError, undefined symbols, CUDA version mismatch...
        return None, f"{type(e).__name__}: {e}"
    built = _C.cuda_version()
    if built and torch.version.cuda and built.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, f"hptransfer._C was built for CUDA {built} but torch uses CUDA {torch.version.cuda}; rebuild with `make setup`"
    from hptransfer.ops import _fake

    _fake.register()  # once (this function is cached): torch.compile traces through the ops
    return _C, None


def extension():
    """The loaded ``hptransfer._C`` module or None (the reason is in :func:`backend_status`)."""
    return _load_extension()[0]


@functools.lru_cache(maxsize=None)
def _triton(op: str = ""):
    """Can Triton and the kernel module of ``op`` (``hptransfer.kernels.<op>``) be imported?"""
    if flag("HPTRANSFER_NO_TRITON"):
        return False, "disabled by HPTRANSFER_NO_TRITON"
    try:
        import triton  # noqa: F401
        from hptransfer import kernels  # noqa: F401
        if op:
            importlib.import_module(f"hptransfer.kernels.{op}")
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"
    return True, None


def triton_interpret() -> bool:
    """Will Triton run kernels in its interpreter? Triton's own knob, read from TRITON_INTERPRET at
    every call (1/true/yes/y/on in any case); without Triton the same rule here."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # no Triton, or one older than its knobs module
        return os.environ.get("TRITON_INTERPRET", "").lower() in (*ENV_TRUE, "y")


def deterministic() -> bool:
    """Is ``torch.use_deterministic_algorithms(True)`` on (``train.deterministic``)?"""
    return torch.are_deterministic_algorithms_enabled()


def _version(*distributions: str) -> str:
    """Installed version of the first of ``distributions`` found, from package metadata (no import:
    importing DeepSpeed or DALI just to print a version takes seconds)."""
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def fast_path_plan(device: str | torch.device | None = None) -> dict:
    """What each op's ``impl="auto"`` will run on ``device`` (default: CUDA if present, else CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ext, ext_err = _load_extension()
    cuda = dev.type == "cuda"

    def triton_plan(op: str, atomic_backward: bool = False) -> str:
        if not cuda:
            return "reference (Triton kernels run on CUDA tensors)"
        ok, err = _triton(op)
        if not ok:
            return f"reference: FALLBACK ({err})"
        if atomic_backward and deterministic():
            return "reference (deterministic mode: the kernel's backward uses atomic adds)"
        return "triton"

    if ext is None:
        distance = f"torch criterion on the batch: FALLBACK (hptransfer._C {ext_err})"
    elif cuda and not ext.with_cuda():
        distance = "torch criterion on the batch: FALLBACK (hptransfer._C was built without CUDA)"
    else:
        distance = f"fused perceptual_distance (hptransfer._C, {dev.type})"
    gather = triton_plan("gather_crops", atomic_backward=True) if cuda else (
        "hptransfer._C gather_crops (CPU)" if ext is not None else "reference")
    return {
        "device": str(dev),
        "heatmaps": triton_plan("heatmaps"),
        "gather_crops": triton_plan("gather_crops", atomic_backward=True),
        "local_perceptual_loss": f"batched VGG (crops: {gather}; distance: {distance})",
        "deterministic": deterministic(),
    }


def backend_status(device: str | torch.device | None = None) -> dict:
    """What each fast backend can do here (with the reason when it cannot), the versions that matter,
    what each op will run on ``device`` and the fallbacks taken so far in this process."""
    ext, ext_err = _load_extension()
    tri, tri_err = _triton()
    return {
        "extension": "loaded" if ext is not None else f"unavailable ({ext_err})",
        "extension_cuda": bool(ext is not None and getattr(ext, "with_cuda", lambda: False)()),
        "triton": "available" if tri else f"unavailable ({tri_err})",
        "triton_interpret": triton_interpret(),
        "cuda": torch.cuda.is_available(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
                     "deepspeed": _version("deepspeed"),
                     "dali": _version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")},
        "plan": fast_path_plan(device),
        "fallbacks_taken": sorted(_warned),
    }


_warned: set = set()


def _fallback(op: str, reason: str, to: str = "the PyTorch reference") -> bool:
    """A fast path that should run cannot: an error under HPTRANSFER_STRICT=1, else warn once (a Python
    warning and a logged one, so it reaches train.log) and remember it for :func:`backend_status`."""
    if _strict():
        raise FastPathUnavailable(f"{op}: fast path unavailable ({reason}) and HPTRANSFER_STRICT=1")
    if op not in _warned:
        _warned.add(op)
        message = f"hptransfer: {op} falls back to {to}: {reason}"
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return False


def device_of(*tensors: torch.Tensor, names: tuple = ()) -> torch.device:
    """The one device of ``tensors``; a clear error naming them when they differ (never a kernel crash)."""
    devices = [t.device for t in tensors]
    if any(d != devices[0] for d in devices):
        listed = ", ".join(f"{n} on {d}" for n, d in zip(names or [f"input {i}" for i in range(len(devices))], devices))
        raise ValueError(f"inputs must be on one device, got {listed}")
    return devices[0]


def use_fast(op: str, tensor: torch.Tensor, impl: str, backend: str = "triton", atomic_backward: bool = False,
             fallback_to: str = "the PyTorch reference") -> bool:
    """Decide whether ``op`` takes its fast path for ``tensor``.

    backend "triton": runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
    backend "extension": runs wherever hptransfer._C loaded (CPU op always; CUDA op if built with CUDA).
    ``atomic_backward``: the fast path's backward adds with atomics (run-to-run differences in the last
    bits). Under ``torch.use_deterministic_algorithms(True)`` such a path is refused whenever ``tensor``
    needs a gradient: "auto" takes the reference, "fast" raises. PyTorch's own checks cannot see
    atomics inside our kernels, so the dispatch does it.
    """
    return _decide(op, tensor.device.type, tensor.requires_grad and torch.is_grad_enabled(), impl, backend,
                   atomic_backward, fallback_to)


# A host-side decision on plain values: under torch.compile it runs once at trace time and its answer is
# a constant of the graph (dynamo does not trace the imports and checks inside it).
@torch.compiler.assume_constant_result
def _decide(op: str, device_type: str, needs_grad: bool, impl: str, backend: str, atomic_backward: bool,
            fallback_to: str) -> bool:
    is_cuda = device_type == "cuda"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    if atomic_backward and deterministic() and needs_grad:
        if impl == "fast":
            raise FastPathUnavailable(f"{op}: impl='fast' cannot run under torch.use_deterministic_algorithms(True): "
                                      "its backward uses atomic adds; use impl='auto' or 'reference'")
        return False
    if backend == "triton":
        ok, err = _triton(op)
        # The interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors, exactly but slowly:
        # only an explicit impl="fast" uses it; "auto" keeps the reference on the CPU.
        where_ok = is_cuda or (impl == "fast" and triton_interpret())
        if ok and where_ok:
            return True
        reason = err if not ok else f"Triton kernels need a CUDA tensor (got {device_type}); set TRITON_INTERPRET=1 to run them on the CPU"
        if impl == "fast":
            raise FastPathUnavailable(f"{op}: impl='fast' cannot run here: {reason}")
        # On a CPU tensor "auto" quietly means the reference: that is the design, not a failure.
        if not ok and is_cuda:
            return _fallback(op, reason, fallback_to)
        return False
    if backend == "extension":
        ext, err = _load_extension()
        reason: Optional[str] = err
        if ext is not None and is_cuda and not ext.with_cuda():
            reason = "hptransfer._C was built without CUDA"
        elif ext is not None:
            return True
        if impl == "fast":
            raise FastPathUnavailable(f"{op}: impl='fast' cannot run here: {reason}")
        return _fallback(op, reason, fallback_to)
    raise ValueError(f"unknown backend {backend!r}")


def format_backend_status(status: dict) -> str:
    """:func:`backend_status` as aligned ``name  value`` lines (``hptransfer doctor``, train.log)."""
    rows = [(f"version {k}", str(v)) for k, v in status["versions"].items()]
    rows += [("extension hptransfer._C", status["extension"] + (" (with CUDA)" if status["extension_cuda"] else "")),
             ("triton", status["triton"] + (" (interpreter)" if status["triton_interpret"] else "")),
             ("cuda available", str(status["cuda"]))]
    rows += [(f"{k} on {status['plan']['device']}", str(v)) for k, v in status["plan"].items() if k != "device"]
    rows.append(("fallbacks taken", ", ".join(status["fallbacks_taken"]) or "none"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
