"""The progressive pose-guided U-Net generator (paper sections 3.1, 3.3, 3.4; Fig. 3 and 5).

Layout at output resolution R (channels ``ch(r) = channels_at(r, cfg)``: 1024 * width at 32x32,
halving per doubling of the side)::

    from_rgb[R]      1x1 conv 3 -> ch(R), LeakyReLU(0.2)
    encoder[r]       for r = R, R/2, ..., 64:
                       Conv3x3-BN-LReLU ch(r) -> ch(r); Conv3x3-BN-LReLU ch(r) -> ch(r/2)
                       output (ch(r/2) x r x r) = the U-Net skip of decoder[r]; then AvgPool2d(2)
    bottleneck       input ch(32) x 32 x 32 (1024 x 32 x 32 at width 1) ++ 18 pose heatmaps (32 x 32)
                       Conv3x3-BN-LReLU ch(32)+18 -> ch(32); Conv3x3-BN-LReLU ch(32) -> ch(32)
    decoder[r]       for r = 64, 128, ..., R:
                       nearest upsample x2 (ch(r/2) x r x r) ++ skip (ch(r/2)) [++ 18 heatmaps at r]
                       Conv3x3-BN-LReLU 2*ch(r/2) [+18] -> ch(r); Conv3x3-BN-LReLU ch(r) -> ch(r)
    to_rgb[R]        1x1 conv ch(R) -> 3, tanh (images live in [-1, 1])

Input fade (``model.input_fade`` > 0, not in the paper): for the first part of a grown stage the
new top encoder block fades in, alpha going 0 -> 1: encoder[R/2] gets ``alpha *
avgpool(encoder[R](from_rgb[R](x))) + (1 - alpha) * from_rgb[R/2](avgpool(x))`` (the previous
stage's from-RGB, kept for the stage) and decoder[R] gets the top skip times alpha. Without it the
fresh top encoder feeds the trained deeper blocks random features at the growth and its skip offers
the new decoder block a sharp copy of the reference, which pulls the output back towards the
reference's pose (CPU demo, 400 iterations at 128 px, one run each: L1 on the target's new body pixels
0.216 with the fade, 0.240 without; on vacated pixels 0.181 with it, 0.172 without: mixed). The CPU
ablation compares the fades with the paper's growth over 3 seeds (``configs/ablation/pt_fade*.yaml``).
The new decoder block and to-RGB train
from scratch, as in the paper.

Output fade (``model.output_fade``, with the input fade, same alpha): the previous stage's to-RGB is
kept too and the output is ``tanh(alpha * to_rgb[R](decoder[R]) + (1 - alpha) * up(to_rgb[R/2](decoder[R/2])))``
(pre-tanh, nearest upsampling), so at alpha 0 the grown generator gives exactly the previous
generator's output, upsampled. Why: the trained decoder[R/2] has a few large, region-specific
activations (in the CPU ablation up to 15 after BatchNorm where most are below 0.2); the fresh
decoder[R] block amplifies them into pre-tanh values of 10-30, and the output tanh saturates there
(flat magenta or black regions) with no gradient to bring it back.

The bracketed heatmaps are the ``model.pose_at_every_scale`` option (the paper injects pose only at
the bottleneck). The 3x3 convolutions have no bias (the following BatchNorm's shift makes it
redundant); the 1x1 RGB projections have a bias. Conv weights use He (kaiming-normal) init for
LeakyReLU(0.2), biases start at zero.

Modules live in ``nn.ModuleDict``s keyed by resolution (``encoder.256.conv1.conv.weight``), so
state-dict keys do not change when the model grows: a 256-px export loads into
``Generator.from_arch({"model": ..., "resolution": 256})``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hptransfer import ops, pose
from hptransfer.config import ModelConfig, channels_at

log = logging.getLogger(__name__)

MAX_RESOLUTION = 1024


def _he_init(conv: nn.Conv2d, negative_slope: float) -> None:
    nn.init.kaiming_normal_(conv.weight, a=negative_slope, mode="fan_in", nonlinearity="leaky_relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ConvBNAct(nn.Module):
    """Conv3x3 (no bias) -> BatchNorm -> LeakyReLU."""

    def __init__(self, cin: int, cout: int, negative_slope: float):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        _he_init(self.conv, negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class EncoderBlock(nn.Module):
    """(B, ch(r), r, r) -> skip (B, ch(r/2), r, r); the caller pools it to r/2."""

    def __init__(self, cin: int, cout: int, negative_slope: float):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cin, negative_slope)
        self.conv2 = ConvBNAct(cin, cout, negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class DecoderBlock(nn.Module):
    """(B, ch(r/2), r/2, r/2) + skip (B, ch(r/2), r, r) [+ maps (B, 18, r, r)] -> (B, ch(r), r, r)."""

    def __init__(self, cin: int, cskip: int, cextra: int, cout: int, negative_slope: float):
        super().__init__()
        self.conv1 = ConvBNAct(cin + cskip + cextra, cout, negative_slope)
        self.conv2 = ConvBNAct(cout, cout, negative_slope)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, maps: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        parts = [x, skip] if maps is None else [x, skip, maps]
        return self.conv2(self.conv1(torch.cat(parts, dim=1)))


class BottleneckBlock(nn.Module):
    """(B, ch(32), 32, 32) ++ heatmaps (B, 18, 32, 32) -> (B, ch(32), 32, 32)."""

    def __init__(self, channels: int, num_keypoints: int, negative_slope: float):
        super().__init__()
        self.conv1 = ConvBNAct(channels + num_keypoints, channels, negative_slope)
        self.conv2 = ConvBNAct(channels, channels, negative_slope)

    def forward(self, x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(torch.cat([x, maps], dim=1)))


class FromRGB(nn.Module):
    def __init__(self, cout: int, negative_slope: float):
        super().__init__()
        self.conv = nn.Conv2d(3, cout, 1)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        _he_init(self.conv, negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class ToRGB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, 3, 1)
        _he_init(self.conv, 1.0)  # a=1: linear gain, the layer feeds tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


@contextlib.contextmanager
def _bn_stats_frozen(module: nn.Module):
    """Keep BatchNorm running statistics unchanged (checkpoint recomputation must not count twice)."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def _checkpointed(block: nn.Module, *args):
    calls = [0]

    def run(*inner):
        calls[0] += 1
        if calls[0] == 1:
            return block(*inner)
        with _bn_stats_frozen(block):  # the recomputation in backward
            return block(*inner)

    return checkpoint(run, *args, use_reentrant=False)


class Generator(nn.Module):
    """Pose-guided encoder-decoder, grown progressively from 64 px to 1024 px.

    ``forward(reference (B, 3, R, R) in [-1, 1], kp (B, 18, 2) (y, x) pixels of the R x R target
    image) -> (B, 3, R, R)`` in [-1, 1]. ``self.impl`` ("auto" | "fast" | "reference") picks the
    heatmap implementation.
    """

    def __init__(self, model_cfg: ModelConfig, resolution: int = 64):
        super().__init__()
        self.cfg = model_cfg
        self.base = 2 * model_cfg.bottleneck_size
        if resolution < self.base or resolution > MAX_RESOLUTION or resolution % self.base \
                or (resolution // self.base) & (resolution // self.base - 1):
            raise ValueError(f"resolution must be {self.base} * 2^k and <= {MAX_RESOLUTION}, got {resolution}")
        self.impl = "auto"
        self.checkpointing = False
        # The fade's weight of the new input path (see grow) as a device scalar, so that a compiled
        # forward reads it like an input: no recompilation as it rises every step.
        self.register_buffer("fade_alpha_tensor", torch.ones(()), persistent=False)
        self._fade_alpha = 1.0
        slope = model_cfg.negative_slope
        ch = self.channels
        self.encoder = nn.ModuleDict()
        self.decoder = nn.ModuleDict()
        self.bottleneck = BottleneckBlock(ch(model_cfg.bottleneck_size), model_cfg.num_keypoints, slope)
        self.from_rgb = nn.ModuleDict()
        self.to_rgb = nn.ModuleDict()
        self.resolution = self.base
        self._add_blocks(self.base)
        while self.resolution < resolution:
            self._add_blocks(self.resolution * 2)
        self._set_rgb(self.resolution)

    # ------------------------------------------------------------------ structure
    def channels(self, resolution: int) -> int:
        """Feature channels at a spatial side (``channels_at``)."""
        return channels_at(resolution, self.cfg)

    def _add_blocks(self, r: int) -> None:
        ch, slope = self.channels, self.cfg.negative_slope
        extra = self.cfg.num_keypoints if self.cfg.pose_at_every_scale else 0
        self.encoder[str(r)] = EncoderBlock(ch(r), ch(r // 2), slope)
        self.decoder[str(r)] = DecoderBlock(ch(r // 2), ch(r // 2), extra, ch(r), slope)
        self.resolution = r

    def _set_rgb(self, r: int) -> None:
        self.from_rgb = nn.ModuleDict({str(r): FromRGB(self.channels(r), self.cfg.negative_slope)})
        self.to_rgb = nn.ModuleDict({str(r): ToRGB(self.channels(r))})

    @property
    def fade_alpha(self) -> float:
        return self._fade_alpha

    @fade_alpha.setter
    def fade_alpha(self, value: float) -> None:
        if float(value) != self._fade_alpha:  # set every step, changed only during a fade
            self._fade_alpha = float(value)
            self.fade_alpha_tensor.fill_(self._fade_alpha)  # no host sync: a scalar written on the device

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` every encoder and decoder block and the bottleneck, in place (train.compile
        "blocks"): small graphs with static shapes per stage, no custom op inside. Blocks compiled
        before are kept; call again after :meth:`grow` for the new ones."""
        for block in (*self.encoder.values(), self.bottleneck, *self.decoder.values()):
            if getattr(block, "_compiled_call_impl", None) is None:
                block.compile(**compile_kwargs)

    @property
    def fading(self) -> bool:
        """True while the previous stage's from-RGB is kept for the input fade."""
        return str(self.resolution // 2) in self.from_rgb

    def grow(self, input_fade: bool = False) -> None:
        """Double the resolution: one new encoder and decoder block at 2R, new from/to-RGB.

        Trained weights are kept; the old from-RGB and to-RGB are dropped, unless ``input_fade`` keeps
        the from-RGB (and, with ``model.output_fade``, the to-RGB) for the fade (``fade_alpha`` then
        starts at 0; the trainer raises it).
        New modules get the device, dtype and memory format of the existing ones. Rebuild
        optimisers afterwards.
        """
        if self.resolution >= MAX_RESOLUTION:
            raise RuntimeError(f"generator is already at the top resolution {MAX_RESOLUTION}; cannot grow")
        ref = self.bottleneck.conv2.conv.weight
        old = set(dict(self.named_modules()))
        previous_from_rgb = self.from_rgb[str(self.resolution)]
        previous_to_rgb = self.to_rgb[str(self.resolution)]
        self._add_blocks(self.resolution * 2)
        self._set_rgb(self.resolution)
        if input_fade:
            self.from_rgb[str(self.resolution // 2)] = previous_from_rgb
            if self.cfg.output_fade:
                self.to_rgb[str(self.resolution // 2)] = previous_to_rgb
        self.fade_alpha = 0.0 if input_fade else 1.0
        fmt = torch.channels_last if ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last) \
            and not ref.is_contiguous() else torch.contiguous_format
        for name, m in self.named_modules():
            if name not in old or name.startswith(("from_rgb", "to_rgb")):
                m.to(device=ref.device, dtype=ref.dtype)
                for p in m.parameters(recurse=False):
                    if p.dim() == 4:
                        p.data = p.data.contiguous(memory_format=fmt)
        self.train(self.training)
        log.debug("generator grown to %d px (%d parameters)", self.resolution,
                 sum(p.numel() for p in self.parameters()))

    def add_input_fade(self, output: Optional[bool] = None) -> None:
        """Add the fade's from-RGB at R/2 (untrained) to a generator built at R, and its to-RGB at R/2
        when ``output`` (default ``model.output_fade``), so that a checkpoint written during a fade
        loads into it."""
        if self.resolution == self.base or self.fading:
            raise RuntimeError(f"no input fade to add at {self.resolution} px (base {self.base} or already fading)")
        ref = self.bottleneck.conv2.conv.weight
        half = self.resolution // 2
        self.from_rgb[str(half)] = FromRGB(self.channels(half), self.cfg.negative_slope).to(ref.device, ref.dtype)
        if self.cfg.output_fade if output is None else output:
            self.to_rgb[str(half)] = ToRGB(self.channels(half)).to(ref.device, ref.dtype)

    @property
    def fade_prefixes(self) -> tuple[str, str]:
        """State-dict key prefixes of the fade's from-RGB and to-RGB (at R/2): never exported."""
        half = self.resolution // 2
        return f"from_rgb.{half}.", f"to_rgb.{half}."

    def add_fade_like(self, state: dict) -> None:
        """Add the fade's modules that ``state`` (a checkpoint's generator state) holds, if any."""
        from_rgb, to_rgb = self.fade_prefixes
        if any(k.startswith(from_rgb) for k in state):
            self.add_input_fade(output=any(k.startswith(to_rgb) for k in state))

    def inference_state_dict(self) -> dict:
        """The state dict without the fade's from-RGB and to-RGB: what :meth:`from_arch` builds and an
        export holds."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.fade_prefixes)}

    def arch(self) -> dict:
        """Everything needed to rebuild this architecture: {"model": asdict(cfg), "resolution": R}."""
        return {"model": dataclasses.asdict(self.cfg), "resolution": self.resolution}

    @classmethod
    def from_arch(cls, d: dict) -> "Generator":
        """Build an (untrained) generator from :meth:`arch` output; load a state dict into it."""
        try:
            cfg = ModelConfig(**d["model"])
            resolution = int(d["resolution"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad generator architecture dict ({e}); expected keys 'model' and 'resolution'") from None
        return cls(cfg, resolution)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.checkpointing = bool(enabled)

    # ------------------------------------------------------------------ forward
    def _run(self, block: nn.Module, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return _checkpointed(block, *args)
        return block(*args)

    def pose_maps(self, kp: torch.Tensor, dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """Heatmaps (B, 18, s, s) keyed by map side s: 32 always, plus 64..R with pose_at_every_scale."""
        R, b = self.resolution, self.cfg.bottleneck_size
        sides = [b]
        if self.cfg.pose_at_every_scale:
            sides += [self.base * 2 ** i for i in range(int(math.log2(R // self.base)) + 1)]
        sigmas = [pose.default_sigma(s, self.cfg.pose_sigma, b) for s in sides]
        maps = ops.heatmaps_multi(kp, (R, R), [(s, s) for s in sides], sigmas, impl=self.impl, dtype=dtype)
        return dict(zip(sides, maps))

    def forward(self, reference: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        R = self.resolution
        if reference.dim() != 4 or reference.shape[1] != 3 or reference.shape[2] != R or reference.shape[3] != R:
            raise ValueError(f"reference must be (B, 3, {R}, {R}) for a {R}-px generator, got {tuple(reference.shape)}")
        K = self.cfg.num_keypoints
        if kp.dim() != 3 or kp.shape[0] != reference.shape[0] or kp.shape[1] != K or kp.shape[2] != 2:
            raise ValueError(f"kp must be (B={reference.shape[0]}, {K}, 2) (y, x) pixels, got {tuple(kp.shape)}")
        if kp.device != reference.device:  # keypoints often come from the CPU data pipeline: one small copy
            kp = kp.to(reference.device)
        x = self.from_rgb[str(R)](reference)
        maps = self.pose_maps(kp, x.dtype)
        skips = {}
        r = R
        if self.fading:
            # Always both paths (a zero weight still gives zero gradients: no unused parameters).
            # The top skip fades in too: at alpha 0 the new decoder block learns from the deep path.
            alpha = self.fade_alpha_tensor.to(x.dtype)
            skips[R] = self._run(self.encoder[str(R)], x)
            old = self.from_rgb[str(R // 2)](F.avg_pool2d(reference, 2))
            x = alpha * F.avg_pool2d(skips[R], 2) + (1 - alpha) * old
            skips[R] = alpha * skips[R]
            r = R // 2
        while r >= self.base:
            skips[r] = self._run(self.encoder[str(r)], x)
            x = F.avg_pool2d(skips[r], 2)
            r //= 2
        x = self._run(self.bottleneck, x, maps[self.cfg.bottleneck_size])
        r = self.base
        while r <= R:
            below = x  # decoder[R/2]'s output when r reaches R: the output fade's old path
            if self.cfg.pose_at_every_scale:
                x = self._run(self.decoder[str(r)], x, skips[r], maps[r])
            else:
                x = self._run(self.decoder[str(r)], x, skips[r])
            r *= 2
        old_to_rgb = self.to_rgb[str(R // 2)] if str(R // 2) in self.to_rgb else None
        if old_to_rgb is None:
            return self.to_rgb[str(R)](x)
        # The output fade, before the tanh: at alpha 0 exactly the previous stage's output, upsampled.
        alpha = self.fade_alpha_tensor.to(x.dtype)
        old = F.interpolate(old_to_rgb.conv(below), scale_factor=2.0, mode="nearest")
        return torch.tanh(alpha * self.to_rgb[str(R)].conv(x) + (1 - alpha) * old)
