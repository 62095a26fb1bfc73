"""bench/bench_train.py: conv FLOP formula, step FLOPs from the summary counter, an end-to-end run, the plot."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

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

    cfg = bench_train.make_config(64, 3, tiny_cfg.width, with_discriminators=True, compile_="off", checkpointing=False)
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
    # on the CPU fast is the fp32 fast path: no separate row, a note saying so; MFU against a matmul only
    assert "fp32" in row["fast_fp32"] and row["speedup_kernels"] == row["speedup"]
    assert data["peaks"]["fp32"]["measured_tflops"] > 0 and data["peaks"]["fp32"]["spec_tflops"] is None
    for m in row["modes"].values():
        assert m["precision"] == "fp32" and m["mfu_spec"] is None and m["mfu_measured"] == m["mfu"] > 0
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


# ----------------------------------------------------------------------------- FLOPs by what autograd runs
class _ConvWork(TorchDispatchMode):
    """The convolution work autograd really does, in FLOPs: every aten.convolution at its forward cost
    (2 * Cin/groups * Cout * kh * kw * Hout * Wout per image), and every convolution_backward at that
    same cost once per gradient it computes (its output_mask: input, weight)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    @staticmethod
    def _cost(weight, out):  # weight (Cout, Cin/groups, kh, kw), out (B, Cout, Hout, Wout)
        return 2 * out.shape[0] * out.shape[1] * out.shape[2] * out.shape[3] * weight[0].numel()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            assert not args[6], "transposed convolutions are not counted by the benchmark"
            self.total += self._cost(args[1], out)
        elif func is torch.ops.aten.convolution_backward.default:  # (grad_out, input, weight, ..., output_mask)
            self.total += self._cost(args[2], args[0]) * (int(args[10][0]) + int(args[10][1]))
        return out


def test_frozen_networks_count_x1_without_grad_and_x2_with_input_grad(tiny_cfg):
    """VGG (parameters frozen) on the real image runs without autograd (x1) and on the fake with the
    gradient flowing through to the image (x2, no weight gradients); the discriminators in the
    generator's adversarial term likewise (x2); in their own D step they train (x3, less the first
    conv's input gradient: their input needs none)."""
    from hptransfer import losses
    from hptransfer.models import LocalDiscriminator, VGG16Features

    vgg = VGG16Features(weights="random", layers=("relu1_2", "relu2_2")).eval()
    for p in vgg.parameters():
        p.requires_grad_(False)
    x = torch.rand(2, 3, 32, 32)
    forward = bench_train.module_conv_flops(vgg, x)
    with _ConvWork() as w, torch.no_grad():
        vgg(x)
    assert w.total == bench_train.NO_GRAD * forward == forward
    fake = x.clone().requires_grad_()
    with _ConvWork() as w:
        sum(f.sum() for f in vgg(fake)).backward()
    assert w.total == bench_train.INPUT_GRAD * forward == 2 * forward  # not 3: no weight gradients

    d = LocalDiscriminator(tiny_cfg, 18, 8)
    valid = torch.ones(2, 18, dtype=torch.bool)
    pairs = torch.rand(2, 18, 6, 8, 8, requires_grad=True)
    per = bench_train.module_conv_flops(d, pairs)
    with _ConvWork() as w:
        losses.generator_adversarial_loss(d, pairs, valid).backward()
    assert w.total == bench_train.INPUT_GRAD * per == 2 * per
    assert all(p.grad is None for p in d.parameters()) and pairs.grad is not None
    with _ConvWork() as w:  # the D step: real and fake pairs, no gradient to either
        losses.discriminator_loss(d, pairs.detach(), pairs.detach(), valid).backward()
    first = next(m for m in d.modules() if isinstance(m, nn.Conv2d))
    first_fwd = bench_train.module_conv_flops(first, pairs.detach().reshape(2, 18 * 6, 8, 8).repeat(2, 1, 1, 1))
    assert w.total == bench_train.TRAINED * 2 * per - first_fwd


@pytest.mark.parametrize("mode", ["naive", "fast"])
def test_step_flops_match_the_convolutions_a_step_runs(tiny_cfg, mode):
    """A whole step (64 px, local perceptual loss and discriminators both on, every keypoint present)
    does the conv work step_flops counts, less only the first convs' input gradients that autograd
    skips (generator from-RGB, discriminators' first layer in the D step): well within 1 %. Counting
    the frozen VGG and discriminator passes x3, as the benchmark did, overstates it by about a third."""
    cfg = bench_train.make_config(64, 2, tiny_cfg.width, with_discriminators=True, compile_="off",
                                  checkpointing=False, vgg_layers=["relu1_2", "relu2_2"])
    cfg.model.disc_channels = tiny_cfg.disc_channels
    cfg.loss.local_perceptual_at_top = True
    run = bench_train.Runner(mode, cfg, 64, 2, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    kp = lambda: (torch.rand(2, 18, 2, generator=gen) * 0.6 + 0.2) * 63  # noqa: E731  every keypoint inside
    run.inputs = (*run.inputs[:2], kp(), kp())
    with _ConvWork() as w:
        run.step()
    f = bench_train.step_flops(cfg, 64, 2, with_discriminators=True)
    assert f["local_vgg"] > 0 and f["discriminator"] > 0
    assert w.total <= f["total"] <= 1.01 * w.total, (w.total, f)


@pytest.mark.parametrize("name,dtype,tf32,expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, 989.4), ("NVIDIA H100 PCIe", "bf16", True, 756.0),
    ("NVIDIA H100 NVL", "fp16", True, 835.5), ("NVIDIA H200", "bf16", True, 989.4),
    ("NVIDIA H200 NVL", "bf16", True, 835.5), ("NVIDIA H200", "fp32", True, 494.7), ("NVIDIA H200", "fp32", False, 66.9),
    ("NVIDIA A100-SXM4-80GB", "bf16", True, 312.0), ("NVIDIA A100 80GB PCIe", "fp32", True, 156.0),
    ("NVIDIA A100-PCIE-40GB", "fp32", False, 19.5), ("NVIDIA L40S", "bf16", True, 362.1),
    ("NVIDIA L40", "bf16", True, 181.0), ("NVIDIA L4", "bf16", True, 121.0), ("NVIDIA A10", "bf16", True, 125.0),
    ("NVIDIA A10G", "bf16", True, None), ("Tesla V100-SXM2-16GB", "bf16", True, None),
    ("Tesla V100-SXM2-16GB", "fp16", True, 125.0), ("Some Future GPU", "bf16", True, None), (None, "fp32", True, None),
])
def test_spec_peaks_by_device_name(monkeypatch, name, dtype, tf32, expected):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    assert bench_train.spec_peak_tflops(name, dtype)[0] == expected


def test_modes_and_measured_peak_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench_train.modes_to_run("both", cuda) == ["fast", "fast_fp32", "naive"]
    assert bench_train.modes_to_run("both", cpu) == ["fast", "naive"]  # fast is fp32 on the CPU
    assert bench_train.modes_to_run("fast_fp32", cpu) == ["fast_fp32"]
    assert [bench_train.mode_precision(m, cuda) for m in ("naive", "fast_fp32", "fast")] == ["fp32", "fp32", "bf16"]
    assert bench_train.mode_precision("fast", cuda, "fp16") == "fp16" and bench_train.mode_precision("fast", cpu) == "fp32"
    peak = bench_train.peaks(cpu, ["fp32"])
    assert set(peak) == {"fp32"} and peak["fp32"]["spec_tflops"] is None and peak["fp32"]["measured_tflops"] > 0


def test_bench_discriminator_counts_and_writes_json(tmp_path):
    """Grouped = N independent discriminators: exactly N x the shared one's parameters; model-summary's
    counts are the same modules' counts."""
    from bench import bench_discriminator
    from hptransfer import pose
    from hptransfer.models.summary import discriminator_params

    out = tmp_path / "d.json"
    assert bench_discriminator.main(["--resolution", "64", "--batch", "1", "--repeat", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["shared"], r["disc_channels"]): r for r in result["rows"]}
    assert len(rows) == 6 and result["environment"]["device"]
    n = pose.descriptor_count(64)
    summary = discriminator_params(64)
    for channels in (16, 32, 64):
        grouped, shared = rows[(False, channels)], rows[(True, channels)]
        assert grouped["params"] == n * shared["params"]
        assert summary[channels] == {"grouped": grouped["params"], "shared": shared["params"]}
        assert grouped["step_gflop"] == pytest.approx(shared["step_gflop"])  # same convolutions, grouped or not
        assert grouped["saved_mib"] > shared["saved_mib"] > 0 and grouped["step_ms"] > 0


@pytest.mark.parametrize("mode", bench_train.MODES)
def test_every_mode_steps_its_own_path(mode, tiny_cfg, monkeypatch):
    """Each mode trains: the fast modes through hptransfer.step.train_step (fast_compiled with train.compile),
    naive through bench/naive.py; the weights change."""
    compiled = []
    import hptransfer.train as train_module
    monkeypatch.setattr(train_module, "_compile_generator", lambda m, g, e: compiled.append(m))
    cfg = bench_train.make_config(64, 1, tiny_cfg.width, with_discriminators=False, compile_="blocks",
                                  checkpointing=False, vgg_layers=["relu1_2"])
    run = bench_train.Runner(mode, cfg, 64, 1, torch.device("cpu"))
    before = [p.detach().clone() for p in run.g.parameters()]
    calls = []
    real_step = bench_train.train_step
    monkeypatch.setattr(bench_train, "train_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    run.step()
    assert calls == ([] if mode == "naive" else [1])
    assert compiled == (["blocks"] if mode == "fast_compiled" else [])
    assert any(not torch.equal(a, b) for a, b in zip(before, run.g.parameters()))


@pytest.mark.slow  # ~30-60 s: four variants of a whole step
def test_bench_step_parts_switches_each_part_and_restores_it(tmp_path):
    from bench import bench_step_parts
    from hptransfer import ops, step
    from hptransfer.ops import _local_loss_fast

    before = (ops.perceptual_distance, step.read_nonfinite, dict(_local_loss_fast.COMPACTION_BUCKET))
    reads = []
    with bench_step_parts.part_off("one_read", torch.device("cpu")):
        from hptransfer.backend import SingleBackend
        backend = SingleBackend("fp32", device="cpu")
        reads = step.read_nonfinite(backend, torch.tensor(1.0), torch.tensor(float("nan")))
    assert reads == [False, True]
    with bench_step_parts.part_off("compaction", torch.device("cpu")):
        assert _local_loss_fast.COMPACTION_BUCKET["cpu"] is None
    assert (ops.perceptual_distance, step.read_nonfinite, _local_loss_fast.COMPACTION_BUCKET) == before
    out = tmp_path / "parts.json"
    assert bench_step_parts.main(["--resolution", "64", "--batch", "1", "--width", "0.03125", "--steps", "1",
                                  "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["all on", "compaction off", "fused_global off", "one_read off"]
    assert all(r["ms"] > 0 for r in rows)


# ----------------------------------------------------------------------------- host reads (bench/sync_check.py)
def test_host_reads_counts_what_makes_the_host_wait():
    from bench.common import HostReads

    x = torch.randn(6)
    with HostReads() as reads:
        x.sum().item()  # _local_scalar_dense
        _ = x[x > 0]  # a boolean mask: its size is read on the host
        x.nonzero()
        torch.full((1,), 3.0) + x.cumsum(0)  # device work only
        with reads.pause():  # a deliberate read
            float(x[0])
    assert reads.counts == {"aten._local_scalar_dense": 1, "aten.index (boolean mask)": 1, "aten.nonzero": 1}
    assert "test_host_reads_counts_what_makes_the_host_wait" in reads.where["aten.nonzero"]


def test_sync_check_finds_a_hidden_host_read_on_the_cpu(tmp_path, monkeypatch):
    """The CPU sync check fails on a host read in the step (here an .item() in the global loss) and names it."""
    from bench import sync_check
    from hptransfer import losses

    toy = ["--resolution", "64", "--batch", "1", "--width", "0.03125", "--vgg-layers", "relu1_2", "--warmup", "1"]
    assert sync_check.main([*toy, "--out", str(tmp_path / "clean.json")]) == 0
    global_loss = losses.global_perceptual_loss

    def reads_on_the_host(*args, **kwargs):
        loss = global_loss(*args, **kwargs)
        loss.item()
        return loss

    monkeypatch.setattr(losses, "global_perceptual_loss", reads_on_the_host)
    assert sync_check.main([*toy, "--out", str(tmp_path / "read.json")]) == 1
    result = json.loads((tmp_path / "read.json").read_text())["results"][0]
    assert result["result"] == "fail" and "_local_scalar_dense" in result["error"] and "reads_on_the_host" in result["error"]


# ----------------------------------------------------------------------------- bench/bench_checkpoint.py
def test_bench_checkpoint_computed_bytes_and_a_written_checkpoint(tmp_path, monkeypatch):
    """On a toy config: per shipped DeepSpeed config, each rank's optimiser shard is 12 bytes per parameter
    over the ranks and ZeRO-3 drops the replicated fp32 weights from the model-states file; the measured
    single-process checkpoint (weights + Adam's two moments) is ~12 bytes per parameter and is removed."""
    from bench import bench_checkpoint

    config = tmp_path / "tiny.yaml"
    config.write_text("model: {width: 0.03125, disc_channels: 4}\n"
                      "loss: {vgg_weights: random, layers: [relu1_2], disc_at_resolution: 64}\n"
                      "stages: [{resolution: 64, iterations: 1, batch_size: 1}]\n")
    monkeypatch.setattr(bench_checkpoint, "result_path", lambda name: tmp_path / f"{name}.json")
    written = tmp_path / "written"
    assert bench_checkpoint.main(["--config", str(config), "--ranks", "1,2", "--repeat", "1",
                                  "--out", str(written)]) == 0
    doc = json.loads((tmp_path / "checkpoint.json").read_text())
    _, g, d = bench_checkpoint.stage_models(str(config))
    engines = {"generator": bench_checkpoint.counts(g), "discriminator": bench_checkpoint.counts(d)}
    assert doc["parameters"] == {k: v[0] for k, v in engines.items()}
    rows = {(r["config"], r["ranks"], r["engine"]): r for r in doc["computed"]}
    configs = {r["config"] for r in doc["computed"]}
    assert len(configs) == len(list((REPO / "configs" / "ds").glob("zero*.json"))) and len(rows) == len(configs) * 4
    assert rows[("zero1g_zero2d_bf16.json", 1, "generator")]["zero"] == 1
    assert rows[("zero1g_zero2d_bf16.json", 1, "discriminator")]["zero"] == 2
    for (name, ranks, engine), r in rows.items():
        params, buffer_bytes = engines[engine]
        assert r["optim_per_rank_MB"] == pytest.approx(12 * params / ranks / 1e6)
        weights = 0 if r["zero"] == 3 else 4 * params
        assert r["model_states_MB"] == pytest.approx((weights + buffer_bytes) / 1e6), (name, engine)
    measured = doc["measured_single_process"]
    expected = sum(12 * params + buffer_bytes for params, buffer_bytes in engines.values())
    assert expected <= measured["bytes"] < 1.25 * expected, (measured["bytes"], expected)  # + file headers
    assert measured["median_s"] > 0 and not list(written.iterdir())
