"""Shared fixtures (kept small) and the ``cuda`` marker policy."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's (exact, slow) interpreter; it must be chosen
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hptransfer.config import ModelConfig

TINY_WIDTH = 1 / 32  # 32 channels at the bottleneck: every stage, fast on 2 CPU cores


def pytest_addoption(parser):
    parser.addoption("--require-cuda", action="store_true",
                     help="fail (instead of skip) tests marked cuda when no GPU is present")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    strict = config.getoption("--require-cuda")
    for item in items:
        if "cuda" in item.keywords:
            if strict:
                item.add_marker(pytest.mark.xfail(reason="--require-cuda but no GPU", run=False, strict=True))
            else:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run with --require-cuda to fail instead)"))


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(width=TINY_WIDTH, disc_channels=4)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def random_keypoints(batch: int, resolution: int, gen: torch.Generator, missing: int = 0) -> torch.Tensor:
    """(B, 18, 2) (y, x) keypoints inside the image, the first ``missing`` of each set to -1."""
    kp = torch.rand(batch, 18, 2, generator=gen) * (resolution - 1)
    kp[:, :missing] = -1
    return kp


# Devices for fast-vs-reference kernel tests: CUDA (marked) runs the compiled kernels; without a GPU
# the CPU runs them in the interpreter. One process cannot do both (TRITON_INTERPRET is read when a
# kernel module is imported), so on a GPU machine the CUDA cases replace the CPU ones.
KERNEL_DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda)] + ([] if torch.cuda.is_available() else ["cpu"])
