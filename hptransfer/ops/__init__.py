"""The dispatch layer between fast paths (Triton ``hptransfer.kernels``, C++/CUDA ``hptransfer._C``)
and their plain PyTorch references.

``impl`` is "auto" | "fast" | "reference" everywhere: "auto" takes the fast path where it can run
(and falls back with one warning if its backend failed to load), "fast" raises a clear error where
it cannot run, "reference" always runs the torch reference. ``HPTRANSFER_STRICT=1`` turns every
fallback into an error (for GPU validation runs).
"""
from __future__ import annotations

from hptransfer.ops._dispatch import (  # noqa: F401
    FastPathUnavailable, backend_status, device_of, extension, fast_path_plan, format_backend_status, use_fast)
from hptransfer.ops.heatmaps import heatmaps, heatmaps_multi, heatmaps_reference  # noqa: F401
from hptransfer.ops.gather_crops import gather_crops, gather_crops_reference  # noqa: F401
from hptransfer.ops.perceptual_distance import (  # noqa: F401
    CRITERIA, criterion_per_sample, perceptual_distance, perceptual_distance_reference)
from hptransfer.ops._crops import upsample_crops  # noqa: F401
from hptransfer.ops.local_perceptual_loss import local_perceptual_loss, local_perceptual_loss_reference  # noqa: F401
