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
                     help="a GPU run: stop with an error when no CUDA device is visible (default: cuda tests skip)")


def _no_cuda_reason() -> str:
    return (f"--require-cuda: no CUDA device is visible to torch (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}; torch.cuda.device_count()={torch.cuda.device_count()}; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")


def pytest_configure(config):
    # A GPU CI whose driver is not visible must go red, not report skipped/xfailed cuda tests and exit 0.
    if config.getoption("--require-cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(_no_cuda_reason())


def pytest_report_header(config):
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.device_count()} device(s), {torch.cuda.get_device_name()}"
    return "cuda: no device visible (tests marked cuda are skipped; --require-cuda makes this an error)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with --require-cuda to make a missing GPU an error)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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


def descriptors(kp: torch.Tensor, images: torch.Tensor, count=None):
    """(centers, valid) of keypoints ``kp`` at the resolution of ``images``: the local loss's descriptor arguments."""
    from hptransfer.pose import local_descriptors
    return local_descriptors(kp, images.shape[-1], count)


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    """A test that trains in-process with train.deterministic leaves torch's global switches set: undo them,
    so that no test depends on which tests ran before it."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
