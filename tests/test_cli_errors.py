"""Every subcommand on a corpus of broken inputs: exit status 2 (``data check``: 1, its "problems
found"), one ``error:`` line naming the file, no traceback, nothing half-written where the command
writes. Then the real entry point: ``--debug`` / HPTRANSFER_DEBUG=1 show the traceback, and a bug
(not a user error) keeps its traceback."""
import errno
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hptransfer.cli import COMMANDS, main
from hptransfer.config import ModelConfig
from hptransfer.data.cli import SUBCOMMANDS as DATA_SUBCOMMANDS
from hptransfer.export import export_generator
from hptransfer.models import Generator

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(ROOT / "configs" / "synth_demo.yaml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from hptransfer.data import synth

    d = tmp_path_factory.mktemp("corpus")
    synth.synthesize(d / "good", identities=3, poses=2, size=64, workers=1)
    torch.manual_seed(0)
    export_generator(Generator(ModelConfig(width=0.0625), 64).eval(), d / "export")
    bad = d / "bad"  # a dataset with one malformed annotation row (row 3)
    shutil.copytree(d / "good", bad)
    lines = (bad / "annotations-train.csv").read_text().splitlines()
    lines[2] = lines[2].split(":")[0] + ": [1, 2]: [3]"
    (bad / "annotations-train.csv").write_text("\n".join(lines) + "\n")
    (d / "notexport").mkdir()
    (d / "bad.json").write_text("{not json")
    (d / "bad.png").write_bytes(b"\x89PNG but not an image")
    (d / "bad.mp4").write_bytes(b"not a video")
    (d / "bad.yaml").write_text("model: {widht: 1}\n")
    (d / "garbage.pth").write_bytes(b"no tensors in here")
    Image.new("RGB", (60, 80), (200, 50, 50)).save(d / "ref.png")
    (d / "pred").mkdir()
    (d / "gt").mkdir()
    (d / "pred" / "a.png").write_bytes(b"broken")
    Image.new("RGB", (64, 64)).save(d / "gt" / "a.png")
    df = d / "df_csv"  # DeepFashion benchmark CSVs with a bad row 2
    df.mkdir()
    (df / "fasion-resize-annotation-train.csv").write_text("name:keypoints_y:keypoints_x\nx.jpg: [1, 2]: [3]\n")
    (df / "fasion-resize-pairs-train.csv").write_text("from,to\n")
    (d / "df_img").mkdir()
    (d / "h36m").mkdir()
    (d / "photos" / "alice").mkdir(parents=True)  # own photos, one folder per person
    Image.new("RGB", (48, 64), (20, 120, 200)).save(d / "photos" / "alice" / "1.png")
    (d / "to_split").mkdir()  # one annotations file and one pairs file, the pairs naming an unknown image
    (d / "to_split" / "annotations.csv").write_text("name:keypoints_y:keypoints_x\n")
    (d / "to_split" / "pairs.csv").write_text("from,to,score\nalice/1.jpg,alice/2.jpg,0.5\n")
    return d


def _cases(d: Path, out: Path):
    """(name, argv, text the error must contain, paths that must not exist afterwards)."""
    cfg = ["--config", DEMO_CONFIG]
    short = ["stages.0.iterations=1", "stages.1.iterations=1"]  # overrides: positional, after the options
    bad_row = str(d / "bad" / "annotations-train.csv") + ": row 3"
    return [
        ("data synth", ["data", "synth", "--out", str(d / "bad.json" / "x"), "--identities", "2", "--poses", "2",
                        "--size", "64", "--workers", "1"], str(d / "bad.json"), []),
        ("data show", ["data", "show", str(d / "bad"), "--out", str(out / "grid.png")], bad_row, [out / "grid.png"]),
        ("data shard", ["data", "shard", str(d / "bad"), str(out / "shards"), "--sizes", "64", "--workers", "1"],
         bad_row, [out / "shards"]),
        ("data deepfashion", ["data", "deepfashion", "--images", str(d / "df_img"), "--annotations", str(d / "df_csv"),
                              "--out", str(out / "df")], str(d / "df_img"), [out / "df"]),
        ("data h36m", ["data", "h36m", "--root", str(d / "h36m"), "--out", str(out / "h36m")], str(d / "h36m"),
         [out / "h36m"]),
        ("data photos", ["data", "photos", "--images", str(d / "photos"), "--keypoints", str(d / "bad.json"),
                         "--out", str(out / "ph")], str(d / "bad.json"), [out / "ph"]),
        ("data split", ["data", "split", str(d / "to_split")], str(d / "to_split" / "pairs.csv") + ": row 2",
         [d / "to_split" / "annotations-train.csv"]),
        ("data video", ["data", "video", "--video", str(d / "bad.mp4"), "--openpose-json", str(d),
                        "--out", str(out / "dv")], str(d / "bad.mp4"), [out / "dv"]),
        ("train bad data", ["train", *cfg, "--out", str(out / "run"), *short, f"data.root={d / 'bad'}"], bad_row,
         [out / "run"]),  # nothing written: the data are read first
        ("train bad config", ["train", "--config", str(d / "bad.yaml"), "--out", str(out / "run2")],
         str(d / "bad.yaml"), [out / "run2"]),
        ("train wrong weights", ["train", *cfg, "--out", str(out / "run3"), *short, f"data.root={d / 'good'}",
                                 f"loss.vgg_weights={d / 'garbage.pth'}"], str(d / "garbage.pth"),
         [out / "run3"]),
        ("train missing weights", ["train", *cfg, "--out", str(out / "run4"), *short, f"data.root={d / 'good'}",
                                   "loss.vgg_weights=null"], "vgg16-397923af.pth", [out / "run4"]),
        ("train resume not a checkpoint", ["train", *cfg, "--out", str(out / "run5"), *short, f"data.root={d / 'good'}",
                                           "--resume", str(d / "notexport")], str(d / "notexport"),
         [out / "run5" / "checkpoints"]),
        ("eval not an export", ["eval", "--checkpoint", str(d / "notexport"), "--data", str(d / "good"),
                                "--out", str(out / "m.json")], str(d / "notexport"), [out / "m.json"]),
        ("eval unreadable image", ["eval", "--pred", str(d / "pred"), "--gt", str(d / "gt"), "--out", str(out / "m.json")],
         str(d / "pred" / "a.png"), [out / "m.json"]),
        ("eval wrong weights", ["eval", "--pred", str(d / "gt"), "--gt", str(d / "gt"), "--metrics", "lpips",
                                "--lpips-weights", str(d / "garbage.pth")], str(d / "garbage.pth"), []),
        ("infer bad pose", ["infer", "--checkpoint", str(d / "export"), "--reference", str(d / "ref.png"),
                            "--pose", str(d / "bad.json"), "--out", str(out / "o.png")], str(d / "bad.json"),
         [out / "o.png"]),
        ("infer bad reference", ["infer", "--checkpoint", str(d / "export"), "--reference", str(d / "bad.png"),
                                 "--pose", str(d / "bad.json"), "--out", str(out / "o.png")], str(d / "bad.png"),
         [out / "o.png"]),
        ("infer not an export", ["infer", "--checkpoint", str(d / "notexport"), "--reference", str(d / "ref.png"),
                                 "--pose", str(d / "bad.json"), "--out", str(out / "o.png")], str(d / "notexport"),
         [out / "o.png"]),
        ("infer missing pose", ["infer", "--checkpoint", str(d / "export"), "--reference", str(d / "ref.png"),
                                "--pose", str(d / "nosuch.json"), "--out", str(out / "o.png")], str(d / "nosuch.json"),
         [out / "o.png"]),
        ("video undecodable", ["video", "--checkpoint", str(d / "export"), "--reference", str(d / "ref.png"),
                               "--poses", str(d / "bad.mp4"), "--out", str(out / "o.mp4")], str(d / "bad.mp4"),
         [out / "o.mp4"]),
        ("export not a checkpoint", ["export", "--checkpoint", str(d / "notexport"), "--format", "safetensors",
                                     "--out", str(out / "ex")], str(d / "notexport"), [out / "ex"]),
        ("model-summary bad resolution", ["model-summary", "--resolution", "100", "--no-forward"], "--resolution", []),
        ("demo bad config", ["demo", "--data", str(d / "good"), "--out", str(out / "demo"), "--config",
                             str(d / "bad.yaml")], str(d / "bad.yaml"), [out / "demo"]),
        ("weights unknown", ["weights", "fetch", "nosuch", "--dir", str(out / "w")], "nosuch", [out / "w"]),
        ("doctor bad device", ["doctor", "--device", "nosuch"], "--device nosuch", []),
        ("compare unreadable image", ["compare", "--gt", str(d / "gt"), "--method", f"a={d / 'pred'}",
                                      "--out", str(out / "c.json")], str(d / "pred" / "a.png"), [out / "c.json"]),
        ("garment not an export", ["garment", "--person", str(d / "ref.png"), "--garment", str(d / "ref.png"),
                                   "--transfer", str(d / "notexport"), "--flow", str(d / "notexport"),
                                   "--out", str(out / "g.png")], str(d / "notexport"), [out / "g.png"]),
        ("ablate bad config", ["ablate", "--base", str(d / "bad.yaml"), "--seeds", "1", "--out", str(out / "abl")],
         str(d / "bad.yaml"), [out / "abl" / "runs"]),
        ("ablate report without a table", ["ablate", "--out", str(out / "abl2"), "--report"], str(out / "abl2"),
         [out / "abl2"]),
        ("garment-study not synthetic", ["garment-study", "--data", str(d / "bad"), "--out", str(out / "gs")],
         str(d / "bad"), [out / "gs"]),
    ]


def _partial_files(folder: Path) -> list:
    """Temp or partial files (atomic writers use hidden '.name.*' temp names; downloads '.part')."""
    if not folder.exists():
        return []
    keep = {".prepare-manifest.json"}
    return [p for p in folder.rglob("*") if p.is_file() and p.name not in keep
            and (p.name.startswith(".") or p.suffix in (".tmp", ".part"))]


def test_every_subcommand_fails_cleanly(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no weights anywhere
    for v in ("HPTRANSFER_VGG16", "HPTRANSFER_ALEXNET", "HPTRANSFER_INCEPTION", "HPTRANSFER_DEBUG"):
        monkeypatch.delenv(v, raising=False)
    present = {n for n, (module, _) in COMMANDS.items() if importlib.util.find_spec(module) is not None}
    cases = [c for c in _cases(corpus, tmp_path / "out") if c[1][0] in present]  # the subcommands this version has
    covered = {argv[0] for _, argv, _, _ in cases}
    assert covered >= present, f"subcommands without a broken-input case: {present - covered}"
    data_covered = {argv[1] for _, argv, _, _ in cases if argv[0] == "data"} | {"check"}  # check: below
    assert data_covered >= set(DATA_SUBCOMMANDS), set(DATA_SUBCOMMANDS) - data_covered
    for name, argv, named, absent in cases:
        rc = main(argv)  # an escaping exception fails the test: that would be a traceback
        cap = capsys.readouterr()
        text = cap.out + cap.err
        assert rc == 2, f"{name}: exit {rc}\n{text}"
        errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, f"{name}: expected one 'error:' line\n{text}"
        assert named in errors[0], f"{name}: {named!r} not named in {errors[0]!r}"
        assert "Traceback" not in text, f"{name}\n{text}"
        for p in absent:
            assert not p.exists(), f"{name}: {p} was written"
    assert _partial_files(tmp_path / "out") == []
    # the data checker reports every problem (exit 1 = problems found) rather than stopping at one
    assert main(["data", "check", str(corpus / "bad")]) == 1
    assert "annotations-train.csv: row 3" in capsys.readouterr().out


def test_full_disk_is_one_line_and_leaves_no_temp_file(corpus, tmp_path, capsys, monkeypatch):
    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    out = tmp_path / "o" / "out.png"
    pose = tmp_path / "pose.csv"
    from hptransfer.data import write_annotations
    write_annotations(pose, {"p.jpg": np.array([[10 + i, 20 + i] for i in range(18)], np.float32)})
    assert main(["infer", "--checkpoint", str(corpus / "export"), "--reference", str(corpus / "ref.png"),
                 "--pose", f"{pose}:p.jpg", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write {out}: No space left on device" in err
    assert list(out.parent.iterdir()) == []
    # the dataset writers' atomic writes: the same message, no temp file
    from hptransfer.data import formats

    class FullDisk:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            no_space()

    monkeypatch.setattr(formats, "os", FullDisk())
    ds = tmp_path / "ds"
    assert main(["data", "synth", "--out", str(ds), "--identities", "2", "--poses", "2", "--size", "64",
                 "--workers", "1"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert _partial_files(ds) == []


def _cli(args, env_extra=None, code=None):
    env = {**os.environ, **(env_extra or {})}
    env.pop("HPTRANSFER_DEBUG", None) if "HPTRANSFER_DEBUG" not in (env_extra or {}) else None
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "hptransfer", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_entry_point_traceback_only_on_request(corpus):
    args = ["infer", "--checkpoint", str(corpus / "export"), "--reference", str(corpus / "ref.png"),
            "--pose", str(corpus / "bad.json"), "--out", str(corpus / "o.png")]
    r = _cli(args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {corpus / 'bad.json'}: cannot read JSON")
    r = _cli(args + ["--debug"])
    assert r.returncode != 0 and "Traceback" in r.stderr and "InputError" in r.stderr
    r = _cli(args, {"HPTRANSFER_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_a_bug_keeps_its_traceback(corpus):
    code = ("import sys, hptransfer.infer as i, hptransfer.cli as c\n"
            "def broken(args):\n    return {}['bug']\n"
            "i.run = broken\n"
            f"sys.exit(c.main(['infer', '--checkpoint', 'x', '--reference', 'y', '--pose', 'z', '--out', 'w']))\n")
    r = _cli(None, code=code)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'bug'" in r.stderr


def test_newcomer_hints(corpus, tmp_path, capsys, caplog, monkeypatch):
    """The one-line errors say what to do: a missing dataset folder, offline weights, a run directory given
    as an export, training without VGG weights; a GPU config on a CPU says what it costs."""
    import logging

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no weights anywhere
    monkeypatch.delenv("HPTRANSFER_VGG16", raising=False)

    def one_error(argv, rc=2):
        assert main(argv) == rc, argv
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
        assert len(err) == 1, err
        return err[0]

    assert one_error(["data", "check", str(tmp_path / "nosuch")]) == f"error: {tmp_path / 'nosuch'}: no such folder"
    single = tmp_path / "single"
    single.mkdir()
    (single / "annotations.csv").write_text("name:keypoints_y:keypoints_x\n")
    assert f"hptransfer data split {single}" in one_error(["data", "check", str(single)])
    # offline: where the file goes by hand, and the mirror option
    line = one_error(["weights", "fetch", "vgg16", "--dir", str(tmp_path / "w"), "--base-url", "http://127.0.0.1:9/"])
    assert "download failed" in line and f"copy it to {tmp_path / 'w' / 'vgg16-397923af.pth'}" in line
    assert "--base-url" in line and "HPTRANSFER_VGG16" in line
    # a run directory where an export is expected: its export/ is used, said in the log
    run = tmp_path / "run"
    shutil.copytree(corpus / "export", run / "export")
    pose = tmp_path / "pose.csv"
    from hptransfer.data import write_annotations
    write_annotations(pose, {"p.jpg": np.array([[8 + 3 * i, 20 + i] for i in range(18)], np.float32)})
    with caplog.at_level(logging.INFO):
        assert main(["infer", "--checkpoint", str(run), "--reference", str(corpus / "ref.png"), "--pose",
                     f"{pose}:p.jpg", "--out", str(tmp_path / "o.png"), "--device", "cpu"]) == 0
    assert any(f"using its export {run / 'export'}" in r.getMessage() for r in caplog.records)
    (run / "checkpoints").mkdir()
    shutil.rmtree(run / "export")
    assert "training run without an export yet" in one_error(
        ["infer", "--checkpoint", str(run), "--reference", str(corpus / "ref.png"), "--pose", f"{pose}:p.jpg",
         "--out", str(tmp_path / "o.png")])
    # no VGG weights: how to train without them here, and what that costs
    line = one_error(["train", "--config", DEMO_CONFIG, f"data.root={corpus / 'good'}", "--out", str(tmp_path / "r4"),
                      "loss.vgg_weights=null", "stages.0.iterations=1"])
    assert "vgg16-397923af.pth" in line and "loss.vgg_weights=random" in line and "NOT perceptual" in line
    # a GPU-oriented config on a CPU: one line naming what it costs (before the data error stops it here)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        one_error(["train", "--config", str(ROOT / "configs" / "own_data_gpu.yaml"), f"data.root={tmp_path / 'none'}",
                   "--out", str(tmp_path / "r5")])
    costs = [r.getMessage() for r in caplog.records if "GPU-oriented settings on a CPU" in r.getMessage()]
    assert len(costs) == 1 and "\n" not in costs[0]
    assert "train.precision=bf16" in costs[0] and "data.workers=8" in costs[0] and "days" in costs[0]


def test_overrides_may_come_between_options():
    from hptransfer.cli import build_parser, parse_args_with_overrides

    argv = ["train", "--config", "a.yaml", "data.root=x", "--out", "y", "train.lr=1e-4", "--overwrite"]
    args = parse_args_with_overrides(build_parser("train"), argv)
    assert args.overrides == ["data.root=x", "train.lr=1e-4"] and args.out == "y" and args.overwrite
    with pytest.raises(SystemExit):  # anything else still unknown is argparse's error
        parse_args_with_overrides(build_parser("train"), argv + ["--nope"])


def test_garment_help_says_what_a_real_photo_needs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["garment", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Needs a trained flow network and parsing maps from an outside parser" in text
    for needed in ("SCHP", "CIHP_PGN", "--parsing-numbering cihp", "configs/garment_flow.yaml",
                   "a neck, a shoulder and a hip", "docs/own-data.md"):
        assert needed in text, needed
