"""bench/bench_train.py: conv FLOP formula, step FLOPs from the summary counter, an end-to-end run, the plot."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import bench_train, plot  # noqa: E402


@pytest.mark.parametrize("cin,cout,k,groups,stride,hw", [(3, 8, 3, 1, 1, 17), (12, 6, 1, 3, 2, 9)])
def test_conv_flops_formula(cin, cout, k, groups, stride, hw):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups)
    hout = (hw + 2 * (k // 2) - k) // stride + 1
    expected = 2 * (cin // groups) * cout * k * k * hout * hout
    x = torch.zeros(2, cin, hw, hw, device="meta")
    assert bench_train.module_conv_flops(conv.to("meta"), x) == 2 * expected  # batch 2


def test_step_flops_uses_generator_counter(tiny_cfg):
    from hptransfer.models import Generator
    from hptransfer.models.summary import conv_flops

    cfg = bench_train.make_config(64, 3, tiny_cfg.width, with_discriminators=True, compile_=False, checkpointing=False)
    assert bench_train.step_flops(cfg, 64, 3, with_discriminators=True)["local_vgg"] == 0  # the discriminators replace it
    cfg.loss.local_perceptual_at_top = True  # both local terms
    f = bench_train.step_flops(cfg, 64, 3, with_discriminators=True)
    with torch.device("meta"):
        g = Generator(cfg.model, 64)
    assert f["generator"] == 3 * 3 * conv_flops(g, 64)
    assert f["discriminator"] > 0 and f["local_vgg"] > 0
    assert f["total"] == sum(v for k, v in f.items() if k != "total")


def test_bench_train_end_to_end_and_plot(tmp_path, capsys):
    out = tmp_path / "train-cpu.json"
    rc = bench_train.main(["--resolution", "64", "--batch", "1", "--steps", "2", "--warmup", "1", "--mode", "both",
                           "--width", "0.03125", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["complete"] and data["cpu"]["flags"] and "plan" in data["backend_status"]
    row = data["results"][0]
    assert set(row["modes"]) == {"fast", "naive"} and row["speedup"] > 0
    for m in row["modes"].values():
        assert len(m["times_ms"]) == 2 and m["ms"] > 0
        assert {"generator_forward", "global_vgg", "local_vgg", "backward", "optimizer"} <= set(m["phases_s"])
    assert "speed-up" in capsys.readouterr().out
    png = tmp_path / "train.png"
    plot.main([str(out), "--out", str(png)])
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_bench_kernels_quick_writes_rows(tmp_path):
    from bench import bench_kernels

    out = tmp_path / "kernels.json"
    assert bench_kernels.main(["--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    ops = {(r["op"], r["resolution"], r["batch"]) for r in doc["rows"]}
    assert ("heatmaps", 256, 2) in ops and ("gather_bwd", 64, 1) in ops
    assert all(r["reference_ms"] > 0 for r in doc["rows"])
    if not torch.cuda.is_available():  # the interpreter is never timed as a kernel
        assert all(r["kernel_ms"] is None for r in doc["rows"])
    assert doc["device"] and doc["git_commit"] and doc["cpu"]["flags"] and "plan" in doc["backend_status"]


@pytest.mark.parametrize("fixed,per,curve,start", [(3e9, 2.1e8, 0.0, 8), (20e9, 1.3e9, 0.03, 2), (1e9, 7e6, 0.0, 1),
                                                    (5e9, 4e8, 0.0, 512)])
def test_search_max_batch_finds_the_limit_in_few_tries(fixed, per, curve, start):
    """An affine-ish peak memory (fixed + per * b, slightly convex) on an 80 GB device: the search lands
    within its tolerance of the true largest batch, never above it, in few tries (GPU time is short)."""
    capacity = 80 * 2**30

    def peak_of(b):
        peak = fixed + per * b * (1 + curve * b / 100)
        return int(peak) if peak <= 0.99 * capacity else None

    true_max = max(b for b in range(1, 4097) if peak_of(b) is not None)  # the limit is 4096
    batch, tries = bench_train.search_max_batch(peak_of, start, 4096, capacity)
    assert true_max - max(1, true_max // 16) <= batch <= true_max, (batch, true_max, tries)
    assert len(tries) <= 8, tries


def test_search_max_batch_without_memory_line_doubles_to_the_limit():
    batch, tries = bench_train.search_max_batch(lambda b: 0, 1, 2, None)
    assert batch == 2 and tries == [(1, True), (2, True)]
    batch, tries = bench_train.search_max_batch(lambda b: 0 if b <= 5 else None, 1, 64, None)
    assert batch == 5, tries


def test_environment_records_cpu_flags_and_backend_status():
    from bench.common import environment

    env = environment()
    assert env["cpu"]["flags"] and env["cpu"]["torch_capability"] and env["cpu"]["model"]
    assert {"extension", "triton", "plan", "fallbacks_taken"} <= set(env["backend_status"])
