"""Local discriminators (paper section 3.2, Fig. 6).

Each descriptor d has its own small discriminator that scores a pair of crops
``(X_d, X'_d)`` (real) or ``(X_d, X^_d)`` (fake), stacked on channels (6 x s x s, s = R / 8).
Architecture of one discriminator, for crop side s (a power of two >= 2)::

    [Conv4x4 stride 2 pad 1 -> LeakyReLU(0.2)] x log2(s / 2)     s x s  ->  2 x 2
        channels c, 2c, 4c, 8c, 8c, ...   (c = model.disc_channels, doubling up to 8c)
    Conv1x1 -> 1 channel, averaged over the 2 x 2 map             -> one logit

Fig. 6 ends in a 2 x 2 x 1 map averaged to a scalar; that is kept. No normalisation layers (each
discriminator sees a handful of crops per batch, too few for batch statistics).

Choice: "the local discriminator at the d-th region" is read as N separate discriminators. They run
as ONE grouped convolution (groups = N, input reshaped to (B, N*6, s, s)), so 44 discriminators cost
one pass and every weight tensor holds all N of them. ``model.disc_shared=True`` instead shares one
discriminator across descriptors (N folded into the batch). Grouped, at 1024 px (s = 128, N = 44,
c = 64) that is about 490 M parameters, against 11 M shared; set ``disc_channels`` lower to save memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from hptransfer.config import ModelConfig


def disc_layer_channels(crop: int, base: int) -> list[int]:
    """Per-discriminator output channels of the stride-2 convs for a crop side ``crop``."""
    if crop < 2 or crop & (crop - 1):
        raise ValueError(f"local discriminator crop side must be a power of two >= 2, got {crop}")
    n = int(math.log2(crop)) - 1
    return [base * min(2 ** i, 8) for i in range(n)]


class LocalDiscriminator(nn.Module):
    """N local discriminators: ``forward(pairs (B, N, 6, s, s)) -> logits (B, N)`` (fp32 or input dtype).

    A logit > 0 means "a real transfer". ``pairs[:, d, :3]`` is the reference crop ``X_d``,
    ``pairs[:, d, 3:]`` the target or generated crop.
    """

    def __init__(self, model_cfg: ModelConfig, num_descriptors: int, crop: int):
        super().__init__()
        self.num_descriptors = int(num_descriptors)
        self.crop = int(crop)
        self.shared = bool(model_cfg.disc_shared)
        if self.num_descriptors < 1:
            raise ValueError(f"num_descriptors must be >= 1, got {num_descriptors}")
        g = 1 if self.shared else self.num_descriptors
        slope = model_cfg.negative_slope
        layers: list[nn.Module] = []
        cin = 6
        for cout in disc_layer_channels(self.crop, model_cfg.disc_channels):
            conv = nn.Conv2d(cin * g, cout * g, 4, stride=2, padding=1, groups=g)
            nn.init.kaiming_normal_(conv.weight, a=slope, nonlinearity="leaky_relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.LeakyReLU(slope, inplace=True)]
            cin = cout
        head = nn.Conv2d(cin * g, g, 1, groups=g)
        nn.init.kaiming_normal_(head.weight, a=1.0, nonlinearity="leaky_relu")
        nn.init.zeros_(head.bias)
        layers.append(head)
        self.net = nn.Sequential(*layers)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        N, s = self.num_descriptors, self.crop
        if pairs.dim() != 5 or pairs.shape[1:] != (N, 6, s, s):
            raise ValueError(f"pairs must be (B, {N}, 6, {s}, {s}), got {tuple(pairs.shape)}")
        B = pairs.shape[0]
        if self.shared:
            x = pairs.reshape(B * N, 6, s, s)
        else:
            x = pairs.reshape(B, N * 6, s, s)  # discriminator d reads channels 6d..6d+5: its group
        out = self.net(x)  # (B*N, 1, 2, 2) shared, (B, N, 2, 2) grouped
        return out.mean(dim=(2, 3)).reshape(B, N)
