"""bench/gpu_check.sh --dry-run: every step of the GPU validation at toy size on the CPU, within its
limits (at most 8 files in OUTDIR; every JSON with the environment and backend status)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = ("install", "pytest", "sync_check", "compile", "kernels", "local_loss", "profile", "train")


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + log[-6000:]
    summary = (out / "summary.txt").read_text()
    for step in STEPS:
        assert any(line.split()[:2] == [step, "PASS"] for line in summary.splitlines()), (step, summary)
    assert "ALL PASSED" in summary
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files  # what the device tool brings back
    assert {"summary.txt", "log.txt", "sync_check-cpu.json", "kernels-cpu.json", "local_loss-cpu.json",
            "train-cpu.json", "profile-cpu-64.txt", "profile-cpu-64.trace.json.gz"} == set(files), files
    for name in files:
        if name.endswith(".json"):
            doc = json.loads((out / name).read_text())
            assert doc["cpu"]["flags"] and doc["cpu"]["torch_capability"], name
            assert doc["backend_status"]["plan"]["device"] == "cpu", name
    train = json.loads((out / "train-cpu.json").read_text())
    assert train["complete"] and set(train["results"][0]["modes"]) == {"fast", "naive"}
    assert train["results"][0]["max_batch"]["plain"] == 2  # the CPU search runs up to its limit of 2
    assert "environment: {" in (out / "profile-cpu-64.txt").read_text()


def test_gpu_check_refuses_a_machine_without_gpu(tmp_path):
    """Without --dry-run and without a visible GPU the check stops at once instead of timing the CPU."""
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no CUDA device" in proc.stdout, proc.stdout + proc.stderr


def test_gpu_check_spent_budget_fails_and_names_the_steps(tmp_path):
    """A budget too small for any step: nothing runs, every step is reported, and the check fails."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_BUDGET_S="1")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path), "--dry-run"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text()
    for step in STEPS:
        assert any(line.split()[:2] == [step, "SKIP"] for line in summary.splitlines()), (step, summary)
    assert "FAILED" in summary and sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "summary.txt"]
