"""Fake (meta) kernels of the ``hptransfer._C`` ops: output shapes, dtypes and layouts without data, so
that ``torch.compile`` (FakeTensor tracing, AOTAutograd) passes through the ops instead of breaking its
graph there. Each mirrors its C++ kernel's allocation (csrc/local_loss.cpp); ``tests/test_compile.py``
checks them against the real ops with ``torch.library.opcheck``. Registered once, when the extension
loads (``ops._dispatch``)."""
from __future__ import annotations

import torch


def _distance_dtype(fake: torch.Tensor) -> torch.dtype:
    return torch.float64 if fake.dtype == torch.float64 else torch.float32  # fp32 accumulation, as the kernel


def _layout(t: torch.Tensor) -> torch.memory_format:
    # the kernels read and write in channels_last when the input is channels_last, else contiguous
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


_registered = False


def register() -> None:
    global _registered
    if _registered:  # the extension's loader may run again (its cache cleared in tests)
        return
    _registered = True
    @torch.library.register_fake("hptransfer::perceptual_distance")
    def _distance(fake, real, mask, p):
        return fake.new_empty((fake.shape[0],), dtype=_distance_dtype(fake))

    @torch.library.register_fake("hptransfer::perceptual_distance_with_grad")
    def _distance_with_grad(fake, real, mask, p):
        return (fake.new_empty((fake.shape[0],), dtype=_distance_dtype(fake)),
                torch.empty_like(fake, memory_format=_layout(fake)),
                fake.new_empty((fake.shape[0],), dtype=_distance_dtype(fake)))  # grad_scale

    @torch.library.register_fake("hptransfer::gather_crops")
    def _gather(images, centers, size, normalize):
        b, c = images.shape[0], images.shape[1]
        return images.new_empty((b * centers.shape[1], c, size, size))

    @torch.library.register_fake("hptransfer::gather_crops_backward")
    def _gather_backward(grad, centers, height, width, size, normalize):
        return grad.new_empty((centers.shape[0], grad.shape[1], height, width))
