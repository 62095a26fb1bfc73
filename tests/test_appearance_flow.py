"""The appearance flow network: the sampling layer (identity, translations), the model, its losses,
training through the trainer (task: garment_flow) and its ONNX export."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hptransfer.models import AppearanceFlow
from hptransfer.models.appearance_flow import pixels_to_flow, warp


def _smooth_image(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, size, size, generator=g)
    return F.avg_pool2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), 7, stride=1)  # smooth: gradients reach far


@pytest.mark.parametrize("size", [64, 128])
def test_identity_flow_returns_input_exactly(size):
    x = torch.randn(2, 5, size, size)
    assert torch.equal(warp(x, torch.zeros(2, 2, size, size)), x)


def test_identity_flow_odd_size_is_close():
    x = torch.randn(1, 3, 48, 40)  # not a power of two: pixel centres are not exact binary fractions
    torch.testing.assert_close(warp(x, torch.zeros(1, 2, 48, 40)), x, atol=1e-5, rtol=0)


def test_untrained_network_is_the_identity_warp():
    model = AppearanceFlow(64, levels=3, channels=8)
    g = torch.rand(2, 3, 64, 64) * 2 - 1
    m = (torch.rand(2, 1, 64, 64) > 0.5).float()
    kp = torch.rand(2, 18, 2) * 63
    out = model(g, m, 1 - m, kp, kp)
    assert torch.equal(out["warped"], g) and torch.equal(out["warped_mask"], m)
    assert out["flow"].shape == (2, 2, 64, 64) and len(out["flows"]) == 3


def test_integer_translation_is_exact():
    x = torch.randn(1, 3, 64, 64)
    dy, dx = 3, -5
    flow = pixels_to_flow(torch.tensor([float(dy), float(dx)]).view(1, 2, 1, 1).expand(1, 2, 64, 64), 64, 64)
    out = warp(x, flow)  # out(p) = x(p + d)
    assert torch.equal(out[..., 10:50, 10:50], x[..., 10 + dy:50 + dy, 10 + dx:50 + dx])
    half = warp(x, pixels_to_flow(torch.tensor([0.0, 0.5]).view(1, 2, 1, 1).expand(1, 2, 64, 64), 64, 64))
    torch.testing.assert_close(half[..., :, 5:60], (x[..., :, 5:60] + x[..., :, 6:61]) / 2, atol=1e-6, rtol=0)


def test_known_translation_is_recovered_through_grid_sample():
    """Gradient descent on a constant flow through the sampling layer finds a 2.5 / -1.5 px shift."""
    x = _smooth_image()
    true = pixels_to_flow(torch.tensor([2.5, -1.5]).view(1, 2, 1, 1).expand(1, 2, 64, 64), 64, 64)
    target = warp(x, true)
    d = torch.zeros(1, 2, 1, 1, requires_grad=True)
    opt = torch.optim.Adam([d], lr=0.05)
    for _ in range(300):
        out = warp(x, pixels_to_flow(d.expand(1, 2, 64, 64), 64, 64))
        loss = (out - target)[..., 8:56, 8:56].abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert d.detach().flatten().tolist() == pytest.approx([2.5, -1.5], abs=0.1)


def test_warp_rejects_a_mismatched_flow():
    with pytest.raises(ValueError, match="flow must be"):
        warp(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 4, 4))


def test_losses_reward_the_right_warp():
    from types import SimpleNamespace

    from hptransfer.flow_losses import flow_loss, flow_tv

    x = _smooth_image(1) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20:44, 16:40] = 1
    shift = pixels_to_flow(torch.tensor([0.0, 6.0]).view(1, 2, 1, 1).expand(1, 2, 64, 64), 64, 64)
    target_mask = warp(mask, -shift)
    batch = {"target": warp(x, -shift), "target_mask": target_mask}
    cfg = SimpleNamespace(l1_weight=1.0, perceptual_weight=0.0, mask_weight=1.0, tv_weight=0.1)

    def terms(flow):
        return flow_loss({"warped": warp(x * mask, flow), "warped_mask": warp(mask, flow), "flows": [flow]},
                         batch, None, cfg)

    right, wrong = terms(-shift), terms(torch.zeros_like(shift))
    assert right["mask"] < 0.05 < wrong["mask"] and right["l1"] < wrong["l1"] and right["total"] < wrong["total"]
    assert float(flow_tv([shift])) == pytest.approx(0.0, abs=1e-6)
    assert float(flow_tv([torch.randn(1, 2, 16, 16)])) > 0


def test_grow_keeps_weights_and_runs_at_double_size():
    model = AppearanceFlow(64, levels=4, channels=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.grow()
    assert model.resolution == 128
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    out = model(torch.zeros(1, 3, 128, 128), torch.zeros(1, 1, 128, 128), torch.zeros(1, 1, 128, 128),
                torch.full((1, 18, 2), 60.0), torch.full((1, 18, 2), 60.0))
    assert out["warped"].shape == (1, 3, 128, 128)
    assert AppearanceFlow.from_arch(model.arch()).resolution == 128


def test_flow_onnx_export_matches_onnxruntime(tmp_path, capsys):
    """`hptransfer export --checkpoint FLOW_EXPORT --format onnx` writes the flow network's graph (not the
    generator's), equal to PyTorch in onnxruntime; a format the flow network lacks is refused."""
    ort = pytest.importorskip("onnxruntime")
    from hptransfer.cli import main
    from hptransfer.flow_task import export_flow, load_flow, onnx_max_abs_diff

    torch.manual_seed(0)
    model = AppearanceFlow(64, levels=3, channels=8)
    with torch.no_grad():  # non-zero flow heads, so the warp in the graph is exercised
        for head in model.heads:
            head[-1].weight.normal_(0, 0.01)
    export_flow(model.eval(), tmp_path / "export")
    loaded = load_flow(tmp_path / "export")
    path = tmp_path / "flow.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "export"), "--format", "onnx", "--out", str(path)]) == 0
    assert "onnxruntime vs PyTorch" in capsys.readouterr().out
    outputs = [o.name for o in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()]
    assert outputs == ["warped", "warped_mask", "flow"]
    assert onnx_max_abs_diff(loaded, path) < 1e-4
    assert main(["export", "--checkpoint", str(tmp_path / "export"), "--format", "torchscript", "--out",
                 str(tmp_path / "flow.pt")]) == 2
    assert not (tmp_path / "flow.pt").exists()


def test_flow_color_wheel():
    from hptransfer.flow_task import flow_to_color

    flow = torch.zeros(2, 8, 8)
    flow[0, :, 4:] = 0.5  # right half moves in +x
    pic = flow_to_color(flow)
    assert pic.shape == (8, 8, 3) and pic.dtype == np.uint8
    assert (pic[:, :4] == 255).all() and not (pic[:, 4:] == 255).all()  # still = white
