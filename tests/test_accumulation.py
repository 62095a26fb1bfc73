"""Gradient accumulation and the global batch, single process: the engine's window (one optimiser step
per ``accumulation`` micro-batches, a non-finite micro-batch drops the whole window, BatchNorm buffers
included), the global-batch arithmetic, the data each micro-batch gets (independent of the split
between ranks and accumulation), the data position across global batches, and an accumulated run that
resumes exactly. The multi-rank equality (1 rank x 2 = 2 ranks x 1) is in tests/test_reshard.py."""
from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from hptransfer.backend import SingleEngine
from hptransfer.config import ConfigError, load_config, stage_global_batch

CPU = torch.device("cpu")


def _engine(module, accumulation=1, optimizer=torch.optim.Adam):
    return SingleEngine(module, optimizer(module.parameters(), lr=1e-2), CPU, accumulation=accumulation)


def _params(module) -> list:
    return [p.detach().clone() for p in module.parameters()]


def test_a_window_of_two_micro_batches_is_one_step_over_both():
    torch.manual_seed(0)
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    one = nn.Linear(5, 3)
    two = copy.deepcopy(one)
    # plain SGD: its step scales with the gradient (Adam's would hide a window that sums instead of averages)
    big, acc = _engine(one, optimizer=torch.optim.SGD), _engine(two, accumulation=2, optimizer=torch.optim.SGD)
    mse = nn.functional.mse_loss
    for _ in range(2):  # two optimiser steps
        big.backward(mse(big(x), y))
        big.step()
        before = _params(two)
        for k, half in enumerate((slice(0, 2), slice(2, 4))):
            acc.backward(mse(acc(x[half]), y[half]))  # the mean over each half; the window averages them
            acc.step()
            if k == 0:  # no optimiser step inside the window
                assert all(torch.equal(a, b) for a, b in zip(before, _params(two)))
        for a, b in zip(_params(one), _params(two)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_non_finite_micro_batch_drops_its_whole_window():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    twin = copy.deepcopy(model)
    eng, ref = _engine(model, accumulation=3), _engine(twin, accumulation=3)
    x = torch.randn(3, 6, 5)
    weights, buffers = _params(model), [b.clone() for b in model.buffers()]
    for k in range(3):  # the second micro-batch is non-finite: the window is dropped on the spot
        loss = eng(x[k]).square().mean()
        if k == 1:
            eng.skip(loss * float("nan"))
        else:
            eng.backward(loss)
            eng.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, _params(model)))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # running statistics put back
    assert not eng.optimizer.state and all(p.grad is None for p in model.parameters())
    for engine in (eng, ref):  # the next window trains as if the dropped one had never been
        for k in range(3):
            engine.backward(engine(x[k] + 1).square().mean())
            engine.step()
    assert not all(torch.equal(a, b) for a, b in zip(weights, _params(model)))
    for a, b in zip(_params(model), _params(twin)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_global_batch_and_accumulation_steps():
    stages = "stages=[{resolution: 64, iterations: 1, batch_size: 2}, {resolution: 128, iterations: 1, batch_size: 1}]"
    cfg = load_config(None, [stages])
    assert stage_global_batch(cfg, 0, 4) == (8, 1)  # unset: batch_size x ranks, no accumulation
    cfg = load_config(None, [stages, "train.global_batch=8"])
    assert [stage_global_batch(cfg, i, 2) for i in (0, 1)] == [(8, 2), (8, 4)]
    assert stage_global_batch(cfg, 0, 4) == (8, 1)  # more ranks: less accumulation, the same step
    cfg = load_config(None, [stages, "train.global_batch=8", "stages.1.global_batch=2"])
    assert stage_global_batch(cfg, 1, 2) == (2, 1)
    with pytest.raises(ConfigError, match=r"train.global_batch=8 is not a multiple of stages.0.batch_size=2 x 3 ranks"):
        stage_global_batch(cfg, 0, 3)
    with pytest.raises(ConfigError, match=r"stages.1.global_batch=2 is not a multiple .* x 4 ranks"):
        stage_global_batch(cfg, 1, 4)
    with pytest.raises(ConfigError, match=r"train.global_batch=3 must be a positive multiple of stages.0.batch_size=2"):
        load_config(None, [stages, "train.global_batch=3"])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from test_train import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth"))


def test_each_micro_batch_gets_the_same_samples_however_the_global_batch_is_split(data_root):
    """Rank r with accumulation a reads as virtual ranks r*a ... r*a+a-1 of world*a would: with a global
    batch of 4 and micro-batches of 1, 1 rank x 4, 2 ranks x 2 and 4 ranks x 1 compute the same
    micro-batches, and each step takes the next global batch of the epoch's permutation."""
    from hptransfer.config import load_config as load
    from hptransfer.data import PairDataset
    from hptransfer.train import _Batches

    cfg = load(None, ["data.workers=0", "data.flip=false", f"data.root={data_root}"])
    ds = PairDataset(data_root, "train", 64)
    steps = 3

    def micro_batches(world, accumulation) -> list:
        """[step][virtual rank] -> the micro-batch's sample indices, over every rank of the split."""
        out = [[None] * (world * accumulation) for _ in range(steps)]
        for rank in range(world):
            batches = _Batches(cfg, ds, 1, 7, SimpleNamespace(rank=rank, world_size=world, device=CPU), 0, 0,
                               accumulation)
            for step in range(steps):
                for k in range(accumulation):
                    out[step][rank * accumulation + k] = batches.next()["index"].tolist()
        return out

    one = micro_batches(1, 4)
    assert micro_batches(2, 2) == one and micro_batches(4, 1) == one
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(7)).tolist()  # DistributedSampler's
    for step in range(steps):  # the next global batch of the epoch
        assert sorted(i for micro in one[step] for i in micro) == sorted(perm[4 * step:4 * step + 4])


def test_data_position_between_global_batches():
    from hptransfer.distributed.reshard import map_data_position

    assert map_data_position(5, 8, 8) == (5, 0)
    assert map_data_position(5, 8, 12) == (3, 4)  # 40 samples seen; 3 new steps are 36; 4 seen again
    assert map_data_position(3, 4, 2) == (6, 0)


def test_accumulated_run_resumes_exactly_and_counts_optimiser_steps(data_root, tmp_path, caplog):
    from hptransfer import checkpoint as ckpt
    from hptransfer.train import train
    from test_train import tiny_cfg

    common = ["loss.layers=[relu1_2]", "loss.disc_at_resolution=64", "train.sample_every=0", "train.global_batch=4",
              "stages=[{resolution: 64, iterations: 3, batch_size: 2}]"]
    micro, steps = [], []
    full = train(tiny_cfg(data_root, tmp_path / "full", *common),
                 loss_hook=lambda terms, info: micro.append((info["global_step"], info["micro_step"])) or terms,
                 callback=lambda info: steps.append((info["step_in_stage"], info["criterion"])))
    assert micro == [(s, m) for s in range(3) for m in range(2)]  # two micro-batches per optimiser step
    assert steps == [(0, "l2"), (1, "l2"), (2, "l1")]  # L2 while step < 1.5: the switch counts optimiser steps
    assert train(tiny_cfg(data_root, tmp_path / "stop", *common), stop_at_step=2)["stopped"]
    meta = ckpt.read_meta(ckpt.read_latest(tmp_path / "stop" / "checkpoints"))
    assert meta["state"]["consumed"] == 2 and meta["state"]["global_batch"] == 4
    shutil.copytree(tmp_path / "stop", tmp_path / "other")
    resumed = train(tiny_cfg(data_root, tmp_path / "stop", *common), resume="auto")
    for k, v in full["generator_state"].items():  # checkpoints sit between windows: the resume is exact
        torch.testing.assert_close(resumed["generator_state"][k], v, rtol=0, atol=0, msg=k)
    # the same checkpoint resumed with another global batch: its position maps to the samples already seen
    with caplog.at_level("WARNING", logger="hptransfer.train"):
        train(tiny_cfg(data_root, tmp_path / "other", *common[:-2], "train.global_batch=2",
                       "stages=[{resolution: 64, iterations: 3, batch_size: 2}]"), resume="auto")
    assert "global batch 4 (checkpoint) -> 2 (this run)" in caplog.text
    meta = json.loads((ckpt.read_latest(tmp_path / "other" / "checkpoints") / "meta.json").read_text())
    assert meta["state"]["consumed"] == 2 * 2 + 1 and meta["state"]["global_batch"] == 2
