"""Export a trained generator: ``model.safetensors`` + ``config.json``, loadable without training code.

Minimal version written by the trainer's developer (CONTRACTS.md: export_generator, load_generator,
generate); the export developer's fuller module (ONNX, TorchScript, the ``hptransfer export``
command) replaces it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

FORMAT_VERSION = 1


def export_generator(generator, out_dir: str | Path, extra: Optional[dict] = None) -> Path:
    """Write ``generator`` (a :class:`hptransfer.models.Generator`) to ``out_dir`` atomically:
    ``model.safetensors`` (fp32 weights and BatchNorm buffers) and ``config.json`` (architecture,
    resolution, keypoint convention, ``extra``). Returns ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
                 for k, v in generator.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        meta = {"format_version": FORMAT_VERSION, "arch": generator.arch(), "resolution": generator.resolution,
                "keypoints": "openpose-coco18 (y, x) pixels; missing = (-1, -1)", "image_range": [-1, 1],
                "extra": extra or {}}
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))
        old = out_dir.with_name(f".{out_dir.name}.old")
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_generator(path: str | Path, device: str = "cpu"):
    """Load an export directory into a Generator in eval mode (no pickle: safetensors + JSON)."""
    from safetensors.torch import load_file

    from hptransfer.models import Generator

    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not an hptransfer export (missing {name})")
    meta = json.loads((path / "config.json").read_text())
    g = Generator.from_arch(meta["arch"])
    g.load_state_dict(load_file(str(path / "model.safetensors")))
    return g.to(device).eval()


@torch.no_grad()
def generate(generator, reference: torch.Tensor, kp: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``reference`` (B, 3, R, R) in [-1, 1], ``kp`` (B, 18, 2) (y, x) target pose -> (B, 3, R, R) in [-1, 1]."""
    generator.kernels = impl
    p = next(generator.parameters())
    return generator(reference.to(p.device, p.dtype), kp.to(p.device).float())
