"""The appearance flow network of the paper's garment transfer (Fig. 9): flows that move a garment
from the pose it was photographed in to a target person's garment region, and the bilinear sampling
layer that applies them.

The paper's: the inputs (the garment image, the reference and target pose masks) and the bilinear
sampling layer (:func:`warp`). Ours (the paper gives no architecture): the pose heatmaps as extra
inputs, the two-encoder coarse-to-fine pyramid below, and everything it is trained with
(:mod:`hptransfer.flow_losses`, :mod:`hptransfer.data.garment_pairs`).

Inputs (B = batch, R = resolution): the masked garment image (B, 3, R, R) in [-1, 1] (zero outside
its mask), the source garment mask (B, 1, R, R) in [0, 1], the target garment region (B, 1, R, R)
(where the garment may lie on the target person: clothes and arms), and both poses as (B, 18, 2)
(y, x) keypoints, turned into Gaussian heatmaps inside (:func:`hptransfer.ops.heatmaps`).

Architecture (coarse-to-fine residual flows, as in appearance-flow peers such as ClothFlow/PF-AFN):
two small encoders (garment + mask + source heatmaps; target region + target heatmaps) build feature
pyramids at R/2 ... R/2^L; the coarsest level predicts a flow from both features; every finer level
upsamples the flow, warps the garment's features with it and predicts a residual; the R/2 flow is
upsampled to R. Each flow head starts at zero, so an untrained network is the identity warp.

Flows are offsets in ``grid_sample``'s normalised coordinates ((-1, -1) = the top-left corner, one
pixel = 2 / R), so they keep their meaning across scales and resolutions; ``grow()`` doubles the
resolution with the same weights. :func:`warp` is the sampling layer: bilinear ``grid_sample`` with
``align_corners=False`` and zero padding. A zero flow returns its input exactly at power-of-two sizes
(pixel centres are then exact binary fractions, so the bilinear weights are exactly 1 and 0).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hptransfer import ops, pose


def base_grid(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, H, W, 2) pixel-centre sampling grid (x, y) in normalised coordinates (align_corners=False)."""
    ys = (2 * torch.arange(height, device=device, dtype=dtype) + 1) / height - 1
    xs = (2 * torch.arange(width, device=device, dtype=dtype) + 1) / width - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1)[None]


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """The bilinear sampling layer: output(p) = image(p + flow(p)). ``image`` (B, C, H, W), ``flow``
    (B, 2, H, W) (x, y) offsets in normalised coordinates (2 / W per pixel across). Outside the image
    samples are zero."""
    if flow.shape[0] != image.shape[0] or flow.shape[1] != 2 or flow.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"flow must be (B, 2, H, W) matching image {tuple(image.shape)}, got {tuple(flow.shape)}")
    grid = base_grid(image.shape[-2], image.shape[-1], image.device, flow.dtype) + flow.permute(0, 2, 3, 1)
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def pixels_to_flow(dy_dx: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, H, W) offsets in pixels (dy, dx) -> normalised flow (x, y) for :func:`warp`."""
    return torch.stack((dy_dx[:, 1] * 2 / width, dy_dx[:, 0] * 2 / height), dim=1)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2, inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True))


class _Encoder(nn.Module):
    def __init__(self, cin: int, widths: list[int]):
        super().__init__()
        chans = [cin] + widths
        self.blocks = nn.ModuleList(_block(chans[i], chans[i + 1], stride=2) for i in range(len(widths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for b in self.blocks:
            x = b(x)
            feats.append(x)
        return feats


def _flow_head(cin: int, mid: int) -> nn.Sequential:
    head = nn.Sequential(nn.Conv2d(cin, mid, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(mid, 2, 3, 1, 1))
    nn.init.zeros_(head[-1].weight)  # start as the identity warp
    nn.init.zeros_(head[-1].bias)
    return head


class AppearanceFlow(nn.Module):
    """Coarse-to-fine appearance flow. ``forward(garment, source_mask, target_region, kp_source,
    kp_target)`` -> dict {"flow": (B, 2, R, R), "warped": (B, 3, R, R), "warped_mask": (B, 1, R, R),
    "flows": [coarsest .. R/2 flows]}."""

    def __init__(self, resolution: int = 64, levels: int = 4, channels: int = 32, max_channels: int = 256,
                 num_keypoints: int = 18, pose_sigma: float = 3.2):
        super().__init__()
        if resolution % (2 ** levels):
            raise ValueError(f"resolution {resolution} must be divisible by 2**levels = {2 ** levels}")
        self.resolution, self.levels, self.channels = int(resolution), int(levels), int(channels)
        self.max_channels, self.num_keypoints, self.pose_sigma = int(max_channels), int(num_keypoints), float(pose_sigma)
        widths = [min(channels * 2 ** i, max_channels) for i in range(levels)]
        self.source_encoder = _Encoder(3 + 1 + num_keypoints, widths)
        self.target_encoder = _Encoder(1 + num_keypoints, widths)
        # level i head sees: warped source features, target features (+ the upsampled flow below the top)
        self.heads = nn.ModuleList(
            _flow_head(2 * w + (2 if i < levels - 1 else 0), max(w // 2, 16)) for i, w in enumerate(widths))
        self.impl = "auto"  # heatmap path, as the generator's
        self.fade_alpha = 1.0  # the trainer sets it on every model; no input fade here

    # ---- what the trainer and exports expect of a model
    def arch(self) -> dict:
        return {"kind": "appearance_flow", "resolution": self.resolution, "levels": self.levels,
                "channels": self.channels, "max_channels": self.max_channels, "num_keypoints": self.num_keypoints,
                "pose_sigma": self.pose_sigma}

    @classmethod
    def from_arch(cls, arch: dict) -> "AppearanceFlow":
        if arch.get("kind") != "appearance_flow":
            raise ValueError(f"not an appearance flow architecture: {arch}")
        return cls(**{k: v for k, v in arch.items() if k != "kind"})

    def grow(self, input_fade: bool = False) -> None:
        """Double the working resolution; the weights are resolution-free (flows in normalised units)."""
        self.resolution *= 2

    def inference_state_dict(self) -> dict:
        return self.state_dict()

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.checkpointing = bool(enabled)  # small network: accepted, not needed

    # ---- the network
    def heatmaps(self, kp: torch.Tensor, size: int, dtype) -> torch.Tensor:
        sigma = pose.default_sigma(size, self.pose_sigma)
        return ops.heatmaps(kp.float(), (size, size), (size, size), sigma=sigma, impl=self.impl).to(dtype)

    def forward(self, garment: torch.Tensor, source_mask: torch.Tensor, target_region: torch.Tensor,
                kp_source: torch.Tensor, kp_target: torch.Tensor) -> dict:
        R = garment.shape[-1]
        if garment.shape[-2] != R or R % (2 ** self.levels):
            raise ValueError(f"garment must be square with side divisible by {2 ** self.levels}, got {tuple(garment.shape)}")
        dt = garment.dtype
        src = torch.cat([garment, source_mask.to(dt), self.heatmaps(kp_source, R, dt)], 1)
        tgt = torch.cat([target_region.to(dt), self.heatmaps(kp_target, R, dt)], 1)
        fs, ft = self.source_encoder(src), self.target_encoder(tgt)
        flow: Optional[torch.Tensor] = None
        flows = []
        for i in reversed(range(self.levels)):
            if flow is None:
                flow = self.heads[i](torch.cat([fs[i], ft[i]], 1))
            else:
                flow = F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=False)
                warped = warp(fs[i], flow)
                flow = flow + self.heads[i](torch.cat([warped, ft[i], flow], 1))
            flows.append(flow)
        flow = F.interpolate(flow, size=(R, R), mode="bilinear", align_corners=False)
        return {"flow": flow, "warped": warp(garment, flow), "warped_mask": warp(source_mask.to(dt), flow),
                "flows": flows}
