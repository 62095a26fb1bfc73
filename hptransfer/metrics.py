"""Image metrics for pose transfer: SSIM (two literature protocols), MS-SSIM, local-SSIM, LPIPS, FID.

All SSIM variants run in torch (batched, float64, on the images' device) on uint8-quantised images
(values 0..255), so they equal scikit-image's ``structural_similarity`` on the saved PNGs. The
protocols (:data:`PROTOCOL_TEXT` says each in one line, and every printed number carries it):

- ``"gaussian"``: 11x11 Gaussian window, sigma 1.5, no sample-covariance correction
  (PG2 / Deformable GAN / PATN, GFLA's "ssim_256"; the sigma-1.5 protocol of CFLD and MCLD:
  ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``).
- ``"gaussian12"``: the same with sigma 1.2 (a 9x9 window: skimage truncates at 3.5 sigma): the
  "SSIM_256" of PCDMs' metrics.py (checked) and PIDM's, which pass ``data_range = pred.max() - pred.min()``
  (``data_range="pred"``).
- ``"uniform51"``: 51x51 uniform window with the sample-covariance correction N/(N-1)
  (skimage defaults with ``win_size=51``, as in the GFLA / PIDM / PCDMs / CFLD evaluation scripts' "SSIM").

Both use ``data_range=255`` by default. The original scripts differ here: GFLA's uniform-51 SSIM
runs on images / 255 with ``data_range=1`` (the same numbers: SSIM is invariant to scaling image
and range together), while PATN's and GFLA's Gaussian SSIM ("ssim_256") pass
``data_range = pred.max() - pred.min()``; ``data_range="pred"`` reproduces that. skimage filters the whole image (reflect padding) and then drops
``(win-1)/2`` pixels at every border before averaging, so only windows fully inside the image
count: a "valid" convolution gives exactly those values.

LPIPS and FID need ImageNet backbone weights, which are never downloaded here: see :func:`find_weights`
and ``hptransfer weights fetch alexnet inception fid_inception``. FID has two networks (:data:`FID_NETWORKS`):
torchvision's Inception-v3 fed as PCDMs' evaluation code feeds it, or the TF FID Inception of
pytorch-fid / clean-fid (:class:`hptransfer.models.fid_inception.FIDInceptionV3`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from hptransfer.constants import IMAGENET_MEAN, IMAGENET_STD
from hptransfer.errors import WeightsError, WeightsUnavailable  # noqa: F401  (WeightsUnavailable: public name here)
from hptransfer.images import to_uint8
from hptransfer.weights import WEIGHTS, find, load_state_dict

log = logging.getLogger(__name__)

PROTOCOLS = ("gaussian", "uniform51")  # the default pair ("--protocol both")
ALL_PROTOCOLS = ("gaussian", "gaussian12", "uniform51")
GAUSSIAN_SIGMA = {"gaussian": 1.5, "gaussian12": 1.2}
PROTOCOL_TEXT = {
    "gaussian": "Gaussian 11x11 sigma 1.5, no sample covariance (PG2/PATN/GFLA ssim_256; CFLD, MCLD)",
    "gaussian12": "Gaussian 9x9 sigma 1.2, no sample covariance (PCDMs/PIDM SSIM_256)",
    "uniform51": "uniform 51x51, sample covariance (GFLA/PIDM/PCDMs/CFLD SSIM)",
}
K1, K2 = 0.01, 0.03
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as in pytorch-msssim

# metric backbone -> hptransfer.weights name (the registry holds file names, env vars and hashes)
WEIGHT_NAMES = {"alex": "alexnet", "vgg": "vgg16", "inception": "inception", "fid_inception": "fid_inception"}
WEIGHT_FILES = {k: (WEIGHTS[n].env, WEIGHTS[n].filename) for k, n in WEIGHT_NAMES.items()}


# ---------------------------------------------------------------- helpers

def parse_crop(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``"40:216"`` -> (40, 216): the x range kept (e.g. the 176-wide DeepFashion protocol)."""
    if not text:
        return None
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--crop must look like x0:x1 (e.g. 40:216), got {text!r}") from None
    if not 0 <= a < b:
        raise ValueError(f"--crop x0:x1 needs 0 <= x0 < x1, got {text!r}")
    return a, b


def _gauss_1d(size: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _band(n_in: int, k1d: torch.Tensor) -> torch.Tensor:
    """(n_in - k + 1, n_in) matrix whose row i holds the kernel at columns i..i+k-1 ('valid' filtering)."""
    k = k1d.numel()
    n_out = n_in - k + 1
    idx = torch.arange(n_out, device=k1d.device)[:, None] + torch.arange(k, device=k1d.device)[None, :]
    return torch.zeros(n_out, n_in, dtype=k1d.dtype, device=k1d.device).scatter_(1, idx, k1d.expand(n_out, k))


def _filter_valid(x: torch.Tensor, k1d: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' filtering of (..., H, W) with a 1-D kernel along H and W.

    Two banded matrix products instead of depthwise convolutions: on a 2-core CPU in float64 this is
    ~5x (11 taps) to ~15x (51 taps) faster than conv2d, with the same sums (~1e-12 apart)."""
    return _band(x.shape[-2], k1d) @ x @ _band(x.shape[-1], k1d).T


def _protocol_window(protocol: str, side: int, dtype, device):
    """(1-D kernel, sample-covariance factor) of a protocol; windows shrink for images smaller than them."""
    if protocol in GAUSSIAN_SIGMA:
        sigma = GAUSSIAN_SIGMA[protocol]
        size = min(2 * int(3.5 * sigma + 0.5) + 1, side if side % 2 else side - 1)  # skimage's truncation
        return _gauss_1d(size, sigma, dtype, device), 1.0
    if protocol == "uniform51":
        size = 51
        if side < size:
            raise ValueError(f"uniform51 SSIM needs images of at least 51 px, got {side}")
        n = size * size
        return torch.full((size,), 1.0 / size, dtype=dtype, device=device), n / (n - 1)
    raise ValueError(f"unknown SSIM protocol {protocol!r}; choose from {ALL_PROTOCOLS}")


def _ssim_cs(x: torch.Tensor, y: torch.Tensor, k1d: torch.Tensor, cov_norm: float, data_range: float):
    """Per-image per-channel mean SSIM and contrast-structure term: two (N, C) tensors."""
    if isinstance(data_range, torch.Tensor):
        data_range = data_range.view(-1, 1, 1, 1).to(x.dtype)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mx, my = _filter_valid(x, k1d), _filter_valid(y, k1d)
    vx = cov_norm * (_filter_valid(x * x, k1d) - mx * mx)
    vy = cov_norm * (_filter_valid(y * y, k1d) - my * my)
    vxy = cov_norm * (_filter_valid(x * y, k1d) - mx * my)
    cs = (2 * vxy + c2) / (vx + vy + c2)
    s = (2 * mx * my + c1) / (mx * mx + my * my + c1) * cs
    return s.mean(dim=(2, 3)), cs.mean(dim=(2, 3))


def _prep(pred: torch.Tensor, gt: torch.Tensor, crop=None) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != gt.shape or pred.dim() != 4:
        raise ValueError(f"pred and gt must both be (B, C, H, W), got {tuple(pred.shape)} and {tuple(gt.shape)}")
    x, y = to_uint8(pred), to_uint8(gt)
    if crop is not None:
        x, y = x[..., crop[0]:crop[1]], y[..., crop[0]:crop[1]]
    return x.to(torch.float64), y.to(torch.float64)


# ---------------------------------------------------------------- SSIM family

def _data_range(x: torch.Tensor, data_range):
    if data_range == "pred":  # per image, over all channels (PATN / GFLA "ssim_256")
        return x.flatten(1).amax(1) - x.flatten(1).amin(1)
    if isinstance(data_range, str):
        raise ValueError(f"data_range must be a number or 'pred', got {data_range!r}")
    return float(data_range)


def ssim(pred: torch.Tensor, gt: torch.Tensor, protocol: str = "gaussian", crop=None,
         data_range: float | str = 255.0) -> torch.Tensor:
    """Per-image SSIM (B,) float64 of ``pred`` vs ``gt`` (B, 3, H, W): uint8 or float in [-1, 1]
    (quantised to uint8 first). ``crop`` = (x0, x1) keeps columns x0:x1. Equals skimage's
    ``structural_similarity(..., channel_axis=-1)`` under the named ``protocol``. ``data_range``:
    255, or "pred" for each prediction's max - min (see the module docstring)."""
    x, y = _prep(pred, gt, crop)
    k, cov_norm = _protocol_window(protocol, min(x.shape[-2:]), x.dtype, x.device)
    s, _ = _ssim_cs(x, y, k, cov_norm, _data_range(x, data_range))
    return s.mean(dim=1)


def ms_ssim(pred: torch.Tensor, gt: torch.Tensor, crop=None, data_range: float = 255.0,
            win_size: int = 11) -> torch.Tensor:
    """Per-image MS-SSIM (B,) float64 over 5 scales (Gaussian 11x11 window, sigma 1.5; pytorch-msssim's
    definition: average-pool by 2 between scales, negative cs clamped to 0). Needs the shorter side
    > (win_size - 1) * 16 (160 px at 11); pass a smaller odd ``win_size`` for small images."""
    x, y = _prep(pred, gt, crop)
    side = min(x.shape[-2:])
    if side <= (win_size - 1) * 2 ** 4:
        raise ValueError(f"MS-SSIM with a {win_size}-px window needs images larger than {(win_size - 1) * 16} px, "
                         f"got {side}")
    k = _gauss_1d(win_size, 1.5, x.dtype, x.device)
    w = torch.tensor(MSSSIM_WEIGHTS, dtype=x.dtype, device=x.device)
    values = []
    for level in range(len(MSSSIM_WEIGHTS)):
        s, cs = _ssim_cs(x, y, k, 1.0, data_range)
        if level < len(MSSSIM_WEIGHTS) - 1:
            values.append(torch.relu(cs))
            pad = [d % 2 for d in x.shape[2:]]
            x = F.avg_pool2d(x, 2, padding=pad)
            y = F.avg_pool2d(y, 2, padding=pad)
    values.append(torch.relu(s))
    stacked = torch.stack(values, dim=0)  # (levels, B, C)
    return torch.prod(stacked ** w.view(-1, 1, 1), dim=0).mean(dim=1)


def local_ssim(pred: torch.Tensor, gt: torch.Tensor, kp_gt: torch.Tensor, count: int = 44,
               impl: str = "auto") -> torch.Tensor:
    """The paper's local-SSIM: per-image mean SSIM (B,) over the ``count`` descriptor crops (side R/8)
    around the ground truth's keypoints ``kp_gt`` (B, 18, 2) (y, x) pixels; invalid descriptors are
    skipped (NaN for an image with none). Crops leaving the image are zero-padded in both images.
    SSIM per crop is the "gaussian" protocol; crops narrower than 11 px use the Gaussian truncated
    to the largest odd size that fits."""
    from hptransfer.ops import gather_crops
    from hptransfer.pose import local_descriptors

    x, y = _prep(pred, gt)
    R = max(x.shape[-2:])  # 256 for DeepFashion's 256x176 images
    side = max(R // 8, 1)
    if side < 3:
        raise ValueError(f"local-SSIM needs images of at least 24 px (crops of R/8 >= 3), got {R}")
    centers, valid = local_descriptors(kp_gt.to(x.device), R, count=count)
    cx = gather_crops(x.float(), centers, side, impl=impl).to(torch.float64)
    cy = gather_crops(y.float(), centers, side, impl=impl).to(torch.float64)
    k, cov_norm = _protocol_window("gaussian", side, cx.dtype, cx.device)
    s, _ = _ssim_cs(cx, cy, k, cov_norm, 255.0)
    s = s.mean(dim=1).view(valid.shape)
    v = valid.to(s.dtype)
    return (s * v).sum(dim=1) / v.sum(dim=1)  # 0/0 = NaN when no descriptor is valid


# ---------------------------------------------------------------- pretrained-backbone metrics

def find_weights(kind: str, explicit: Optional[str | Path] = None) -> Path:
    """Locate ImageNet weights for ``kind`` ("alex", "vgg", "inception"): ``explicit``, then the env var
    (HPTRANSFER_ALEXNET / HPTRANSFER_VGG16 / HPTRANSFER_INCEPTION), then the torch hub cache
    (:func:`hptransfer.weights.find`). Raises :class:`WeightsUnavailable` naming every place looked."""
    return find(WEIGHT_NAMES[kind], explicit)


class LPIPSMetric:
    """LPIPS (Zhang et al. 2018) from the ``lpips`` package with a locally loaded backbone.

    ``net`` "alex" (default) or "vgg"; ``weights`` a torchvision state-dict file, None = search
    (:func:`find_weights`), or "random" (plumbing tests only: the numbers mean nothing).
    The linear calibration layers ship inside the lpips package.
    """

    def __init__(self, net: str = "alex", weights: Optional[str] = None, device="cpu"):
        import lpips

        if net not in ("alex", "vgg"):
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        path = None if weights == "random" else find_weights(net, weights)
        self.model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
        if path is not None:
            src = load_state_dict(path)
            dst = self.model.net.state_dict()
            new = {}
            for name in dst:  # lpips keeps torchvision's feature indices: sliceK.<idx>.weight
                _, idx, param = name.split(".")
                key = f"features.{idx}.{param}"
                if key not in src:
                    raise WeightsError(f"{path}: no {key}; is this torchvision's {WEIGHT_FILES[net][1]}?")
                new[name] = src[key]
            self.model.net.load_state_dict(new)
        self.model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS (B,) of images (B, 3, H, W) uint8 or float in [-1, 1] (quantised first)."""
        x = to_uint8(pred).to(self.device, torch.float32) / 127.5 - 1
        y = to_uint8(gt).to(self.device, torch.float32) / 127.5 - 1
        return self.model(x, y).view(-1).double().cpu()


# FID's networks (--fid-network): the weights file (hptransfer.weights) and what feeds them
FID_NETWORKS = {
    "torchvision": "torchvision Inception-v3 (inception_v3_google-0cc3c7bd.pth), input as PCDMs' inception.py",
    "pt_inception": "TF FID Inception (pt_inception-2015-12-05-6726825d.pth), as pytorch-fid/clean-fid legacy",
}
FID_WEIGHTS = {"torchvision": "inception", "pt_inception": "fid_inception"}


class InceptionFeatures:
    """2048-d pool features for FID from a local weights file, by ``network`` (:data:`FID_NETWORKS`):

    - ``"torchvision"``: torchvision's Inception-v3 (ImageNet weights), images in [0, 1] resized
      bilinearly to 299 and mapped per channel by ``x * (std / 0.5) + (mean - 0.5) / 0.5``, as the
      PCDMs evaluation code (``inception.py``, checked) feeds it: torchvision's ``transform_input``
      formula applied to unnormalised images. Those scripts first resize with OpenCV's bicubic to the
      dataset's size; here images come at their own size.
    - ``"pt_inception"``: :class:`~hptransfer.models.fid_inception.FIDInceptionV3` with pytorch-fid's
      weights: bilinear to 299, ``2x - 1``.
    """

    def __init__(self, network: str = "torchvision", weights: Optional[str] = None, device="cpu"):
        if network not in FID_NETWORKS:
            raise ValueError(f"FID network must be one of {', '.join(FID_NETWORKS)}, got {network!r}")
        self.network = network
        path = find(FID_WEIGHTS[network], weights)
        state = load_state_dict(path)
        if network == "torchvision":
            from torchvision.models import inception_v3

            net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        else:
            from hptransfer.models.fid_inception import FIDInceptionV3

            net = FIDInceptionV3()
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise WeightsError(f"{path}: not the {network} FID network's state dict ({str(e)[:200]}...)") from None
        if network == "torchvision":
            net.fc = torch.nn.Identity()
        self.net = net.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 or [-1, 1] -> (B, 2048) float64."""
        x = to_uint8(images).to(self.device, torch.float32) / 255.0
        if self.network == "pt_inception":
            return self.net(x).double().cpu()
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return self.net(x * (std / 0.5) + (mean - 0.5) / 0.5).double().cpu()


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) (Heusel et al. 2017)."""
    from scipy import linalg

    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 images per set")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():  # singular product: nudge the diagonals (as pytorch-fid does)
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
