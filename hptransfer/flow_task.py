"""The ``task: garment_flow`` pieces the trainer (:mod:`hptransfer.train`) calls instead of the
generator's: model, dataset, one training step, sample grids, export (safetensors + config.json, ONNX).
The network, its losses and its training pairs are ours (the paper's Fig. 9 gives only the flow
network's inputs and the bilinear sampling; docs/garment.md).

Training uses the trainer as it is (config, stages, checkpoints, exact resume, DeepSpeed engines,
progress, TensorBoard, sample grids): ``hptransfer train --config configs/garment_flow.yaml``. A stage's
resolution is the flow network's working size; ``grow()`` keeps the weights (flows are resolution-free).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from hptransfer._version import __version__
from hptransfer.checkpoint import FORMAT_VERSION, export_dir, read_export_config, write_dir_atomically
from hptransfer.errors import CheckpointError, InputError
from hptransfer.flow_losses import flow_loss
from hptransfer.step import read_nonfinite

log = logging.getLogger(__name__)

TASK = "garment_flow"
BATCH_KEYS = ("garment", "source_mask", "target_region", "target_mask", "target", "source", "kp_source", "kp_target")
INPUTS = ("garment", "source_mask", "target_region", "kp_source", "kp_target")


def build_model(cfg, resolution: int, state: Optional[dict] = None):
    from hptransfer.models import AppearanceFlow

    f = cfg.flow
    model = AppearanceFlow(resolution, levels=f.levels, channels=f.channels, max_channels=f.max_channels,
                           num_keypoints=cfg.model.num_keypoints, pose_sigma=cfg.model.pose_sigma)
    if state is not None:
        model.load_state_dict(state)
    model.impl = cfg.train.impl
    return model


def dataset(cfg, split: str, resolution: int, flip: bool):
    from hptransfer.data.garment_pairs import GarmentFlowDataset

    return GarmentFlowDataset(cfg.data.root, split, resolution, numbering=cfg.flow.numbering,
                              parsing_dir=cfg.flow.parsing_dir, flip=flip, fit=cfg.data.fit,
                              skip_bad=cfg.data.skip_bad, seed=cfg.train.seed)


def to_device(batch: dict, backend) -> dict:
    dev, dt = backend.device, backend.input_dtype
    return {k: batch[k].to(dev, non_blocking=True).float() if k.startswith("kp_")
            else batch[k].to(dev, non_blocking=True).to(dt) for k in BATCH_KEYS}


def train_step(engine, model, vgg, cfg, batch: dict, backend, *,
               loss_hook: Optional[Callable[[dict, dict], dict]] = None, info: Optional[dict] = None,
               agree: Optional[torch.Tensor] = None) -> dict:
    """One iteration of the flow network: forward, losses, backward, optimiser step; a non-finite loss
    skips the step on every rank. Same arguments (``agree``) and return shape as
    :func:`hptransfer.step.train_step` ("fake" is the warped garment)."""
    b = to_device(batch, backend)
    out = engine(*(b[k] for k in INPUTS))
    with backend.loss_autocast():
        terms = flow_loss(out, b, vgg, cfg.flow, cfg.loss.layer_weights)
    if loss_hook is not None:
        terms = loss_hook(terms, info or {})
    skipped, *agreed = read_nonfinite(backend, terms["total"], agree=agree)
    if skipped:
        engine.skip(terms["total"])
    else:
        engine.backward(terms["total"])
        engine.step()
    return {"terms": terms, "d_loss": None, "skipped": skipped, "d_skipped": False, "agreed": agreed,
            "fake": out["warped"].detach()}


def sample_batch(cfg, resolution: int, n: int = 4) -> dict:
    """Up to ``n`` pairs spread over the test split (train when there is none), unflipped."""
    for split in (cfg.data.test_split, cfg.data.train_split):
        try:
            ds = dataset(cfg, split, resolution, flip=False)
        except (FileNotFoundError, OSError, ValueError):
            continue
        picks = sorted({round(i * (len(ds) - 1) / max(n - 1, 1)) for i in range(n)}) if len(ds) else []
        items = [ds[i] for i in picks]
        if items:
            return {k: torch.stack([it[k] for it in items]) for k in BATCH_KEYS}
    return {}


# ---------------------------------------------------------------- pictures

def flow_to_color(flow: torch.Tensor, max_pixels: Optional[float] = None) -> np.ndarray:
    """(2, H, W) normalised flow -> (H, W, 3) uint8 colour wheel: hue = direction, saturation = length
    (relative to ``max_pixels``, default the longest vector); white = no motion."""
    import colorsys

    f = flow.detach().float().cpu()
    h, w = f.shape[-2:]
    dx, dy = (f[0] * w / 2).numpy(), (f[1] * h / 2).numpy()
    mag = np.hypot(dx, dy)
    top = max_pixels or max(float(mag.max()), 1e-6)
    hue = (np.arctan2(dy, dx) / (2 * np.pi)) % 1.0
    sat = np.clip(mag / top, 0, 1)
    rgb = np.vectorize(lambda a, s: colorsys.hsv_to_rgb(a, s, 1.0), otypes=[float, float, float])(hue, sat)
    return (np.stack(rgb, -1) * 255).round().astype(np.uint8)


def mask_to_rgb(mask: torch.Tensor) -> np.ndarray:
    """(1, H, W) in [0, 1] -> (H, W, 3) uint8 grey."""
    m = (mask.detach().float().cpu()[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return np.repeat(m[..., None], 3, -1)


def image_to_rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    from hptransfer.images import to_uint8

    return to_uint8(image[None])[0].permute(1, 2, 0).cpu().numpy()


def save_grid(path, rows: list[list[np.ndarray]], pad: int = 2, labels=None) -> Path:
    """Rows of equal-size (H, W, 3) uint8 cells as one PNG: :func:`hptransfer.images.save_grid`."""
    from hptransfer.images import save_grid as write

    return write(path, rows, labels, pad)


SAMPLE_COLUMNS = ("source", "garment", "target region", "flow", "warped", "target garment")


@torch.no_grad()
def write_samples(model, samples: dict, path) -> Path:
    """Rows of: source | garment | target region | flow | warped | target garment (ground truth)."""
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    out = model(*(samples[k].to(p.device, p.dtype if not k.startswith("kp_") else torch.float32) for k in INPUTS))
    model.train(was_training)
    rows = []
    for i in range(samples["garment"].shape[0]):
        tgt = samples["target"][i] * samples["target_mask"][i]
        rows.append([image_to_rgb(samples["source"][i]), image_to_rgb(samples["garment"][i]),
                     mask_to_rgb(samples["target_region"][i]), flow_to_color(out["flow"][i]),
                     image_to_rgb(out["warped"][i].cpu()), image_to_rgb(tgt)])
    return save_grid(path, rows, labels=SAMPLE_COLUMNS)


# ---------------------------------------------------------------- export

def export_flow(model, out_dir, extra: Optional[dict] = None) -> Path:
    """``model.safetensors`` + ``config.json`` (task, arch, resolution) into ``out_dir``, atomically."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.inference_state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = {"format_version": FORMAT_VERSION, "task": TASK, "arch": model.arch(),
                "resolution": int(model.resolution),
                "keypoints": "openpose18 (y, x) pixels; missing = (-1, -1)", "image_range": [-1, 1],
                "flow_units": "grid_sample normalised offsets (x, y), align_corners=False",
                "hptransfer_version": __version__, "extra": extra or {}}
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))

    return write_dir_atomically(out_dir, fill)


def is_flow_export(path) -> bool:
    p = Path(path) / "config.json"
    try:
        return p.is_file() and json.loads(p.read_text()).get("task") == TASK
    except (OSError, json.JSONDecodeError):
        return False


def load_flow(path, device="cpu"):
    """An exported flow network in eval mode (safetensors + JSON only; nothing unpickled)."""
    from safetensors.torch import load_file

    from hptransfer.models import AppearanceFlow

    path = export_dir(path)
    meta = read_export_config(path)
    if meta.get("task") != TASK:
        raise CheckpointError(f"{path}: not an appearance flow export (task {meta.get('task', 'transfer')!r}); "
                              "train one with a config that sets task: garment_flow")
    model = AppearanceFlow.from_arch(meta["arch"])
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    except Exception as e:  # safetensors' errors or a shape mismatch
        raise CheckpointError(f"{path}: weights unreadable or not matching config.json ({e})") from None
    return model.to(device).eval()


class _Traceable(torch.nn.Module):
    """A CPU copy with the dense heatmap formula, returning a tuple (warped, warped_mask, flow)."""

    def __init__(self, model):
        super().__init__()
        self.model = copy.deepcopy(model).cpu().eval()
        self.model.impl = "reference"
        self.eval()

    def forward(self, garment, source_mask, target_region, kp_source, kp_target):
        out = self.model(garment, source_mask, target_region, kp_source, kp_target)
        return out["warped"], out["warped_mask"], out["flow"]


def example_inputs(resolution: int, batch: int = 1, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    R = resolution
    mask = (torch.rand(batch, 1, R, R, generator=g) > 0.5).float()
    return (torch.rand(batch, 3, R, R, generator=g) * 2 - 1, mask, 1 - mask,
            torch.rand(batch, 18, 2, generator=g) * (R - 1), torch.rand(batch, 18, 2, generator=g) * (R - 1))


def export_onnx(model, out, batch: int = 1, opset: int = 17) -> Path:
    """ONNX graph at the model's resolution; inputs as :data:`INPUTS`, outputs warped, warped_mask, flow."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    names = ["warped", "warped_mask", "flow"]
    try:
        torch.onnx.export(_Traceable(model), example_inputs(model.resolution, batch), tmp, input_names=list(INPUTS),
                          output_names=names, opset_version=opset, dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in list(INPUTS) + names})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def onnx_max_abs_diff(model, onnx_path, batch: int = 2, seed: int = 1) -> float:
    """onnxruntime vs PyTorch on the same random inputs: max |diff| over the three outputs."""
    import onnxruntime as ort

    inputs = example_inputs(model.resolution, batch, seed)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: t.numpy() for n, t in zip(INPUTS, inputs)})
    with torch.no_grad():
        want = _Traceable(model)(*inputs)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))


def run_export(args) -> int:
    """``hptransfer export`` for a flow export directory (safetensors or onnx)."""
    if args.format not in ("safetensors", "onnx"):
        raise InputError(f"{args.checkpoint}: an appearance flow network exports as safetensors or onnx, not "
                         f"{args.format}")
    model = load_flow(args.checkpoint)
    if args.resolution is not None and args.resolution != model.resolution:
        model.resolution = args.resolution  # resolution-free weights: any multiple of 2**levels
    if args.format == "safetensors":
        out = export_flow(model, args.out, extra={"exported_from": str(args.checkpoint)})
        load_flow(out)
        print(f"wrote {out} (loads with hptransfer.flow_task.load_flow)")
    elif args.format == "onnx":
        out = export_onnx(model, args.out, args.batch, args.opset)
        print(f"wrote {out}; onnxruntime vs PyTorch max abs difference: {onnx_max_abs_diff(model, out):.3g}")
    return 0
