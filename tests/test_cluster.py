"""Running on a cluster (docs/cluster.md), on CPU ranks over gloo and 127.0.0.1 only.

Unit tests: SLURM host lists (as ``scontrol show hostnames`` prints them), how each launcher's
environment becomes a world, the device choice and ``--device cuda``'s refusal, several processes
without a DeepSpeed config, the Nsight capture window, failed collectives named by rank, the signal
handlers. One process: SIGUSR1 stops after the current step with a checkpoint and exit status 75, and
``--resume auto`` ends bit-exact where an uninterrupted run ends; stats.jsonl and TensorBoard.
Launches (each starts its processes once): the srun simulation (SLURM variables only, no RANK),
torchrun without a DeepSpeed config, torchrun with two "nodes" and a c10d rendezvous, and a rank that
does not join a collective.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hptransfer import checkpoint as ckpt
from hptransfer.distributed import launch, signals
from hptransfer.errors import LaunchError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- SLURM lists
@pytest.mark.parametrize("hostlist, hosts", [
    # what `scontrol show hostnames LIST` prints, one host a line
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("gpu[008-010]", ["gpu008", "gpu009", "gpu010"]),  # zero padding kept across a digit boundary
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("x[3],y-1.cluster,z[01-02].ib", ["x3", "y-1.cluster", "z01.ib", "z02.ib"]),
    ("single", ["single"]),
    ("h1 h2", ["h1", "h2"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert launch.expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["node[01-", "node]1[", "n[1-2", "n[a-b]", "n[5-3]", "n[[1]]", "n[1-2]x[3"])
def test_malformed_hostlist_is_an_error(bad):
    with pytest.raises(ValueError, match="host list"):
        launch.expand_hostlist(bad)


def test_tasks_per_node_and_port():
    assert launch.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert launch.expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        launch.expand_tasks_per_node("2(3)")
    assert launch.slurm_port("4021337") == 15000 + 4021337 % 20000
    assert launch.slurm_port("123_4") == 15000 + 1234  # an array job's id
    assert launch.slurm_port(None) == launch.DEFAULT_PORT


def test_hostnames_asks_scontrol_when_present(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\necho fromslurm1; echo fromslurm2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert launch.hostnames("node[01-02]") == ["fromslurm1", "fromslurm2"]
    fake.write_text("#!/bin/sh\nexit 3\n")  # scontrol fails (no controller): our own reading
    assert launch.hostnames("node[01-02]") == ["node01", "node02"]


# ----------------------------------------------------------------------------- worlds
SRUN = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "4021337"}


def test_srun_forms_the_world_from_slurm_variables(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: our parser
    w = launch.discover(SRUN)
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.node_rank) == (3, 4, 1, 2, 1)
    assert (w.launcher, w.master_addr, w.master_port) == ("srun", "gpu07", 15000 + 4021337 % 20000)
    # a step's own variables (srun inside a larger allocation) and the user's MASTER_* win
    step = {**SRUN, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "gpu08",
            "MASTER_PORT": "23456", "MASTER_ADDR": "10.0.0.9"}
    w = launch.discover(step)
    assert (w.world_size, w.master_addr, w.master_port) == (2, "10.0.0.9", 23456)
    env = {}
    launch.export(launch.discover(SRUN), env)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(15000 + 4021337 % 20000), "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1"}
    with pytest.raises(LaunchError, match="SLURM_PROCID=4 is outside SLURM_NTASKS=4"):
        launch.discover({**SRUN, "SLURM_PROCID": "4"})
    with pytest.raises(LaunchError, match="SLURM_NTASKS='x'"):
        launch.discover({**SRUN, "SLURM_NTASKS": "x"})


def test_launcher_variables_win_over_slurm_and_name_the_launcher():
    torchrun = {**SRUN, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                "MASTER_ADDR": "h0", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"}
    w = launch.discover(torchrun)  # torchrun inside an sbatch script: its variables, not SLURM's
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.node_rank, w.launcher) == (5, 8, 1, 4, 1,
                                                                                                "torchrun")
    ds = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
          "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    w = launch.discover(ds)
    assert (w.local_world_size, w.node_rank, w.launcher) == (2, 1, "deepspeed")
    assert launch.discover({}) == launch.World()
    env = {}
    launch.export(launch.World(), env)  # a lone process under DeepSpeed: a local rendezvous, never MPI
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_several_processes_need_a_deepspeed_config():
    launch.require_deepspeed(launch.World(), None)
    launch.require_deepspeed(launch.discover(SRUN), "ds.json")
    with pytest.raises(LaunchError, match="srun started 4 processes.*--deepspeed_config"):
        launch.require_deepspeed(launch.discover(SRUN), None)


def test_device_choice(monkeypatch):
    assert launch.resolve_device("cpu", launch.World()) == (torch.device("cpu"), None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, why = launch.resolve_device("auto", launch.World())
    assert device == torch.device("cpu") and "is_available() is False" in why
    with pytest.raises(LaunchError, match="--device cuda.*no usable GPU for rank 0.*--device cpu"):
        launch.resolve_device("cuda", launch.World())


def test_log_head_names_every_rank_and_shouts_a_cpu_fallback(caplog):
    records = [{"rank": 1, "host": "a", "device": "cpu", "fallback": "torch.cuda.is_available() is False"},
               {"rank": 0, "host": "a", "device": "cuda:0 (NVIDIA H100)", "fallback": None},
               {"rank": 2, "host": "b", "device": "cpu", "fallback": "no GPU"}]
    with caplog.at_level("INFO", logger="hptransfer"):
        launch.log_world(launch.World(world_size=3, launcher="srun", note="SLURM job 7"), records, "nccl", 60)
    assert "world: 3 rank(s), 2, 1 per node, launcher srun (SLURM job 7), communication nccl" in caplog.text
    assert "a: 2 rank(s) [0: cuda:0 (NVIDIA H100), 1: cpu]" in caplog.text and "b: 1 rank(s) [2: cpu]" in caplog.text
    assert "2 OF 3 RANKS TRAIN ON THE CPU" in caplog.text and "(rank 1: torch.cuda.is_available() is False)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="hptransfer"):  # one process on a laptop: a plain line, no banner
        launch.log_world(launch.World(), records[:1], None, 60)
    assert "1 per node" in caplog.text and "RANKS TRAIN ON THE CPU" not in caplog.text
    assert "device: cpu (train.device=auto" in caplog.text


# ----------------------------------------------------------------------------- failures named by rank
def test_collective_failures_are_named_by_rank():
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                        "5000ms for recv operation to complete")
    message = launch.collective_failure(gloo, 5)
    assert message.startswith("rank 0 of 1 on ") and "train.dist_timeout_s=5 s" in message
    assert "Timed out waiting 5000ms" in message and "\n" not in message
    assert launch.collective_failure(RuntimeError("DataLoader timed out after 5 seconds"), 5) is None
    assert launch.collective_failure(ValueError("gloo"), 5) is None


# ----------------------------------------------------------------------------- signals, profiling
def test_stop_signals_are_recorded_then_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with signals.StopSignals() as stop:
        assert signal.getsignal(signal.SIGUSR1) is before  # not armed yet: a signal ends the process as usual
        stop.arm()
        flag = stop.flag(torch.device("cpu"))
        assert flag.tolist() == [0.0] and signals.name(0.0) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert stop.received == "SIGUSR1" and stop.flag(torch.device("cpu")) is flag
        assert signals.name(flag.item()) == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing (and ends nothing)
        assert stop.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_read_nonfinite_carries_the_callers_flags():
    from hptransfer.backend import SingleBackend
    from hptransfer.step import read_nonfinite

    backend = SingleBackend("fp32", device="cpu")
    got = read_nonfinite(backend, torch.tensor(1.0), torch.tensor(float("nan")), agree=torch.tensor([15.0, 0.0]))
    assert got == [False, True, 15.0, 0.0]
    assert read_nonfinite(backend, torch.tensor(1.0)) == [False]


def test_capture_window(monkeypatch):
    from hptransfer import profiling

    assert profiling.CaptureWindow.from_env({}) is None
    w = profiling.CaptureWindow.from_env({"HPTRANSFER_PROFILE_STEPS": "3-4"})
    assert (w.first, w.last) == (3, 4) and profiling.CaptureWindow.from_env({"HPTRANSFER_PROFILE_STEPS": "7"}).last == 7
    for bad in ("4-3", "a-b", "0-2", "3-"):
        with pytest.raises(ValueError, match="HPTRANSFER_PROFILE_STEPS"):
            profiling.CaptureWindow.from_env({"HPTRANSFER_PROFILE_STEPS": bad})
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: calls.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: calls.append("stop"))
    w = profiling.CaptureWindow(3, 4, cuda=True)
    nvtx = []
    for step in range(1, 7):
        w.step_begins(step)
        nvtx.append(profiling.enabled())
        w.step_ends(step)
        calls.append(step)
    assert calls == [1, 2, "start", 3, "stop", 4, 5, 6]  # started before step 3, stopped after step 4
    assert nvtx == [False, False, True, True, False, False]  # NVTX ranges inside the window only
    resumed = profiling.CaptureWindow(3, 4, cuda=True)  # a run resumed at step 4 starts the window there
    calls.clear()
    resumed.step_begins(4)
    resumed.step_ends(4)
    assert calls == ["start", "stop"]


# ----------------------------------------------------------------------------- one process, through the CLI
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from test_train import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth"))


def _config(tmp: Path, data: Path, iterations: int = 4) -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(json.dumps({
        "model": {"width": 0.03125}, "loss": {"vgg_weights": "random", "layers": ["relu1_2"]},
        "data": {"root": str(data), "workers": 0, "flip": False},
        "train": {"impl": "reference", "tensorboard": True, "sample_every": 0, "log_every": 1, "deterministic": True},
        "stages": [{"resolution": 64, "iterations": iterations, "batch_size": 2}]}))
    return path


def test_device_cuda_without_gpu_is_refused_before_anything_is_written(data_root, tmp_path, monkeypatch, capsys):
    from hptransfer.train import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    out = tmp_path / "run"
    assert main(["--config", str(_config(tmp_path, data_root)), "--out", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device cuda (train.device): no usable GPU"), err
    assert not out.exists()


def test_several_processes_without_deepspeed_config_are_refused(data_root, tmp_path, monkeypatch, capsys):
    from hptransfer.train import main

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                 "TORCHELASTIC_RUN_ID": "t"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    assert main(["--config", str(_config(tmp_path, data_root)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun started 2 processes" in err[0] and "--deepspeed_config" in err[0], err
    assert not out.exists()


def test_signal_stops_after_the_step_with_checkpoint_and_resume_is_exact(data_root, tmp_path, monkeypatch, capsys):
    """SIGUSR1 while the stage is set up (as SLURM sends it before a time limit): the first step finishes, a
    checkpoint is written, exit status 75; --resume auto ends bit-exact where an uninterrupted run ends.
    stats.jsonl and TensorBoard hold one line / point per log step, the resumed run's appended."""
    import hptransfer.train as train_module
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hptransfer.config import load_config

    monkeypatch.setenv("HPTRANSFER_NO_BAR", "1")
    cfg_path = _config(tmp_path, data_root)
    terms = []
    full = train_module.train(load_config(cfg_path, [f"train.out_dir={tmp_path / 'full'}"]),
                              callback=lambda info: terms.append(info["terms"]))
    assert full["preempted"] is None and full["global_step"] == 4

    out = tmp_path / "run"
    real_begin, usr1_before = train_module._begin_stage, signal.getsignal(signal.SIGUSR1)

    def begin_then_signal(*a):
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives while the stage is set up: recorded, acted on after step 1
        return real_begin(*a)

    monkeypatch.setattr(train_module, "_begin_stage", begin_then_signal)
    assert train_module.main(["--config", str(cfg_path), "--out", str(out)]) == signals.EXIT_PREEMPTED == 75
    assert "stopped by SIGUSR1 at global step 1" in capsys.readouterr().out
    stopped = ckpt.read_latest(out / "checkpoints")
    meta = ckpt.read_meta(stopped)
    assert stopped.name == "step_00000001" and meta["state"]["step"] == 1 and meta["preempted"] == "SIGUSR1"
    assert not (out / "export").exists()  # the stage did not end
    assert signal.getsignal(signal.SIGUSR1) is usr1_before  # handlers restored after the run
    monkeypatch.setattr(train_module, "_begin_stage", real_begin)
    assert train_module.main(["--config", str(cfg_path), "--out", str(out), "--resume", "auto"]) == 0
    a, b = load_file(str(tmp_path / "full" / "export" / "model.safetensors")), load_file(str(out / "export" /
                                                                                               "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    lines = [json.loads(line) for line in (tmp_path / "full" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(r["ranks"] == 1 for r in lines)
    for r, own in zip(lines, terms):  # one rank: its own values
        assert r["losses"] == pytest.approx({k: v for k, v in own.items() if k != "criterion"}, rel=1e-6)
        assert r["criterion"] == own["criterion"] and r["lr"] == pytest.approx(2e-4) and r["fade_alpha"] == 1.0
        assert r["peak_mem_mib"] is None and r["loss_scale"] is None and r["skipped"] == 0
        assert r["step_ms"] > 0 and 0 <= r["data_wait_ms"] <= r["step_ms"] and r["img_per_s"] > 0
    resumed_lines = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_lines] == [1, 2, 3, 4]  # appended on resume, none twice
    assert [r["losses"] for r in resumed_lines] == [r["losses"] for r in lines]  # bit-exact, as the weights
    events = EventAccumulator(str(tmp_path / "full" / "tb")).Reload()
    for tag in ("loss/total", "train/lr", "perf/step_ms", "perf/data_wait_ms", "train/fade_alpha"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4], tag
    assert [e.value for e in events.Scalars("loss/total")] == pytest.approx([r["losses"]["total"] for r in lines])


# ----------------------------------------------------------------------------- launches
def _port_in(lo: int, hi: int) -> int:
    for _ in range(200):
        port = random.randrange(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_",
                                                                    "MASTER_", "TORCHELASTIC", "GROUP_", "NODE_RANK"))}
    env.update(HPTRANSFER_NO_BAR="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"), **extra)
    return env


def _wait(procs: list, timeout: float = 900) -> list:
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def _ds_config(tmp: Path) -> Path:
    path = tmp / "zero2.json"  # fp32 ZeRO-2: the fastest on a CPU (bf16 / fp16 are covered in test_train_deepspeed)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    return path


@pytest.mark.slow
@pytest.mark.distributed
def test_srun_two_tasks_stats_and_signal(data_root, tmp_path):
    """`srun -n 2` as SLURM starts it: SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS / a compressed node list
    and the job id only, no RANK or MASTER_*: the world forms (MASTER_PORT from the job id), stats.jsonl
    holds the mean of the two ranks' losses, and SIGTERM to rank 1 alone stops both after the same step
    with one checkpoint, from which --resume auto ends bit-exact where the uninterrupted run ends."""
    port = _port_in(launch.SLURM_PORT_BASE, launch.SLURM_PORT_BASE + launch.SLURM_PORT_SPAN)
    job = str(200 * launch.SLURM_PORT_SPAN + port - launch.SLURM_PORT_BASE)  # a job id whose port is free
    result = tmp_path / "result.json"
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "cluster_smoke.py"), "scenarios", "--data", str(data_root),
         "--out", str(tmp_path / "out"), "--result", str(result), "--ds_config", str(_ds_config(tmp_path))],
        cwd=ROOT, env=_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS="2",
                           SLURM_NODELIST="127.0.0.[1-2]", SLURM_JOB_ID=job),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    ran = _wait(procs)
    assert all(rc == 0 for rc, _, _ in ran) and result.is_file(), [e[-3000:] for _, _, e in ran]
    r = json.loads(result.read_text())

    env = r["env"]
    assert [e["RANK"] for e in env] == ["0", "1"] and {e["WORLD_SIZE"] for e in env} == {"2"}
    assert {e["MASTER_ADDR"] for e in env} == {"127.0.0.1"} and {e["MASTER_PORT"] for e in env} == {str(port)}
    assert r["backend"] == "gloo" and r["pg_timeout_s"] == 123  # train.dist_timeout_s reached the process group
    head = (tmp_path / "out" / "full" / "train.log").read_text().split("stage 0:")[0]
    assert "world: 2 rank(s), 2 per node, launcher srun (SLURM job" in head and "communication gloo" in head
    assert "collective timeout 123 s" in head and "[0: cpu, 1: cpu]" in head
    assert "2 OF 2 RANKS TRAIN ON THE CPU" in head  # train.device=auto on CPU ranks, said loudly

    lines = [json.loads(x) for x in (tmp_path / "out" / "full" / "stats.jsonl").read_text().splitlines()]
    own0, own1 = r["terms"]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and all(x["ranks"] == 2 for x in lines)
    differ = 0
    for line, a, b in zip(lines, own0, own1):
        for term, value in line["losses"].items():
            assert value == pytest.approx((a[term] + b[term]) / 2, rel=1e-6, abs=1e-9), (line["step"], term)
            differ += a[term] != b[term]
        assert line["img_per_s"] > 0 and line["data_wait_ms_max"] >= line["data_wait_ms"]
    assert differ > 0  # the ranks' losses differ, so the mean is not rank 0's own
    assert r["full_step"] == 4 and r["full_digest"][0] == r["full_digest"][1]

    first = r["signal_first"]
    assert [f["preempted"] for f in first] == ["SIGTERM", "SIGTERM"]  # rank 0 got no signal, yet knows which
    assert [f["step"] for f in first] == [2, 2] and all(f["stopped"] for f in first)
    assert r["signal_checkpoint"] == "step_00000002" and r["signal_meta"]["state"]["global_step"] == 2
    assert r["signal_meta"]["preempted"] == "SIGTERM"  # a requeue script reads it where a launcher hides status 75
    files = r["signal_files"]
    assert "rng_rank0.pt" in files and "rng_rank1.pt" in files
    assert len([f for f in files if f.startswith("generator/") and "optim_states" in f]) == 2
    resumed = r["resumed"]
    assert [x["step"] for x in resumed] == [4, 4] and not any(x["preempted"] for x in resumed)
    assert resumed[0]["digest"] == resumed[1]["digest"] == r["full_digest"][0]  # bit-exact


def _torchrun(tmp: Path, *args: str, nnodes: int = 1, nproc: int = 2) -> list:
    port = _port_in(20000, 60000)
    torchrun = Path(sys.executable).with_name("torchrun")
    base = [str(torchrun), f"--nnodes={nnodes}", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        base += ["--standalone"]
    else:
        base += ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=hptransfer-test",
                 "--local_addr=127.0.0.1"]
    procs = [subprocess.Popen(base + ["-m", "hptransfer.train", *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(nnodes)]
    return _wait(procs)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_without_deepspeed_config_is_one_line_error(data_root, tmp_path):
    out = tmp_path / "run"
    [(rc, _, err)] = _torchrun(tmp_path, "--config", str(_config(tmp_path, data_root)), "--out", str(out))
    assert rc != 0
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    # each rank that got that far says it in one line (torchrun may end the slower rank before it does)
    assert 1 <= len(ours) <= 2, err[-3000:]
    assert all("torchrun started 2 processes" in line and "--deepspeed_config" in line for line in ours)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_nodes_rendezvous(data_root, tmp_path):
    """torchrun --nnodes 2 (one agent per "node") with a c10d rendezvous forms the world as srun does."""
    out = tmp_path / "run"
    ran = _torchrun(tmp_path, "--config", str(_config(tmp_path, data_root, iterations=1)), "--out", str(out),
                    "--deepspeed_config", str(_ds_config(tmp_path)), nnodes=2, nproc=1)
    assert all(rc == 0 for rc, _, _ in ran), [e[-3000:] for _, _, e in ran]
    head = (out / "train.log").read_text().split("stage 0:")[0]
    assert "world: 2 rank(s), 2 per node, launcher torchrun, communication gloo" in head, head
    files = {f.name for f in (out / "checkpoints" / "step_00000001").iterdir()}
    assert {"rng_rank0.pt", "rng_rank1.pt", "meta.json"} <= files


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_that_does_not_join_fails_the_others_in_bounded_time(data_root, tmp_path):
    """train.dist_timeout_s=3: rank 1 is 12 s late to the first collective (the resume decision's broadcast);
    rank 0 fails with one line naming itself, exit status 1 (not 2: no input of the user's is wrong). Had the
    timeout not reached the process group (torch's default: 30 min), rank 0 would have waited the 12 s and
    trained on."""
    port = _port_in(20000, 60000)
    cmd = [sys.executable, str(ROOT / "tests" / "cluster_smoke.py"), "hang", "--rank", "1", "--seconds", "12",
           "--config", str(_config(tmp_path, data_root)), "--out", str(tmp_path / "run"),
           "--deepspeed_config", str(_ds_config(tmp_path)), "train.dist_timeout_s=3"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    (rc, _, err), _ = _wait(procs, timeout=600)
    assert rc == 1, err[-3000:]
    lines = [line for line in err.splitlines() if "(or the start-up rendezvous) did not complete" in line]
    assert len(lines) == 1 and "rank 0 of 2 on" in lines[0] and "train.dist_timeout_s=3 s" in lines[0], err[-3000:]
    assert "Traceback" not in err
