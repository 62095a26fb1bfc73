"""The `make demo` path end to end at toy size: synthesize, train 64 -> 128, evaluate against the
copy-the-reference baseline, export."""
import json

import pytest

from hptransfer.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    rc = main(["demo", "--data", str(data), "--out", str(out), "--identities", "5", "--poses", "3", "--size", "64",
               "stages.0.iterations=2", "stages.1.iterations=2", "stages.0.batch_size=2", "stages.1.batch_size=2"])
    assert rc == 0
    metrics = json.loads((out / "demo_metrics.json").read_text())
    for who in ("model", "copy_reference"):
        assert 0.0 < metrics[f"{who}/ssim_gaussian"] <= 1.0
        assert 0.0 < metrics[f"{who}/local_ssim"] <= 1.0
    # pose following from the body masks: copying the reference errs equally on vacated and new-body
    # pixels (the pairs come in both orders); the model's errors are finite image-range L1s
    copy = metrics["copy_reference/vacated_l1"], metrics["copy_reference/new_body_l1"]
    assert copy[0] > 0.05 and copy[0] == pytest.approx(copy[1])
    assert 0.0 < metrics["model/vacated_l1"] < 1.0 and 0.0 < metrics["model/new_body_l1"] < 1.0
    # the model and the baseline are scored on different images, so their SSIMs differ
    assert metrics["model/ssim_gaussian"] != metrics["copy_reference/ssim_gaussian"]
    assert (out / "export" / "model.safetensors").is_file() and (out / "export" / "config.json").is_file()
    assert sorted(p.name for p in (out / "samples").glob("stage128_*.png"))
    printed = capsys.readouterr().out
    assert "export:" in printed and "sample grids" in printed
    # `make demo` twice: the rerun resumes the finished run (no retraining, no refusal) and scores again
    argv = ["demo", "--data", str(data), "--out", str(out), "--identities", "5", "--poses", "3", "--size", "64",
            "stages.0.iterations=2", "stages.1.iterations=2", "stages.0.batch_size=2", "stages.1.batch_size=2"]
    assert main(argv) == 0
    assert "resuming from the latest" in capsys.readouterr().out
    assert json.loads((out / "demo_metrics.json").read_text())["model/ssim_gaussian"] == metrics["model/ssim_gaussian"]


def test_a_preempted_training_ends_the_demo_with_the_preemption_status(monkeypatch):
    """SIGTERM during `make demo`'s training: the demo must not go on to evaluate an unfinished export."""
    import pytest

    import hptransfer.train
    from hptransfer import demo
    from hptransfer.distributed.signals import EXIT_PREEMPTED

    monkeypatch.setattr(hptransfer.train, "train", lambda cfg, **kw: {"preempted": "SIGTERM", "export": None})
    with pytest.raises(SystemExit) as stop:
        demo._train(object(), resume="auto")
    assert stop.value.code == EXIT_PREEMPTED
    monkeypatch.setattr(hptransfer.train, "train", lambda cfg, **kw: {"preempted": None, "export": "x"})
    assert demo._train(object())["export"] == "x"
