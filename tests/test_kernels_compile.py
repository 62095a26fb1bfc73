"""The Triton kernels compile for real NVIDIA targets (sm_80, sm_90) with the argument types of their
run-time launches, with this machine's Triton and with the GPU machine's (3.6), without a GPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# `make setup` installs the GPU machine's Triton here (Makefile: OLD_TRITON)
OLD_TRITON = Path(os.environ.get("HPTRANSFER_OLD_TRITON", REPO / ".venv" / "triton-3.6"))


def _compile(pythonpath: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = Path(__file__).with_name("compile_kernels.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _check(out: str) -> None:
    cases = 6 * 2 + 3  # gather cases x (forward, backward) + heatmap dtypes, per arch
    assert re.search(rf"^compiled {2 * cases} kernels", out, re.M), out[-2000:]
    for arch in (80, 90):
        lines = [ln for ln in out.splitlines() if ln.startswith(f"sm_{arch} ")]
        for kernel in ("_gather_crops_forward_kernel", "_gather_crops_backward_kernel"):
            for normalize in (True, False):
                assert any(kernel in ln and f"'NORMALIZE': {normalize}" in ln for ln in lines), (arch, kernel, normalize)
        # fp32 images gathered straight into bf16 crops (the local loss under bf16 autocast)
        assert any("img_ptr:*fp32" in ln and "out_ptr:*bf16" in ln for ln in lines)
        # channels_last images: the channel stride is 1 and specialised as at run time
        assert any("img_ptr:*bf16" in ln and "'sic': 1" in ln for ln in lines)
        assert any("_heatmaps_forward_kernel" in ln and "out_ptr:*bf16" in ln for ln in lines)
        # the gather's backward sums with relaxed atomics (no acquire/release fences around each add)
        for ln in lines:
            if "_gather_crops_backward_kernel" in ln:
                assert "atom.global.gpu.relaxed.add.f32" in ln and "acq_rel" not in ln, ln


def test_triton_kernels_compile_for_sm80_and_sm90():
    _check(_compile())


def test_triton_kernels_compile_with_triton_3_6():
    """The GPU machine has Triton 3.6: no language or launcher API newer than that may be used."""
    if not (OLD_TRITON / "triton").is_dir():
        pytest.fail(f"{OLD_TRITON}: Triton 3.6 is not installed there; run `make setup` "
                    "(or set HPTRANSFER_OLD_TRITON to a `pip install --target DIR triton==3.6.0` directory)")
    out = _compile(str(OLD_TRITON))
    assert "(triton 3.6." in out, out[-500:]
    _check(out)
