"""Metrics against independent implementations: scikit-image SSIM (both protocols), pytorch-msssim."""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from hptransfer import metrics
from hptransfer.pose import local_descriptors
from hptransfer.ops.gather_crops import crop_origins

SKIMAGE_ARGS = {
    "gaussian": dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False),
    "uniform51": dict(win_size=51),
}


def _pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    noise = torch.randint(-40, 41, shape, generator=g)
    b = (a.int() + noise).clamp(0, 255).to(torch.uint8)  # correlated, so SSIM is far from 0
    return a, b


def _sk(a, b, protocol):
    return structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(), data_range=255,
                                 channel_axis=-1, **SKIMAGE_ARGS[protocol])


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 72, 53)])
def test_ssim_equals_skimage(protocol, shape):
    a, b = _pair(shape, 0)
    got = metrics.ssim(a, b, protocol)
    want = [_sk(a[i], b[i], protocol) for i in range(shape[0])]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4, rtol=0)  # float64 both sides: ~1e-12 seen


def test_ssim_pred_data_range_matches_patn_script():
    """PATN / GFLA "ssim_256": gaussian protocol with data_range = pred.max() - pred.min()."""
    a, b = _pair((2, 3, 64, 64), 6)
    b[0] = b[0] // 2 + 40  # a prediction with a smaller range than 255
    got = metrics.ssim(b, a, "gaussian", data_range="pred")
    for i in range(2):
        p, g = b[i].permute(1, 2, 0).numpy().astype(np.float64), a[i].permute(1, 2, 0).numpy().astype(np.float64)
        want = structural_similarity(g, p, channel_axis=-1, data_range=p.max() - p.min(), **SKIMAGE_ARGS["gaussian"])
        assert abs(float(got[i]) - want) < 1e-4
    assert abs(float(got[0]) - float(metrics.ssim(b, a)[0])) > 1e-3  # the range matters


def test_ssim_crop_and_float_input():
    a, b = _pair((1, 3, 64, 64), 1)
    got = metrics.ssim(a, b, "gaussian", crop=(10, 50))
    assert abs(float(got[0]) - _sk(a[0, :, :, 10:50], b[0, :, :, 10:50], "gaussian")) < 1e-4
    # float [-1, 1] input is quantised to the same uint8 values
    af = a.float() / 127.5 - 1
    assert abs(float(metrics.ssim(af, b)[0]) - float(metrics.ssim(a, b)[0])) < 1e-12


def test_identical_gives_one():
    a, _ = _pair((2, 3, 64, 64), 2)
    for p in metrics.PROTOCOLS:
        torch.testing.assert_close(metrics.ssim(a, a, p), torch.ones(2, dtype=torch.float64))


def test_ms_ssim_matches_pytorch_msssim():
    pm = pytest.importorskip("pytorch_msssim")
    a, b = _pair((2, 3, 176, 180), 3)
    got = metrics.ms_ssim(a, b)
    want = pm.ms_ssim(a.double(), b.double(), data_range=255, size_average=False)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="160"):
        metrics.ms_ssim(a[..., :64, :64], b[..., :64, :64])


def test_local_ssim_uses_descriptor_crops():
    R = 128
    g = torch.Generator().manual_seed(4)
    gt = torch.randint(0, 256, (1, 3, R, R), generator=g, dtype=torch.uint8)
    kp = torch.rand(1, 18, 2, generator=g) * 60 + 34  # all keypoints inside the middle of the image
    kp[0, 17] = -1  # a missing keypoint: its descriptors are skipped
    centers, valid = local_descriptors(kp, R, count=44)
    side = R // 8
    y0, x0, _ = crop_origins(centers, side)
    inside = torch.zeros(R, R, dtype=torch.bool)
    for n in range(44):
        if valid[0, n]:
            y, x = int(y0[0, n]), int(x0[0, n])
            inside[max(y, 0):y + side, max(x, 0):x + side] = True
    pred = gt.clone()
    noise = torch.randint(0, 256, (1, 3, R, R), generator=g, dtype=torch.uint8)
    pred[:, :, ~inside] = noise[:, :, ~inside]
    assert (~inside).sum() > R * R // 4
    assert float(metrics.local_ssim(pred, gt, kp, impl="reference")[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(metrics.ssim(pred, gt)[0]) < 0.8
    # corrupt one crop's pixels: local-SSIM drops
    pred2 = gt.clone()
    y, x = int(y0[0, 1]), int(x0[0, 1])
    pred2[:, :, y:y + side, x:x + side] = noise[:, :, y:y + side, x:x + side]
    assert float(metrics.local_ssim(pred2, gt, kp, impl="reference")[0]) < 0.99


def test_lpips_plumbing_random_backbone():
    """Random backbone (plumbing only, no pretrained claim): identical images give 0, different > 0."""
    m = metrics.LPIPSMetric("alex", weights="random")
    a, b = _pair((2, 3, 64, 64), 5)
    assert m(a, a).abs().max() < 1e-6
    assert (m(a, b) > 0).all()


def test_missing_weights_error_names_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HPTRANSFER_ALEXNET", str(tmp_path / "nope.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(metrics.WeightsUnavailable, match="alexnet-owt-7be5be79.pth"):
        metrics.LPIPSMetric("alex")
    with pytest.raises(metrics.WeightsUnavailable, match="HPTRANSFER_INCEPTION"):
        metrics.InceptionFeatures()


def test_lpips_loads_backbone_from_file(tmp_path, monkeypatch):
    """A torchvision-layout AlexNet file is loaded into lpips' slices (random values, layout check)."""
    from torchvision.models import alexnet
    net = alexnet(weights=None)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(net.state_dict(), path)
    monkeypatch.setenv("HPTRANSFER_ALEXNET", str(path))
    m = metrics.LPIPSMetric("alex")
    torch.testing.assert_close(getattr(m.model.net.slice1, "0").weight, net.features[0].weight)
    torch.testing.assert_close(getattr(m.model.net.slice5, "10").bias, net.features[10].bias)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert metrics.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    # two isotropic Gaussians: FID = |mu1-mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) = 4*1 + 4*(1 + 4 - 4)
    b = rng.normal(size=(200000, 4)) * 2 + 1
    c = rng.normal(size=(200000, 4))
    assert metrics.frechet_distance(b, c) == pytest.approx(4 + 4, rel=0.02)


# ---------------------------------------------------------------- hptransfer eval

def _write_folder(tmp_path, n=3, size=(64, 60)):
    from PIL import Image
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    truth = []
    for i in range(n):
        a, b = _pair((1, 3) + size, 10 + i)
        Image.fromarray(a[0].permute(1, 2, 0).numpy()).save(gt / f"img{i}.jpg" if i == 0 else gt / f"img{i}.png")
        Image.fromarray(b[0].permute(1, 2, 0).numpy()).save(pred / f"img{i}.png")
        truth.append((b[0], a[0]))
    # jpg ground truth is lossy: read back what was written
    gt0 = torch.from_numpy(np.asarray(Image.open(gt / "img0.jpg").convert("RGB")).copy()).permute(2, 0, 1)
    truth[0] = (truth[0][0], gt0)
    return pred, gt, truth


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
def test_eval_pred_gt_reproduces_skimage(tmp_path, protocol, capsys):
    import json
    from hptransfer.cli import main
    pred, gt, truth = _write_folder(tmp_path)
    out = tmp_path / "m.json"
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--protocol", protocol, "--metrics", "ssim",
               "--batch-size", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    got = json.loads(out.read_text())["metrics"][f"ssim_{protocol}"]
    want = np.mean([_sk(b, a, protocol) for b, a in truth])
    assert got["n"] == 3 and abs(got["value"] - want) < 1e-4
    assert f"ssim_{protocol}" in capsys.readouterr().out


def test_eval_reports_unavailable_instead_of_crashing(tmp_path, monkeypatch, capsys):
    import json
    from hptransfer.cli import main
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for v in ("HPTRANSFER_ALEXNET", "HPTRANSFER_INCEPTION"):
        monkeypatch.delenv(v, raising=False)
    pred, gt, _ = _write_folder(tmp_path)
    out = tmp_path / "m.json"
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--crop", "5:55", "--device", "cpu",
                 "--out", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert "unavailable" in m["lpips"] and "unavailable" in m["fid"] and "unavailable" in m["local_ssim"]
    assert "unavailable" in m["ms_ssim"]  # 64 px is too small for 5 scales
    assert 0 < m["ssim_gaussian"]["value"] < 1
    assert "unavailable (" in capsys.readouterr().out
    # explicitly requested: an error (a user error: exit 2), not a silent gap
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "lpips", "--device", "cpu"]) == 2
    # a 40-px-wide crop cannot hold the 51-px window: reported, not crashed
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--crop", "10:50", "--device", "cpu",
                 "--metrics", "ssim", "--protocol", "gaussian", "--out", str(out)]) == 0
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--crop", "10:50", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert "unavailable" in json.loads(out.read_text())["metrics"]["ssim_uniform51"]


def test_eval_local_ssim_from_annotations(tmp_path):
    import json
    from hptransfer.cli import main
    from hptransfer.data import write_annotations
    pred, gt, truth = _write_folder(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    kp = np.full((18, 2), -1.0)
    kp[:5] = [[20, 20], [30, 30], [40, 25], [32, 40], [25, 45]]
    write_annotations(data / "annotations-test.csv", {"img0.jpg": kp, "img1.png": kp, "img2.png": kp})
    out = tmp_path / "m.json"
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--data", str(data), "--metrics", "local_ssim",
                 "--device", "cpu", "--out", str(out)]) == 0
    got = json.loads(out.read_text())["metrics"]["local_ssim"]
    want = np.mean([float(metrics.local_ssim(b[None], a[None], torch.tensor(kp, dtype=torch.float32)[None],
                                             impl="reference")[0]) for b, a in truth])
    assert got["n"] == 3 and abs(got["value"] - want) < 1e-9
