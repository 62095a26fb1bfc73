"""The dispatch layer between fast paths (Triton ``hptransfer.kernels``, C++/CUDA ``hptransfer._C``)
and their plain PyTorch references.

``impl`` is "auto" | "fast" | "reference" everywhere: "auto" takes the fast path where it can run
(and falls back with one warning if its backend failed to load), "fast" raises a clear error where
it cannot run, "reference" always runs the torch reference. ``HPTRANSFER_STRICT=1`` turns every
fallback into an error (for GPU validation runs).
"""
from __future__ import annotations

from hptransfer.ops._dispatch import backend_status, extension, triton_available, use_fast, FastPathUnavailable  # noqa: F401
from hptransfer.ops.gather_crops import gather_crops, gather_crops_reference  # noqa: F401
from hptransfer.ops.local_perceptual_loss import local_perceptual_loss, local_perceptual_loss_reference  # noqa: F401
