"""Build defaults: the CUDA extension carries PTX, so a GPU newer than the listed ones JIT-compiles it
instead of failing at the first launch with "no kernel image is available for execution on the device"."""
import ast
import os
import subprocess
from pathlib import Path

from torch.utils.cpp_extension import _get_cuda_arch_flags

REPO = Path(__file__).resolve().parent.parent


def _setup_default() -> str:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_CUDA_ARCH_LIST" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no DEFAULT_CUDA_ARCH_LIST")


def test_setup_default_arch_list_embeds_ptx(monkeypatch):
    default = _setup_default()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", default)
    flags = _get_cuda_arch_flags()  # what torch passes to nvcc for this list
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags, flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags, f"no PTX in {flags}"


def test_makefile_leaves_the_default_to_setup_py():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    db = subprocess.run(["make", "-pn", "help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60).stdout
    values = [line.split("=", 1)[1].strip() for line in db.splitlines()
              if line.split("=", 1)[0].strip(" ?:") == "TORCH_CUDA_ARCH_LIST" and "=" in line]
    assert all(v.endswith("+PTX") for v in values), f"the Makefile sets TORCH_CUDA_ARCH_LIST without PTX: {values}"
