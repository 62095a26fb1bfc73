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
    "gaussian12": dict(gaussian_weights=True, sigma=1.2, use_sample_covariance=False),
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


@pytest.mark.parametrize("protocol", metrics.ALL_PROTOCOLS)
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


def test_gaussian12_with_pred_range_is_pcdms_ssim_256():
    """PCDMs' "SSIM_256": sigma 1.2, no sample covariance, data_range = pred.max() - pred.min(); it
    differs from the sigma-1.5 protocol on the same images."""
    a, b = _pair((2, 3, 64, 64), 7)
    got = metrics.ssim(b, a, "gaussian12", data_range="pred")
    for i in range(2):
        p, g = b[i].permute(1, 2, 0).numpy().astype(np.float64), a[i].permute(1, 2, 0).numpy().astype(np.float64)
        want = structural_similarity(g, p, channel_axis=-1, data_range=p.max() - p.min(), **SKIMAGE_ARGS["gaussian12"])
        assert abs(float(got[i]) - want) < 1e-4
    assert (got - metrics.ssim(b, a, "gaussian", data_range="pred")).abs().min() > 1e-3


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


@pytest.mark.parametrize("protocol", metrics.ALL_PROTOCOLS)
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
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"ssim_{protocol} "))
    assert metrics.PROTOCOL_TEXT[protocol] in line and "data range 255" in line  # each number names its protocol


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


# ---------------------------------------------------------------- FID: networks and reference sets

def test_fid_inception_architecture_keys_shapes_and_pooling():
    """The TF FID graph in torchvision's layout: the weights file's key names and shapes, no auxiliary
    head, a 1008-way fc; in-image averages in the pooling branches of Mixed_5b-6e and 7b, a max in 7c;
    input mapped 2x - 1 at 299 px."""
    import torch.nn.functional as F
    from torchvision.models import inception as tv

    from hptransfer.models.fid_inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    sd = net.state_dict()
    want = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
            "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
            "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
            "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for k, shape in want.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("AuxLogits") for k in sd)
    # every other key and shape is torchvision's, with the 1008-way classifier and no auxiliary head
    ref = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    params = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    # a file saved without num_batches_tracked (as the TF port is) loads strictly
    FIDInceptionV3().load_state_dict(params)
    # pooling: block A against torchvision's (padded zeros counted in the average) with the same weights
    x = torch.rand(1, 192, 9, 9) * 4
    ours, theirs = net.Mixed_5b, tv.InceptionA(192, pool_features=32).eval()
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        a, b = ours(x), theirs(x)
        pool_a = ours.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    torch.testing.assert_close(a[:, :-32], b[:, :-32])  # the other branches are torchvision's
    torch.testing.assert_close(a[:, -32:], pool_a)
    assert not torch.allclose(a[:, -32:, 0, 0], b[:, -32:, 0, 0])  # a border pixel: the averages differ
    with torch.no_grad():
        y = torch.rand(1, 2048, 8, 8)
        c = net.Mixed_7c(y)
        torch.testing.assert_close(c[:, -192:], net.Mixed_7c.branch_pool(F.max_pool2d(y, 3, 1, 1)))
        e = net.Mixed_7b(torch.rand(1, 1280, 8, 8))
        assert e.shape == (1, 2048, 8, 8)
    seen = {}
    net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0]))
    with torch.no_grad():
        out = net(torch.zeros(2, 3, 64, 48))
    assert out.shape == (2, 2048) and seen["x"].shape == (2, 3, 299, 299) and (seen["x"] == -1).all()


def _random_weights(tmp_path, monkeypatch):
    """Random-valued files in each FID network's layout, found through their environment variables."""
    from torchvision.models import inception_v3

    from hptransfer.models.fid_inception import FIDInceptionV3

    def kept_alive(net):  # He init: the features still depend on the image after ~90 layers (default init: ~0)
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        return net.state_dict()

    torch.manual_seed(0)
    tvf, fidf = tmp_path / "tv.pth", tmp_path / "fid.pth"
    torch.save(kept_alive(inception_v3(weights=None, aux_logits=True, init_weights=False)), tvf)
    torch.save(kept_alive(FIDInceptionV3()), fidf)
    monkeypatch.setenv("HPTRANSFER_INCEPTION", str(tvf))
    monkeypatch.setenv("HPTRANSFER_FID_INCEPTION", str(fidf))


def test_fid_networks_feed_their_inputs_as_named(tmp_path, monkeypatch):
    _random_weights(tmp_path, monkeypatch)
    img = torch.randint(0, 256, (2, 3, 40, 30), dtype=torch.uint8)
    x = torch.nn.functional.interpolate(img.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
    tv = metrics.InceptionFeatures("torchvision")
    seen = {}
    tv.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, inp: seen.setdefault("tv", inp[0]))
    assert tv(img).shape == (2, 2048)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["tv"], x * (std / 0.5) + (mean - 0.5) / 0.5)  # PCDMs' inception.py
    pt = metrics.InceptionFeatures("pt_inception")
    pt.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, inp: seen.setdefault("pt", inp[0]))
    assert pt(img).shape == (2, 2048)
    torch.testing.assert_close(seen["pt"], 2 * x - 1)
    with pytest.raises(metrics.WeightsError, match="not the pt_inception FID network"):
        metrics.InceptionFeatures("pt_inception", weights=str(tmp_path / "tv.pth"))


@pytest.mark.slow  # Inception-v3 at 299 px on ~16 images: ~30 s on 2 cores
def test_eval_fid_names_network_and_reference(tmp_path, monkeypatch, capsys):
    """FID against the training images (--data's train split, or --fid-real) or the test ground truth;
    the number printed and stored says which network and which reference."""
    import json

    from PIL import Image

    from hptransfer.cli import main
    from hptransfer.data import write_annotations

    _random_weights(tmp_path, monkeypatch)
    pred, gt, truth = _write_folder(tmp_path, n=2)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    train = {}
    for i in range(3):
        a, _ = _pair((1, 3, 64, 60), 30 + i)
        Image.fromarray(a[0].permute(1, 2, 0).numpy()).save(data / "images" / f"t{i}.png")
        train[f"t{i}.png"] = np.full((18, 2), -1.0)
    write_annotations(data / "annotations-train.csv", train)
    out = tmp_path / "m.json"
    base = ["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "fid", "--device", "cpu", "--out", str(out)]
    assert main(base + ["--data", str(data), "--fid-network", "pt_inception"]) == 0
    fid_train = json.loads(out.read_text())["metrics"]["fid"]
    assert fid_train["reference_n"] == 3 and "pt_inception network; reference: 3 training images (train split" in \
        fid_train["protocol"]
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fid "))
    assert "pt_inception network" in line and "training images" in line
    # by hand: features of the predictions against those of the training images
    f = metrics.InceptionFeatures("pt_inception")
    preds = torch.stack([b for b, _ in truth])
    refs = torch.stack([torch.from_numpy(np.asarray(Image.open(data / "images" / n).convert("RGB")).copy())
                        .permute(2, 0, 1) for n in sorted(train)])
    assert fid_train["value"] > 1e-3  # the features vary: the comparisons below mean something
    assert fid_train["value"] == pytest.approx(metrics.frechet_distance(f(preds), f(refs)), rel=1e-6)
    assert main(base + ["--fid-reference", "test-gt", "--fid-network", "pt_inception"]) == 0
    fid_gt = json.loads(out.read_text())["metrics"]["fid"]
    assert fid_gt["protocol"] == "pt_inception network; reference: the test ground truth" and fid_gt["reference_n"] == 2
    assert abs(fid_gt["value"] - fid_train["value"]) > 1e-3 * fid_train["value"]
    assert main(base + ["--fid-real", str(data / "images")]) == 0  # a folder; the default network
    assert json.loads(out.read_text())["metrics"]["fid"]["protocol"] == \
        f"torchvision network; reference: 3 images (--fid-real {data / 'images'})"
    # asked for FID against training images that are not given: a one-line error
    assert main(base) == 2
    assert "--fid-real DIR" in capsys.readouterr().err
