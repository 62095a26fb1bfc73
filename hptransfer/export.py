"""Export a trained generator, and the ``hptransfer export`` command.

- ``export_generator`` writes ``model.safetensors`` + ``config.json`` (architecture, resolution,
  keypoint convention); ``load_generator`` rebuilds it with no training code and no unpickling.
- ``hptransfer export --format onnx|torchscript|safetensors`` writes a fixed-resolution file.
  ONNX and TorchScript take ``(reference (B,3,R,R) in [-1,1], kp (B,18,2) (y,x) pixels)``; the
  heatmaps are made inside with the dense torch formula (``impl="reference"``), which traces to
  plain tensor ops (no Triton kernel in the graph).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from hptransfer._version import __version__
from hptransfer.checkpoint import FORMAT_VERSION, export_dir, read_export_config, write_dir_atomically
from hptransfer.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

KEYPOINT_CONVENTION = "openpose18 (y, x) pixels; missing = (-1, -1)"


def export_generator(generator, out_dir: str | Path, extra: Optional[dict] = None) -> Path:
    """Write ``generator`` (a :class:`hptransfer.models.Generator`) to ``out_dir``.

    ``model.safetensors`` holds the state dict (fp32 weights and BatchNorm buffers); ``config.json``
    holds ``generator.arch()``, the resolution, the keypoint convention, the image range [-1, 1],
    the hptransfer version and ``extra``. Both are written into a temporary sibling directory that
    then replaces ``out_dir``; if anything fails the previous export stays in place. Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                 for k, v in generator.inference_state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = {"format_version": FORMAT_VERSION, "arch": generator.arch(), "resolution": int(generator.resolution),
                "keypoints": KEYPOINT_CONVENTION, "image_range": [-1, 1],
                "hptransfer_version": __version__, "extra": extra or {}}
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))

    return write_dir_atomically(out_dir, fill)


def load_generator(path: str | Path, device: str | torch.device = "cpu"):
    """Load an export directory (or a training run's ``export/``: :func:`hptransfer.checkpoint.export_dir`)
    into a Generator in eval mode on ``device``.

    Only safetensors and JSON are read (nothing is unpickled). Raises FileNotFoundError naming
    the missing file, ValueError when weights and architecture disagree.
    """
    from safetensors.torch import load_file

    from hptransfer.models import Generator

    path = export_dir(path)
    meta = read_export_config(path)
    g = Generator.from_arch(meta["arch"])
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors' own error type: a truncated or foreign file
        raise CheckpointError(f"{path / 'model.safetensors'}: unreadable ({e})") from None
    try:
        g.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the architecture in config.json: {e}") from None
    return g.to(device).eval()


@torch.no_grad()
def generate(generator, reference: torch.Tensor, kp: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``reference`` (B, 3, R, R) float in [-1, 1], ``kp`` (B, 18, 2) (y, x) pixels of the R x R target
    -> (B, 3, R, R) float in [-1, 1] on the generator's device. ``impl`` picks the heatmap path.

    Runs in eval mode (BatchNorm running statistics); the generator's mode, ``impl`` and buffers
    are as given afterwards (a train-mode forward would update the running statistics)."""
    was_training, own_impl = generator.training, generator.impl
    p = next(generator.parameters())
    try:
        generator.eval()
        generator.impl = impl
        return generator(reference.to(p.device, p.dtype), kp.to(p.device).float())
    finally:
        generator.impl = own_impl
        generator.train(was_training)


class _Traceable(torch.nn.Module):
    """A CPU copy of the generator with reference heatmaps, so tracing records plain tensor ops and the
    caller's generator keeps its device, mode and ``impl``."""

    def __init__(self, generator):
        super().__init__()
        self.generator = copy.deepcopy(generator).cpu().eval()
        self.generator.impl = "reference"
        # eval here too: exporters restore the wrapper's mode afterwards, and a wrapper left in
        # train mode would flip the generator's BatchNorm to batch statistics
        self.eval()

    def forward(self, reference: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        return self.generator(reference, kp)


def example_inputs(resolution: int, batch: int = 1, seed: int = 0):
    """A random reference (B,3,R,R) in [-1,1] and plausible keypoints (B,18,2), one missing."""
    gen = torch.Generator().manual_seed(seed)
    ref = torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1
    kp = torch.rand(batch, 18, 2, generator=gen) * (resolution - 1)
    kp[:, 17] = -1
    return ref, kp


def _atomic_target(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    return Path(tmp)


def export_onnx(generator, out: str | Path, batch: int = 1, opset: int = 17, dynamic_batch: bool = True) -> Path:
    """Write an ONNX graph of ``generator`` at its resolution; inputs ``reference``, ``keypoints``, output ``image``."""
    out = Path(out)
    module = _Traceable(generator)
    ref, kp = example_inputs(generator.resolution, batch)
    tmp = _atomic_target(out)
    try:
        axes = {"reference": {0: "batch"}, "keypoints": {0: "batch"}, "image": {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(module, (ref, kp), str(tmp), input_names=["reference", "keypoints"], output_names=["image"],
                          opset_version=opset, dynamic_axes=axes, dynamo=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_torchscript(generator, out: str | Path, batch: int = 1) -> Path:
    """Write a traced TorchScript module (loadable with ``torch.jit.load`` alone)."""
    out = Path(out)
    module = _Traceable(generator)
    ref, kp = example_inputs(generator.resolution, batch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jit.trace deprecation; still the portable format
        traced = torch.jit.trace(module, (ref, kp), check_trace=False)
    tmp = _atomic_target(out)
    try:
        traced.save(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def onnx_max_abs_diff(generator, onnx_path: str | Path, batch: int = 2, seed: int = 1) -> float:
    """Run the ONNX file in onnxruntime and the generator in PyTorch on the same inputs; max |diff|."""
    import onnxruntime as ort

    ref, kp = example_inputs(generator.resolution, batch, seed)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["image"], {"reference": ref.numpy(), "keypoints": kp.numpy()})[0]
    want = generate(copy.deepcopy(generator).cpu(), ref, kp, impl="reference").numpy()  # CPU, like onnxruntime
    return float(abs(got - want).max())


def resolve_source(path: str | Path, prefer_export: bool = False) -> tuple:
    """(kind, directory, metadata) of what a generator loads from: ``"export"`` (its config.json), or a
    training checkpoint's meta.json, ``"single"`` (generator.pt) or ``"deepspeed"`` (DeepSpeed's
    ``generator/`` shards), given as the ``step_*`` directory, a checkpoints root whose ``latest`` names
    one, or a run directory holding that root. FileNotFoundError when it is none of these.

    A run directory means its newest weights (the latest checkpoint), as ``export`` and ``--init-from``
    take it; with ``prefer_export`` (``infer``, ``eval``, ``video``) it means its ``export/`` when there is
    one (the last finished stage's network, safetensors: nothing unpickled), said in the log."""
    from hptransfer import checkpoint as ckpt

    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return "export", path, read_export_config(path)
    no_export = None
    if prefer_export and not (path / "meta.json").is_file():
        try:
            exported = export_dir(path)  # a run directory's export/ (logged), else the error says what is missing
        except FileNotFoundError as e:
            no_export = e
        else:
            return "export", exported, read_export_config(exported)
    if not (path / "meta.json").is_file():
        latest = (ckpt.read_latest(path) or ckpt.read_latest(path / "checkpoints")) if path.is_dir() else None
        if latest is None:
            raise no_export or FileNotFoundError(
                f"{path}: neither an export (config.json + model.safetensors) nor a training checkpoint (meta.json, "
                "or a checkpoint root or run directory with 'latest')")
        path = Path(latest)
    meta = ckpt.read_meta(path)
    if "arch" not in meta:
        raise CheckpointError(f"{path / 'meta.json'}: no 'arch' entry")
    if (path / "generator.pt").is_file():
        return "single", path, meta
    if (path / "generator").is_dir():
        return "deepspeed", path, meta
    raise FileNotFoundError(f"{path}: a checkpoint without generator weights (no generator.pt, no DeepSpeed "
                            "generator/ folder)")


def _checkpoint_state(path: Path, kind: str) -> dict:
    """The generator's fp32 state dict (weights and BatchNorm buffers) of a training checkpoint, on the CPU."""
    if kind == "deepspeed":  # every rank's ZeRO shards gathered, no process group
        from hptransfer.distributed.reshard import consolidated_state_dict

        try:
            return consolidated_state_dict(path, "generator")
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # a truncated or foreign shard
            raise CheckpointError(f"{path / 'generator'}: unreadable DeepSpeed checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    weights = path / "generator.pt"
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a truncated or foreign file
        raise CheckpointError(f"{weights}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return state["model"] if "model" in state else state


def load_any(path: str | Path, device="cpu", prefer_export: bool = False):
    """A generator in eval mode from an export directory or a training checkpoint (see
    :func:`resolve_source`): single-process (``generator.pt``, read with ``weights_only=True``) or DeepSpeed
    (every ZeRO stage, any number of ranks: the fp32 master weights and buffers gathered on the CPU by
    DeepSpeed's zero_to_fp32, which unpickles: read checkpoints you wrote). A checkpoint from inside
    the input fade is refused (its network needs the fade's old paths)."""
    from hptransfer.models import Generator

    kind, path, meta = resolve_source(path, prefer_export)
    if kind == "export":
        return load_generator(path, device)
    state = _checkpoint_state(path, kind)
    g = Generator.from_arch(meta["arch"])
    fade = g.fade_prefixes
    if any(k.startswith(fade) for k in state):  # written during a grown stage with the input fade
        alpha = meta.get("fade_alpha")
        if alpha != 1.0:
            where = (f"inside the input fade (alpha {alpha})" if alpha is not None else
                     "in a stage with the input fade, by a version that did not record the fade's alpha (so whether "
                     "the fade had ended is unknown)")
            raise CheckpointError(
                f"{path}: written {where}; while the fade runs the generator still blends in the previous stage's "
                "path, and an export holds the network without it. Export a checkpoint written after the fade, or "
                "use the run's export/ folder (written at every stage end)")
        state = {k: v for k, v in state.items() if not k.startswith(fade)}  # alpha 1: the old paths are off
    try:
        g.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the architecture in meta.json: {e}") from None
    log.info("loaded the %d-px generator of %s checkpoint %s", g.resolution,
             "a DeepSpeed" if kind == "deepspeed" else "a single-process", path)
    return g.to(device).eval()


# ---------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="export directory, or a training checkpoint, single-process or DeepSpeed (step_* dir, its "
                        "root, or the run directory)")
    p.add_argument("--format", required=True, choices=["safetensors", "onnx", "torchscript"])
    p.add_argument("--resolution", type=int, default=None,
                   help="check the model's resolution (exports are fixed-resolution; a model is not resized)")
    p.add_argument("--out", required=True, help="output file (.onnx / .pt) or directory (safetensors)")
    p.add_argument("--batch", type=int, default=1, help="example batch used for tracing")
    p.add_argument("--opset", type=int, default=17)


def run(args) -> int:
    from hptransfer import flow_task

    if flow_task.is_flow_export(args.checkpoint):  # an appearance flow network (task: garment_flow)
        return flow_task.run_export(args)
    g = load_any(args.checkpoint)
    if args.resolution is not None and args.resolution != g.resolution:
        raise InputError(f"{args.checkpoint} holds a {g.resolution}-px generator; --resolution {args.resolution} "
                         "would need a generator trained to that stage")
    if args.format == "safetensors":
        out = export_generator(g, args.out, extra={"exported_from": str(args.checkpoint)})
        load_generator(out)
        print(f"wrote {out} (loads with hptransfer.load_generator)")
    elif args.format == "onnx":
        out = export_onnx(g, args.out, args.batch, args.opset)
        diff = onnx_max_abs_diff(g, out)
        print(f"wrote {out}; onnxruntime vs PyTorch max abs difference: {diff:.3g}")
    else:
        out = export_torchscript(g, args.out, args.batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            m = torch.jit.load(str(out))
        ref, kp = example_inputs(g.resolution, 2, 1)
        with torch.no_grad():
            diff = float((m(ref, kp) - generate(g, ref, kp, impl="reference")).abs().max())
        print(f"wrote {out}; torch.jit.load round trip max abs difference: {diff:.3g}")
    return 0
