"""Export round trips: safetensors (atomic overwrite), ONNX vs PyTorch, TorchScript via torch.jit.load."""
import json
import warnings

import pytest
import torch

from hptransfer import export as ex
from hptransfer.models import Generator


@pytest.fixture
def gen(tiny_cfg):
    torch.manual_seed(0)
    g = Generator(tiny_cfg, 64)
    # non-trivial BN buffers so a loader that drops them shows up
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return g.eval()


def test_safetensors_round_trip(gen, tmp_path):
    out = ex.export_generator(gen, tmp_path / "export", extra={"step": 7})
    meta = json.loads((out / "config.json").read_text())
    assert meta["resolution"] == 64 and meta["extra"] == {"step": 7} and meta["image_range"] == [-1, 1]
    assert "openpose18" in meta["keypoints"]
    loaded = ex.load_generator(out)
    assert not loaded.training
    ref, kp = ex.example_inputs(64, 2)
    torch.testing.assert_close(ex.generate(loaded, ref, kp, "reference"), ex.generate(gen, ref, kp, "reference"),
                               rtol=0, atol=0)


def test_atomic_overwrite_keeps_old_export_on_failure(gen, tmp_path, monkeypatch):
    out = ex.export_generator(gen, tmp_path / "export", extra={"version": "old"})
    before = (out / "model.safetensors").read_bytes()

    def broken_arch():
        raise RuntimeError("simulated failure while writing")
    monkeypatch.setattr(gen, "arch", broken_arch)
    with pytest.raises(RuntimeError, match="simulated"):
        ex.export_generator(gen, out, extra={"version": "new"})
    assert json.loads((out / "config.json").read_text())["extra"] == {"version": "old"}
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dirs left behind
    monkeypatch.undo()
    ex.export_generator(gen, out, extra={"version": "new"})
    assert json.loads((out / "config.json").read_text())["extra"] == {"version": "new"}


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ex.load_generator(tmp_path)


def test_format_version_is_checked_on_load(gen, tmp_path):
    from hptransfer.checkpoint import FORMAT_VERSION
    from hptransfer.errors import CheckpointError

    out = ex.export_generator(gen, tmp_path / "export")
    meta = json.loads((out / "config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    for version, match in ((FORMAT_VERSION + 1, f"export format {FORMAT_VERSION + 1}, written by hptransfer .*upgrade "
                                                 "hptransfer"),
                           (None, "format_version None is not an export format.*export again from the run's "
                                  "checkpoint"),
                           ("1", "format_version '1' is not an export format")):
        broken = dict(meta, format_version=version) if version is not None else \
            {k: v for k, v in meta.items() if k != "format_version"}
        (out / "config.json").write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=match) as e:
            ex.load_generator(out)
        assert str(out / "config.json") in str(e.value)


def test_onnx_matches_torch(gen, tmp_path):
    pytest.importorskip("onnxruntime")
    path = ex.export_onnx(gen, tmp_path / "g.onnx")
    assert gen.training is False  # exporting must not flip BatchNorm into train mode
    # fp32 conv graphs in two runtimes: ~1e-6 observed; 1e-4 leaves room for other CPUs' kernels
    assert ex.onnx_max_abs_diff(gen, path, batch=2) < 1e-4


def test_torchscript_round_trip(gen, tmp_path):
    path = ex.export_torchscript(gen, tmp_path / "g.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = torch.jit.load(str(path))
    ref, kp = ex.example_inputs(64, 3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(m(ref, kp), ex.generate(gen, ref, kp, "reference"), rtol=1e-5, atol=1e-5)


def test_cli_export_formats(gen, tmp_path, capsys):
    from hptransfer.cli import main
    src = ex.export_generator(gen, tmp_path / "export")
    assert main(["export", "--checkpoint", str(src), "--format", "torchscript", "--out", str(tmp_path / "g.pt")]) == 0
    assert main(["export", "--checkpoint", str(src), "--format", "safetensors", "--out", str(tmp_path / "copy")]) == 0
    assert ex.load_generator(tmp_path / "copy").resolution == 64
    assert main(["export", "--checkpoint", str(src), "--format", "onnx", "--resolution", "128",
                 "--out", str(tmp_path / "g.onnx")]) == 2


def test_export_from_training_checkpoint(gen, tmp_path):
    """A single-process training checkpoint (meta.json + generator.pt) exports to the same generator."""
    from hptransfer import checkpoint as ckpt
    root = tmp_path / "run" / "checkpoints"
    tmp = ckpt.begin(root, 5, True)
    ckpt.atomic_torch_save({"model": gen.state_dict(), "optimizer": {}, "scaler": {}}, tmp / "generator.pt")
    ckpt.finish(root, tmp, {"arch": gen.arch(), "state": {"global_step": 5}}, keep=2, is_main=True)
    loaded = ex.load_any(root)  # the root: follows 'latest'
    ref, kp = ex.example_inputs(64, 2)
    torch.testing.assert_close(ex.generate(loaded, ref, kp, "reference"), ex.generate(gen, ref, kp, "reference"))
    assert torch.equal(ex.load_any(tmp_path / "run").state_dict()["to_rgb.64.conv.weight"],
                       loaded.state_dict()["to_rgb.64.conv.weight"])  # a run directory: its checkpoints/
    with pytest.raises(FileNotFoundError, match="neither an export"):
        ex.load_any(tmp_path)


def _snapshot(g):
    return g.training, g.impl, {k: v.clone() for k, v in g.state_dict().items()}


def _assert_unchanged(g, snap):
    training, impl, state = snap
    assert (g.training, g.impl) == (training, impl), "the generator's mode or impl changed"
    for k, v in g.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"


def test_generate_and_exports_leave_the_generator_as_given(gen, tmp_path):
    """generate() and the exporters borrow the generator: its mode, impl, BatchNorm running
    statistics (a train-mode forward updates them) and device stay as they were."""
    gen.train()
    gen.impl = "fast"  # a trainer's setting; generate(impl="reference") must not overwrite it
    snap = _snapshot(gen)
    ref, kp = ex.example_inputs(64, 2)
    out = ex.generate(gen, ref, kp, "reference")
    _assert_unchanged(gen, snap)
    gen.eval()
    gen.impl = "reference"
    with torch.no_grad():
        torch.testing.assert_close(out, gen(ref, kp), rtol=0, atol=0)  # generate() is the eval-mode forward
    gen.train()
    gen.impl = "fast"
    ex.export_torchscript(gen, tmp_path / "g.pt")
    _assert_unchanged(gen, snap)
    path = ex.export_onnx(gen, tmp_path / "g.onnx")
    ex.onnx_max_abs_diff(gen, path)
    _assert_unchanged(gen, snap)


def test_export_of_a_fading_checkpoint_needs_the_fade_to_have_ended(tiny_cfg, tmp_path):
    """A checkpoint holding the fade's modules exports only when its meta records alpha 1."""
    from hptransfer import checkpoint as ckpt
    from hptransfer.errors import CheckpointError

    g = Generator(tiny_cfg, 64)
    g.grow(input_fade=True)
    for step, alpha in ((1, None), (2, 0.5), (3, 1.0)):
        root = tmp_path / f"ckpt{step}"
        tmp = ckpt.begin(root, step, True)
        ckpt.atomic_torch_save({"model": g.state_dict()}, tmp / "generator.pt")
        meta = {"arch": g.arch(), "state": {"global_step": step}}
        if alpha is not None:
            meta["fade_alpha"] = alpha
        ckpt.finish(root, tmp, meta, keep=1, is_main=True)
    with pytest.raises(CheckpointError, match="did not record the fade's alpha"):
        ex.load_any(tmp_path / "ckpt1")
    with pytest.raises(CheckpointError, match=r"inside the input fade \(alpha 0.5\)"):
        ex.load_any(tmp_path / "ckpt2")
    loaded = ex.load_any(tmp_path / "ckpt3")
    assert not loaded.fading and set(loaded.state_dict()) == set(g.inference_state_dict())
