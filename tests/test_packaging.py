"""Packaging as a cluster user meets it: the metadata declares what pip installs, the sdist is complete
and builds against the torch already installed, and an isolated build says how to build instead of
compiling against a torch it fetched itself."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _setup_constant(name: str):
    for node in ast.parse((REPO / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


def _pins(*files: str) -> dict:
    """name -> pinned version of requirements files (lines 'name==version[+local]')."""
    pins = {}
    for f in files:
        for line in (REPO / f).read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line and not line.startswith("-"):
                name, version = line.split("==")
                pins[name.strip().lower()] = version.strip()
    return pins


def test_installed_metadata_declares_the_dependencies_and_they_are_met():
    """`pip show hptransfer` lists the dependencies, and the environment `make setup` built meets every
    one of them (the ranges' newest end is the pinned stack)."""
    declared = [Requirement(r) for r in metadata.requires("hptransfer") or []]
    core = {r.name.lower() for r in declared if r.marker is None}
    for name in ("torch", "numpy", "safetensors", "pyyaml", "tqdm", "pillow", "imageio"):
        assert name in core, f"{name} is not an install requirement of hptransfer: {sorted(core)}"
    extras = {str(m) for r in declared if r.marker is not None for m in [r.marker]}
    for extra in ("deepspeed", "dali", "dali-cuda12", "onnx", "video", "pose", "test"):
        assert any(f'extra == "{extra}"' in m for m in extras), f"no extra {extra!r} in {sorted(extras)}"
    unmet = []
    for r in declared:
        if r.marker is not None:
            continue
        installed = metadata.version(r.name)
        if not r.specifier.contains(installed, prereleases=True):
            unmet.append(f"{r} (installed {installed})")
    assert not unmet, f"the environment does not meet hptransfer's own requirements: {unmet}"


def test_pinned_stack_lies_inside_the_declared_ranges():
    """requirements*.txt (what make setup installs and CI tests) must be a point inside setup.py's ranges,
    else the ranges claim something never tested."""
    pins = _pins("requirements.txt", "requirements-cuda13.txt", "requirements-test.txt")
    ranges = [Requirement(r) for r in _setup_constant("INSTALL_REQUIRES")]
    for extra_reqs in _setup_constant("EXTRAS_REQUIRE").values():
        ranges += [Requirement(r) for r in extra_reqs]
    checked = 0
    for r in ranges:
        pinned = pins.get(r.name.lower())
        if pinned is None:
            continue
        checked += 1
        assert r.specifier.contains(pinned.split("+")[0], prereleases=True), f"pinned {r.name}=={pinned} is outside {r}"
    assert checked >= 12, f"only {checked} declared requirements have a pin to check against"


def test_build_requirements_hold_no_torch():
    """An isolated build must not fetch its own torch (it would compile _C against that one)."""
    text = (REPO / "pyproject.toml").read_text()
    requires = re.search(r"requires\s*=\s*\[([^\]]*)\]", text).group(1)
    assert "torch" not in requires, requires


def test_makefile_targets_cuda_12_and_refuses_other_majors():
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA", "TORCH_INDEX_URL")}
    run = lambda *a: subprocess.run(["make", "-n", *a], cwd=REPO, env=env, capture_output=True, text=True,  # noqa: E731
                                    timeout=60)
    # -B: every recipe is printed as if the venv did not exist (-n runs none of them)
    cu12 = run("-B", "/nonexistent-venv/.deps", "CUDA=12", "VENV=/nonexistent-venv")
    assert "-r requirements-cuda12.txt" in cu12.stdout and "--extra-index-url https://download.pytorch.org/whl/cu" \
        in cu12.stdout, cu12.stdout + cu12.stderr
    cu13 = run("-B", "/nonexistent-venv/.deps", "VENV=/nonexistent-venv")
    assert "-r requirements-cuda13.txt" in cu13.stdout and "--extra-index-url" not in cu13.stdout, cu13.stdout
    bad = run("help", "CUDA=11")
    assert bad.returncode != 0 and "CUDA=11" in bad.stderr, bad.stderr
    assert "nvidia-dali-cuda120" in (REPO / "requirements-cuda12.txt").read_text()
    assert "nvidia-dali-cuda130" in (REPO / "requirements-cuda13.txt").read_text()


def test_make_demo_and_make_test_set_up_then_run_their_command():
    """The README's `make demo` / `make test` (and docs/garment.md's `make demo-garment`): each builds the
    venv and the editable install first, then runs one command; `make test` adds the test tools and
    MediaPipe (--no-deps) and runs Triton in its interpreter on a machine without a GPU. The demo commands
    are what tests/test_demo.py and tests/test_garment.py run at toy size, and they parse."""
    import shlex

    from hptransfer import cli

    # under `make test` the suite inherits the outer make's MAKELEVEL/MAKEFLAGS: a nested make would print
    # "make[1]: Entering directory" lines and take the outer flags
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA", "VENV", "DEMO_DIR", "DEMO_DATA", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    venv = "/nonexistent-venv"

    def recipe(target: str) -> list:  # -B: every recipe printed as if the venv did not exist; -n: none run
        run = subprocess.run(["make", "--no-print-directory", "-n", "-B", target, f"VENV={venv}"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return run.stdout.splitlines()

    editable = f"{venv}/bin/python -m pip install --no-build-isolation --no-deps -e ."
    for target, argv in (("demo", ["demo", "--data", "data/synth_demo", "--out", "runs/synth_demo"]),
                         ("demo-garment", ["demo", "--garment", "--data", "data/synth_demo", "--out", "runs/synth_demo",
                                           "--garment-out", "runs/garment_demo"])):
        lines = recipe(target)
        assert editable in lines and lines[-1] == shlex.join([f"{venv}/bin/hptransfer", *argv]), lines
        assert not any("requirements-test.txt" in line for line in lines), lines  # no test tools for a demo
        cli.parse_args_with_overrides(cli.build_parser("demo"), argv)  # exits on an option demo lacks
    lines = recipe("test")
    gpu = shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    assert lines[-1] == ("" if gpu else "TRITON_INTERPRET=1 ") + f"{venv}/bin/python -m pytest tests -q --timeout=1500"
    order = [next(i for i, line in enumerate(lines) if needle in line) for needle in
             (editable, "-r requirements-test.txt", "--no-deps -r requirements-mediapipe.txt", "-m pytest tests")]
    assert order == sorted(order), lines


def _without_nvcc_env() -> dict:
    """The environment of a CPU-only build: no nvcc on PATH, CUDA_HOME pointing nowhere."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and not os.path.exists(os.path.join(p, "nvcc")))
    return dict(os.environ, PATH=path, CUDA_HOME=os.devnull + "-no-cuda", PIP_DISABLE_PIP_VERSION_CHECK="1")


@pytest.mark.slow
def test_sdist_is_complete_and_builds_against_the_installed_torch(tmp_path):
    """python -m build --sdist, then `pip install --no-build-isolation --no-deps --target` of that sdist
    (the venv's torch compiles it; CPU part only, the CUDA part's sources are checked to be in it), then
    hptransfer._C and hptransfer.kernels import from the target directory."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=600)
    (sdist,) = dist.glob("hptransfer-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {str(p.relative_to(REPO)) for pattern in ("csrc/*", "kernels/*.py", "configs/*.yaml", "configs/ds/*.json")
              for p in REPO.glob(pattern)}
    for source in REPO.glob("csrc/*.c*"):  # every local header a source includes, the .cu files too
        needed |= {f"csrc/{h}" for h in re.findall(r'#include "([^"]+)"', source.read_text())}
    missing = sorted(needed - names)
    assert not missing, f"the sdist lacks {missing}"

    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                            "--target", str(target), str(sdist)], env=_without_nvcc_env(), capture_output=True,
                           text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    probe = ("import hptransfer, hptransfer._C, hptransfer.kernels, torch; "
             "assert hasattr(torch.ops.hptransfer, 'perceptual_distance'); "
             "print(hptransfer.__file__); print(hptransfer._C.__file__); print(hptransfer.kernels.__file__)")
    # outside the checkout (its source tree must not answer the import); PYTHONPATH comes before the
    # editable install's finder, so every file below must come from the target directory
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(target)))
    assert out.returncode == 0, out.stderr[-3000:]
    files = out.stdout.split()
    assert all(Path(f).resolve().is_relative_to(target.resolve()) for f in files), files


def test_isolated_build_says_how_to_build(tmp_path):
    """Without torch in the build environment, setup.py stops with the one-paragraph instruction
    (metadata and sdists still work without torch: the test above builds one in isolation's place)."""
    script = ("import runpy, sys, importlib.util\n"
              "real = importlib.util.find_spec\n"
              "importlib.util.find_spec = lambda name, *a: None if name == 'torch' else real(name, *a)\n"
              "sys.argv = ['setup.py', 'build_ext']\n"
              "runpy.run_path('setup.py', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, HPTRANSFER_NO_EXT="0"))
    assert out.returncode != 0
    assert "--no-build-isolation" in out.stderr and "HPTRANSFER_NO_EXT=1" in out.stderr, out.stderr[-2000:]
    meta = subprocess.run([sys.executable, "-c", script.replace("'build_ext'", "'--version'")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert meta.returncode == 0 and meta.stdout.strip().splitlines()[-1] == metadata.version("hptransfer"), \
        meta.stdout + meta.stderr


def test_every_pinned_runtime_package_is_imported():
    """Each pinned runtime package is imported somewhere (nvtx was pinned and never imported)."""
    import_names = {"pyyaml": "yaml", "pillow": "PIL", "imageio-ffmpeg": "imageio_ffmpeg", "onnxruntime": "onnxruntime",
                    "scipy": "scipy", "ninja": None, "build": None, "tensorboard": "torch.utils.tensorboard",
                    "onnx": "torch.onnx"}  # torch.onnx.export needs the onnx package
    sources = "\n".join(p.read_text() for p in list(REPO.glob("hptransfer/**/*.py")) + list(REPO.glob("kernels/*.py"))
                        + list(REPO.glob("bench/*.py")) + list(REPO.glob("tests/*.py")) + [REPO / "setup.py"])
    for name in _pins("requirements.txt"):
        module = import_names.get(name, name.replace("-", "_"))
        if module is None:  # build tools: used by setup.py / make, not imported
            continue
        assert re.search(rf"^\s*(import|from) {re.escape(module)}\b", sources, re.M) or f"{module}." in sources, \
            f"requirements.txt pins {name}, which no module imports"
    assert shutil.which("make"), "make is needed by the README's commands"


def test_doctor_names_the_dali_build_for_torchs_cuda(monkeypatch):
    """A DALI build for another CUDA major than torch's is the mismatch `hptransfer doctor` reports,
    with the extra to install instead."""
    from hptransfer import doctor

    present = {"nvidia-dali-cuda130": "2.4.0"}

    def version(name):
        if name in present:
            return present[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    assert doctor.dali_build("13.0")["ok"]
    wrong = doctor.dali_build("12.8")
    assert not wrong["ok"] and "nvidia-dali-cuda120" in wrong["hint"] and "hptransfer[dali-cuda12]" in wrong["hint"]
    present.clear()
    assert doctor.dali_build("12.8")["ok"]  # none installed: nothing to mismatch
    present.update({"nvidia-dali-cuda130": "2.4.0", "nvidia-dali-cuda120": "2.4.0"})
    assert not doctor.dali_build("13.0")["ok"]  # both: the import picks one at random


def test_shard_writing_names_its_missing_dependencies(tmp_path, monkeypatch):
    """Without DALI's wds2idx (a CPU box without the dali extra) `data shard` stops with the extra to
    install, before it writes anything."""
    import importlib.util

    from hptransfer.data.shard_writer import ShardOptions, ShardSink
    from hptransfer.errors import MissingDependency

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wds2idx" else real(name, *a))
    with pytest.raises(MissingDependency, match=r"hptransfer\[shards\]"):
        ShardSink(tmp_path / "out", {}, ShardOptions())
    assert not (tmp_path / "out").exists()
