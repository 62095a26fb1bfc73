"""Launched by tests/test_train_deepspeed.py and tests/test_multinode.py on 2 CPU ranks (gloo).

One launch runs several short scenarios (each DeepSpeed engine start is the expensive part; one
launch amortises the interpreter and DeepSpeed imports). Scenarios, ``--scenarios a,b,...``:

growth   ZeRO-2 bf16, 64 -> 128 px (one growth, DeepSpeed re-initialised, discriminator engine at
         128, input fade): an uninterrupted run, and a run stopped at global step 3 (a checkpoint
         by every rank, inside the fade) then resumed with ``--resume auto``; both must agree.
zero1    configs/ds/zero1g_zero2d_bf16.json: the generator under ZeRO-1, the local discriminators (on
         at 64 px here) under ZeRO-2, bf16, 2 steps.
zero3    ZeRO-3 bf16, 64 px, 2 steps (parameters partitioned: the export gathers them).
fp16     ZeRO-2 fp16 autocast with DeepSpeed's GradScaler, 64 px: stopped at step 2 and resumed
         (the loss scale travels in the checkpoint), compared with an uninterrupted run.

Every rank reports on its OWN training module (the object the engine trains, not a gathered copy):
a hash of its parameters (ZeRO-1/2: the full replicas; ZeRO-3: its own partition is all it has,
so parameters there are compared after gathering) and of its buffers, and the dtypes of both. The
hashes are all-gathered, so "equal across ranks" is a check that can fail. Rank 0 writes the JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hptransfer import checkpoint as ckpt
from hptransfer.config import load_config
from hptransfer.train import train

ROOT = Path(__file__).resolve().parents[1]
DS = ROOT / "configs" / "ds"
BASE = ["model.width=0.03125", "model.disc_channels=4", "loss.vgg_weights=random", "loss.layers=[relu1_2]",
        "train.impl=reference", "train.tensorboard=false", "train.sample_every=0", "train.log_every=1",
        "data.workers=0", "data.flip=false", "train.deterministic=true"]


def _hash(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _own_state(module, zero3: bool) -> dict:
    """Hashes and dtypes of this rank's own module (ZeRO-3: buffers only; its parameters are shards)."""
    params = [] if zero3 else list(module.named_parameters())
    buffers = list(module.named_buffers())
    return {"params": _hash(params), "buffers": _hash(buffers),
            "param_dtypes": sorted({str(p.dtype) for _, p in module.named_parameters()}),
            "bn_buffer_dtypes": sorted({str(b.dtype) for n, b in buffers if "running_" in n}),
            "bn_class": sorted({type(m).__name__ for m in module.modules() if "BatchNorm" in type(m).__name__})}


def _gathered(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _export_diff(export_dir: Path, state: dict) -> float:
    """Largest difference between the exported weights (and BatchNorm statistics) and the final state."""
    from safetensors.torch import load_file

    exported = load_file(str(Path(export_dir) / "model.safetensors"))
    top = max(int(k.split(".")[1]) for k in state if k.startswith("encoder."))
    fade = (f"from_rgb.{top // 2}.", f"to_rgb.{top // 2}.")  # the fade's modules: never exported
    missing = [k for k in state if not k.startswith(fade) and k not in exported]
    assert not missing and not any(k.startswith(fade) for k in exported), f"export misses weights: {missing}"
    return max((exported[k].double() - state[k].double()).abs().max().item() for k in exported)


def _run(cfg, ds_config, **kw):
    """train() plus this rank's own-module report after the last step (and its parameter hash after each)."""
    seen, steps = {}, []
    zero3 = json.loads(Path(ds_config).read_text()).get("zero_optimization", {}).get("stage") == 3

    def record(info):
        seen["module"] = info["generator"]
        seen["zero_stages"] = [e.engine.zero_optimization_stage() if e is not None else None
                               for e in (info["generator_engine"], info["discriminator_engine"])]
        steps.append(_hash(info["generator"].named_parameters()))

    result = train(cfg, ds_config=str(ds_config), callback=record, **kw)
    own = _own_state(seen["module"], zero3) if "module" in seen else None
    if own is not None:
        own["step_hashes"] = steps
        own["zero_stages"] = seen["zero_stages"]
    return result, own


def _cfg(out: Path, data: str, stages: str, *extra: str):
    return load_config(None, [*BASE, f"data.root={data}", f"train.out_dir={out}", f"stages={stages}", *extra])


def scenario_growth(args) -> dict:
    stages = "[{resolution: 64, iterations: 2, batch_size: 2}, {resolution: 128, iterations: 2, batch_size: 2}]"
    extra = ("model.input_fade=0.5", "model.output_fade=true", "loss.disc_at_resolution=128", "train.checkpoint_every=2")
    ds = DS / "zero2_bf16.json"
    full, full_own = _run(_cfg(Path(args.out) / "growth_full", args.data, stages, *extra), ds)
    out = Path(args.out) / "growth"
    first, _ = _run(_cfg(out, args.data, stages, *extra), ds, stop_at_step=3)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    second, own = _run(_cfg(out, args.data, stages, *extra), ds, resume="auto")
    final = ckpt.read_latest(out / "checkpoints")
    state = second["generator_state"]
    return {"first_stopped": first["stopped"], "first_step": first["global_step"], "latest_after_first": latest,
            "second_step": second["global_step"], "second_stopped": second["stopped"],
            "resume_vs_full": _max_diff(full["generator_state"], state),
            "export_vs_state": _export_diff(second["export"], state),
            "own": _gathered(own), "own_full": _gathered(full_own),
            "resolution_keys": sorted({k.split(".")[1] for k in state if k.startswith("encoder.")}),
            "from_rgb_keys": sorted(k for k in state if k.startswith("from_rgb.")),
            "to_rgb_keys": sorted(k for k in state if k.startswith("to_rgb.")),
            "final_files": sorted(str(f.relative_to(final)) for f in final.rglob("*") if f.is_file()),
            "export": str(second["export"])}


def _short(args, name: str, ds_name: str, iterations: int = 2, *extra: str) -> dict:
    stages = f"[{{resolution: 64, iterations: {iterations}, batch_size: 2}}]"
    result, own = _run(_cfg(Path(args.out) / name, args.data, stages, *extra), DS / ds_name)
    state = result["generator_state"]
    return {"step": result["global_step"], "skipped": result["skipped"], "own": _gathered(own),
            "export_vs_state": _export_diff(result["export"], state),
            "finite": all(bool(torch.isfinite(v.float()).all()) for v in state.values()), "state": state}


def scenario_fp16(args) -> dict:
    stages = "[{resolution: 64, iterations: 3, batch_size: 2}]"
    ds = DS / "zero2_fp16.json"
    full, own = _run(_cfg(Path(args.out) / "fp16_full", args.data, stages), ds)
    out = Path(args.out) / "fp16"
    _run(_cfg(out, args.data, stages), ds, stop_at_step=2)
    stopped = ckpt.read_latest(out / "checkpoints")
    client = torch.load(stopped / "generator" / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    resumed, _ = _run(_cfg(out, args.data, stages), ds, resume="auto")
    return {"step": resumed["global_step"], "own": _gathered(own), "saved_scale": float(client["grad_scaler"]["scale"]),
            "resume_vs_full": _max_diff(full["generator_state"], resumed["generator_state"]),
            "export_vs_state": _export_diff(resumed["export"], resumed["generator_state"]),
            "finite": all(bool(torch.isfinite(v.float()).all()) for v in full["generator_state"].values())}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--scenarios", default="growth")
    p.add_argument("--local_rank", type=int, default=None)  # passed by the launcher
    args = p.parse_args()
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ["HPTRANSFER_NO_BAR"] = "1"
    report = {"env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}}
    scenarios = {"growth": scenario_growth, "fp16": scenario_fp16,
                 # the generator under ZeRO-1, the discriminators (on at 64 px here) under ZeRO-2
                 "zero1": lambda a: _short(a, "zero1", "zero1g_zero2d_bf16.json", 2, "loss.disc_at_resolution=64"),
                 "zero3": lambda a: _short(a, "zero3", "zero3_bf16.json")}
    for name in args.scenarios.split(","):
        t0 = time.perf_counter()
        r = scenarios[name](args)
        r.pop("state", None)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        report[name] = r
        logging.getLogger("ds_smoke").warning("scenario %s done in %.0f s", name, r["seconds"])
    report["world_size"] = dist.get_world_size()
    report["envs"] = _gathered(report.pop("env"))
    if rank == 0:
        Path(args.result).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()  # a clean shutdown: gloo's threads must not outlive the interpreter
    return 0


if __name__ == "__main__":
    sys.exit(main())
