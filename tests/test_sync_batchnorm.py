"""backend.AllReduceBatchNorm, BatchNorm synchronised across ranks on every device, against BatchNorm over the
whole batch (CPU, two gloo ranks) and torch's SyncBatchNorm (CUDA, two gloo ranks on one GPU): output, input
and weight gradients, running statistics, with equal and unequal splits, a rank with an empty batch,
momentum=None (the cumulative average) and channels_last; and no host read in forward or backward
(bench.common.HostReads, on the CPU too, where CUDA's sync debug mode does not exist). One spawn of two
ranks runs every scenario."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]

# (name, momentum, rows on rank 0 and rank 1, channels_last); the batch is 4 images of 3 x 5 x 5
SCENARIOS = [("even", 0.1, (2, 2), False), ("cumulative", None, (3, 1), True), ("empty_rank", 0.1, (4, 0), False)]
STEPS = 2  # forward passes in training mode: the running statistics accumulate


def _loss_weights(shape) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape).sin()


def _batch(device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(4, 3, 5, 5, generator=g) * 2 + 1).to(device)


def _init(bn: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, generator=g) + 0.5)
        bn.bias.copy_(torch.rand(3, generator=g) - 0.5)


def _run(bn: nn.Module, x: torch.Tensor, weights: torch.Tensor, channels_last: bool, reads=None):
    """STEPS training forwards of ``bn`` on ``x`` (a leaf), then the backward of sum(y * weights) from the last.
    Returns (y, dx, dweight, dbias, buffers); ``reads``: a HostReads to count in (forward and backward)."""
    x = x.clone().contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x.requires_grad_(True)
    with reads if reads is not None else torch.enable_grad():
        for _ in range(STEPS):
            y = bn(x)
        (y * weights.to(y.device)).sum().backward()
    buffers = {k: v.detach().clone() for k, v in bn.named_buffers()}
    # torch's SyncBatchNorm leaves an empty rank's gradients undefined (None): zeros, as autograd reads them
    grads = [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in (x, bn.weight, bn.bias)]
    return (y.detach(), *grads, buffers)


def _worker(rank: int, port: int, device: str, out_dir: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from bench.common import HostReads
    from hptransfer.backend import sync_batchnorm

    if device == "cuda":
        torch.cuda.set_device(0)  # both ranks on the one GPU: gloo moves the sums through the host
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = {}
        x_all, w_all = _batch(device), _loss_weights((4, 3, 5, 5))
        for name, momentum, split, channels_last in SCENARIOS:
            rows = slice(sum(split[:rank]), sum(split[:rank + 1]))
            ours = sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3, momentum=momentum)), torch.device(device))[0]
            _init(ours)
            ours.to(device)
            reads = HostReads()
            got = _run(ours, x_all[rows], w_all[rows], channels_last, reads)
            result[name] = {"type": type(ours).__name__, "host_reads": reads.counts, "ours": got}
            if device == "cuda":  # torch's own, on the same ranks
                theirs = nn.SyncBatchNorm(3, momentum=momentum).to(device)
                _init(theirs)
                result[name]["torch"] = _run(theirs, x_all[rows], w_all[rows], channels_last)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _spawn(device: str, tmp_path: Path) -> list:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, device, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _close(a, b, what, tol=1e-5):
    torch.testing.assert_close(a.cpu().float(), b.cpu().float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def test_sync_batchnorm_equals_batchnorm_over_the_whole_batch_without_host_reads(tmp_path):
    ranks = _spawn("cpu", tmp_path)
    for name, momentum, split, channels_last in SCENARIOS:
        ref = nn.BatchNorm2d(3, momentum=momentum)
        _init(ref)
        y, dx, dw, db, buffers = _run(ref, _batch(), _loss_weights((4, 3, 5, 5)), channels_last)
        got = [r[name] for r in ranks]
        for g in got:
            assert g["type"] == "AllReduceBatchNorm", g["type"]
            assert g["host_reads"] == {}, f"{name}: host reads in forward/backward: {g['host_reads']}"
        _close(torch.cat([g["ours"][0] for g in got]), y, f"{name} output")
        _close(torch.cat([g["ours"][1] for g in got]), dx, f"{name} input gradient")
        # each rank's weight and bias gradients are its own; the engine averages (here: sums) them over ranks
        _close(got[0]["ours"][2] + got[1]["ours"][2], dw, f"{name} weight gradient")
        _close(got[0]["ours"][3] + got[1]["ours"][3], db, f"{name} bias gradient")
        for key, buf in buffers.items():
            for r, g in enumerate(got):  # identical running statistics on both ranks (the empty one too), fp32
                assert g["ours"][4][key].dtype == buf.dtype, (name, key)
                _close(g["ours"][4][key], buf, f"{name} {key} on rank {r}", tol=1e-6)


@pytest.mark.cuda
def test_sync_batchnorm_equals_torch_syncbatchnorm_cuda(tmp_path):
    ranks = _spawn("cuda", tmp_path)
    for name, *_ in SCENARIOS:
        for r, rank in enumerate(ranks):
            g = rank[name]
            assert g["host_reads"] == {}, f"{name}: host reads in forward/backward: {g['host_reads']}"
            for i, what in enumerate(("output", "input gradient", "weight gradient", "bias gradient")):
                _close(g["ours"][i], g["torch"][i], f"{name} {what} on rank {r}")
            for key, buf in g["torch"][4].items():
                _close(g["ours"][4][key], buf, f"{name} {key} on rank {r}", tol=1e-6)
