"""The FID Inception network: the TensorFlow Inception-v3 graph of 2015-12-05 that the original FID
code (TTUR) uses, in torch, to load ``pt_inception-2015-12-05-6726825d.pth`` (the port that
pytorch-fid publishes and clean-fid's legacy mode loads). Written here from torchvision's
:class:`~torchvision.models.Inception3` and the documented differences of that graph; the weights are
fetched by ``hptransfer weights fetch fid_inception`` (SHA-256 checked), never bundled.

Differences from torchvision's ImageNet Inception-v3 (its layer names and shapes otherwise, so the
state dict's keys are torchvision's): a 1008-way classifier (``fc``: 2048 -> 1008) and no auxiliary
head; the pooling branch of the 35x35 and 17x17 blocks (Mixed_5b-d, Mixed_6b-e) and of Mixed_7b
averages only the in-image pixels of each 3x3 window (``count_include_pad=False``); Mixed_7c's pooling
branch takes the 3x3 maximum instead of the average. Input: RGB in [0, 1], resized bilinearly to 299
and mapped to [-1, 1] (``2x - 1``); output: the 2048 features after the global average pool.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models import inception as tv

FEATURES = 2048
CLASSES = 1008  # the TF graph's classifier (1000 ImageNet classes + 8 unused)


def _avg_in_image(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(tv.InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_in_image(x))]


class _BlockC(tv.InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_avg_in_image(x))]


class _BlockE(tv.InceptionE):
    """Mixed_7b (``pool="avg"``, in-image average) or Mixed_7c (``pool="max"``)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__(in_channels)
        self.pool = pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = _avg_in_image(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return [self.branch1x1(x), b3, d, self.branch_pool(pooled)]


class FIDInceptionV3(tv.Inception3):
    """``forward(images)`` (B, 3, H, W) in [0, 1] -> (B, 2048) pool features (see the module docstring).
    Its state dict's keys are the weights file's (``Conv2d_1a_3x3.conv.weight``, ..., ``fc.bias``)."""

    def __init__(self):
        super().__init__(num_classes=CLASSES, aux_logits=False, init_weights=False)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, "avg"), _BlockE(2048, "max")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1, self.Conv2d_3b_1x1,
                      self.Conv2d_4a_3x3, self.maxpool2, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c, self.avgpool):
            x = layer(x)
        return torch.flatten(x, 1)
