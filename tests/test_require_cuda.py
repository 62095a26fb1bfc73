"""`pytest --require-cuda` is for GPU CI: with no visible CUDA device it must exit non-zero and say why,
never report the cuda tests as skipped/xfailed and exit 0 (a GPU runner whose driver is lost would look green)."""
import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _pytest(*args: str) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this checks the no-GPU case on a GPU machine too
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=TESTS.parent,
                          env=env, capture_output=True, text=True, timeout=300)


def test_require_cuda_without_gpu_fails_loudly():
    proc = _pytest("--require-cuda", "-m", "cuda", str(TESTS / "test_heatmaps.py"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "no CUDA device is visible" in out, out


def test_without_flag_cuda_tests_skip():
    proc = _pytest("-m", "cuda", str(TESTS / "test_heatmaps.py"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"\b\d+ skipped", out) and not re.search(r"\b\d+ (failed|errors?|xfailed)\b", out), out
