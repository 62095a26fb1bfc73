"""Backend discovery, remembered once per process, and the impl= decision."""
from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from typing import Optional

import torch

log = logging.getLogger(__name__)

IMPLS = ("auto", "fast", "reference")


class FastPathUnavailable(RuntimeError):
    """impl="fast" was asked for where the fast path cannot run."""


def _strict() -> bool:
    return os.environ.get("HPTRANSFER_STRICT", "0") not in ("", "0", "false", "False")


@functools.lru_cache(maxsize=None)
def _load_extension():
    """Import hptransfer._C once; remember the failure reason instead of retrying every call."""
    if os.environ.get("HPTRANSFER_NO_EXT", "0") not in ("", "0"):
        return None, "disabled by HPTRANSFER_NO_EXT"
    try:
        from hptransfer import _C  # noqa: F401
    except Exception as e:  # ImportError, undefined symbols, CUDA version mismatch...
        return None, f"{type(e).__name__}: {e}"
    built = _C.cuda_version()
    if built and torch.version.cuda and built.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, f"hptransfer._C was built for CUDA {built} but torch uses CUDA {torch.version.cuda}; rebuild with `make setup`"
    return _C, None


def extension():
    """The loaded ``hptransfer._C`` module or None (the reason is in :func:`backend_status`)."""
    return _load_extension()[0]


@functools.lru_cache(maxsize=None)
def _triton(op: str = ""):
    """Can Triton and the kernel module of ``op`` (``hptransfer.kernels.<op>``) be imported?"""
    if os.environ.get("HPTRANSFER_NO_TRITON", "0") not in ("", "0"):
        return False, "disabled by HPTRANSFER_NO_TRITON"
    try:
        import triton  # noqa: F401
        from hptransfer import kernels  # noqa: F401
        if op:
            importlib.import_module(f"hptransfer.kernels.{op}")
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"
    return True, None


def triton_available() -> bool:
    return _triton()[0]


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_status() -> dict:
    """What each fast backend can do here, with the reason when it cannot."""
    ext, ext_err = _load_extension()
    tri, tri_err = _triton()
    return {
        "extension": "loaded" if ext is not None else f"unavailable ({ext_err})",
        "extension_cuda": bool(ext is not None and getattr(ext, "with_cuda", lambda: False)()),
        "triton": "available" if tri else f"unavailable ({tri_err})",
        "triton_interpret": triton_interpret(),
        "cuda": torch.cuda.is_available(),
    }


_warned: set = set()


def _fallback(op: str, reason: str) -> bool:
    if _strict():
        raise FastPathUnavailable(f"{op}: fast path unavailable ({reason}) and HPTRANSFER_STRICT=1")
    if op not in _warned:
        _warned.add(op)
        warnings.warn(f"hptransfer: {op} falls back to the PyTorch reference: {reason}", RuntimeWarning, stacklevel=3)
    return False


def use_fast(op: str, tensor: torch.Tensor, impl: str, backend: str = "triton") -> bool:
    """Decide whether ``op`` takes its fast path for ``tensor``.

    backend "triton": runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
    backend "extension": runs wherever hptransfer._C loaded (CPU op always; CUDA op if built with CUDA).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    if backend == "triton":
        ok, err = _triton(op)
        # The interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors, exactly but slowly:
        # only an explicit impl="fast" uses it; "auto" keeps the reference on the CPU.
        where_ok = tensor.is_cuda or (impl == "fast" and triton_interpret())
        if ok and where_ok:
            return True
        reason = err if not ok else f"Triton kernels need a CUDA tensor (got {tensor.device}); set TRITON_INTERPRET=1 to run them on the CPU"
        if impl == "fast":
            raise FastPathUnavailable(f"{op}: impl='fast' cannot run here: {reason}")
        # On a CPU tensor "auto" quietly means the reference: that is the design, not a failure.
        if not ok and tensor.is_cuda:
            return _fallback(op, reason)
        return False
    if backend == "extension":
        ext, err = _load_extension()
        reason: Optional[str] = err
        if ext is not None and tensor.is_cuda and not ext.with_cuda():
            reason = "hptransfer._C was built without CUDA"
        elif ext is not None:
            return True
        if impl == "fast":
            raise FastPathUnavailable(f"{op}: impl='fast' cannot run here: {reason}")
        return _fallback(op, reason)
    raise ValueError(f"unknown backend {backend!r}")
