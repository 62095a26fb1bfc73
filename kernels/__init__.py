"""Triton kernels, installed as ``hptransfer.kernels``. They import nothing from hptransfer but the
import-free ``hptransfer.constants`` (the bottom layer);
``hptransfer.ops`` and ``hptransfer.pose`` pick them or the PyTorch references."""
