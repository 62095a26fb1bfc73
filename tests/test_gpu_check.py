"""bench/gpu_check.sh --dry-run: every step of the GPU validation at toy size on the CPU, within its limits
(at most 8 files in OUTDIR; every JSON with the environment and backend status; each step's numbers in the
report), and a budget that runs out: the running step ended, the later ones reported, PARTIAL."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = ("install", "pytest", "sync_check", "train", "deepspeed", "compile", "fp16", "profile", "kernels",
         "local_loss", "dali")


def _run(out: Path, timeout: int, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), "--dry-run"], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=timeout)


def _steps(summary: str) -> dict:
    """{step: result} from summary.txt's table."""
    rows = (re.match(r"(\S+)\s+(NOT RUN|\S+)\s+\d+ s", line) for line in summary.splitlines())
    return {m[1]: m[2] for m in rows if m and m[1] in STEPS}


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check"
    proc = _run(out, timeout=1500)
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + log[-6000:]
    summary = (out / "summary.txt").read_text()
    assert _steps(summary) == {s: "PASS" for s in STEPS}, summary  # dali too: nvidia.dali is pinned
    assert summary.splitlines()[-1] == "ALL PASSED"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files  # what the device tool brings back
    assert {"summary.txt", "log.txt", "gpu_check-cpu.json", "kernels-cpu.json", "local_loss-cpu.json",
            "train-cpu.json", "profile-cpu-64.txt", "profile-cpu-64.trace.json.gz"} == set(files), files
    for name in ("kernels-cpu.json", "local_loss-cpu.json", "train-cpu.json"):
        doc = json.loads((out / name).read_text())
        assert doc["cpu"]["flags"] and doc["cpu"]["torch_capability"], name
        assert doc["backend_status"]["plan"]["device"] == "cpu", name
    train = json.loads((out / "train-cpu.json").read_text())
    assert train["complete"] and set(train["results"][0]["modes"]) == {"fast", "naive"}
    assert train["results"][0]["max_batch"]["plain"] == 2  # the CPU search runs up to its limit of 2
    assert "environment: {" in (out / "profile-cpu-64.txt").read_text()

    report = json.loads((out / "gpu_check-cpu.json").read_text())
    assert report["dry_run"] and set(report["steps"]) == set(STEPS)
    data = {name: step.get("data") for name, step in report["steps"].items()}
    assert data["install"]["backend_status"]["extension"] == "loaded"
    sync = data["sync_check"]["results"]  # the local loss's crop path and the discriminators' path, no host read
    assert [(r["resolution"], r["terms"], r["result"]) for r in sync] == [
        (64, {"local": True, "adv": False}, "pass"), (128, {"local": False, "adv": True}, "pass")]
    ds = data["deepspeed"]
    assert ds["resume_vs_full"] == 0.0 and ds["steps"] == {"full": 4, "stopped_at": 3, "resumed_to": 4} and ds["finite"]
    compiled = data["compile"]["results"][0]
    assert set(compiled["modes"]) == {"fast", "fast_compiled"} and compiled["speedup_compile"] > 0
    check = data["fp16"]["results"][0]["grad_check"]
    assert check["ok"] and check["global_grad_finite"] and check["global_grad_nonzero"] > 0
    loaders = data["dali"]["results"][0]["loaders"]
    dali = [k for k in loaders if k.startswith("shards dali-cpu")]
    assert dali and loaders[dali[0]]["images_per_s"] > 0, sorted(loaders)


@pytest.mark.slow
def test_gpu_check_budget_cut_is_partial(tmp_path):
    """A budget that runs out during a step: that step is ended and reported CUT, every later one NOT RUN,
    the verdict PARTIAL (not FAILED) with the files written so far, exit status 3."""
    # The train step hangs (its interpreter is a wrapper that sleeps), so the 60-s budget ends it on any
    # machine: a budget sized against real step times passed or failed with the CPU's speed.
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\ncase \" $* \" in *bench_train.py*) exec sleep 900;; esac\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    proc = _run(out, timeout=300, PYTHON=str(wrapper), GPU_CHECK_BUDGET_S="60",
                GPU_CHECK_STEPS="sync_check train deepspeed")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = _steps(summary)
    assert steps["install"] == steps["pytest"] == "SKIP", summary  # not selected
    assert [steps[s] for s in ("sync_check", "train", "deepspeed")] == ["PASS", "CUT", "NOT RUN"], summary
    assert all(steps[s] == "SKIP" for s in STEPS[STEPS.index("deepspeed") + 1:]), summary
    last = summary.splitlines()[-1]
    assert last.startswith("PARTIAL:") and "ran out at train" in last and "gpu_check-cpu.json" in last, last
    report = json.loads((out / "gpu_check-cpu.json").read_text())
    assert report["steps"]["train"]["result"] == "CUT" and report["steps"]["sync_check"]["result"] == "PASS"


def test_gpu_check_refuses_a_machine_without_gpu(tmp_path):
    """Without --dry-run and without a visible GPU the check stops at once instead of timing the CPU."""
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no CUDA device" in proc.stdout, proc.stdout + proc.stderr
