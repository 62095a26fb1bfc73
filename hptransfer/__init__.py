"""hptransfer: pose-guided high-resolution appearance transfer (progressive U-Net autoencoder).

Public entry points for users of exported models::

    g = hptransfer.load_generator("runs/x/export")   # eval mode, CPU, no training code
    out = hptransfer.generate(g, reference, kp)      # reference (B,3,R,R) in [-1,1], kp (B,18,2) (y,x)
"""
from hptransfer._version import __version__  # noqa: F401

import torch as _torch  # noqa: F401  (loads libc10/libtorch before the extension hptransfer._C)


def load_generator(export_dir, device="cpu"):
    """Load an export directory (model.safetensors + config.json) into a Generator in eval mode."""
    from hptransfer.export import load_generator as _load

    return _load(export_dir, device=device)


def generate(generator, reference, kp, impl="auto"):
    """Generate the reference person in the pose ``kp``; returns images in [-1, 1]."""
    from hptransfer.export import generate as _generate

    return _generate(generator, reference, kp, impl=impl)
