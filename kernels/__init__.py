"""Triton kernels, installed as ``hptransfer.kernels``. They import nothing from hptransfer;
``hptransfer.ops`` and ``hptransfer.pose`` pick them or the PyTorch references."""
