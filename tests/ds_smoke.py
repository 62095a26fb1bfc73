"""Launched by tests/test_train_deepspeed.py and tests/test_multinode.py on 2 CPU ranks (gloo), and by
tests/test_reshard.py on 2 and on 1 rank at once.

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
reshard_write   every shipped configs/ds/*.json, 64 px: a checkpoint at step 1 under ``OUT/w<ranks>/``,
         and each engine's consolidated state at that moment (``live.pt``: fp32 weights, Adam's exp_avg
         and exp_avg_sq, the optimiser's step, the loss scale, buffers), gathered from the live engines
         with DeepSpeed's own accessors; then ``OUT/w<ranks>/DONE``.
reshard_resume  waits for the other launch's ``DONE`` (``--peer-ranks``), resumes each of its
         checkpoints on this number of ranks, records the engines' consolidated state right after the
         load (``loaded.pt``) and trains one more step.
accum    fp32 ZeRO-2, generator and discriminators, train.global_batch=4 with batch_size 2 and
         per-rank BatchNorm statistics: 1 rank accumulates 2 micro-batches, 2 ranks 1 each; step 1 is
         made non-finite on rank 0 (its whole window must be dropped); the final weights go to
         ``OUT/accum_w<ranks>.pt`` for the test to compare.

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


def _run(cfg, ds_config, extra_callback=None, **kw):
    """train() plus this rank's own-module report after the last step (and its parameter hash after each)."""
    seen, steps = {}, []
    zero3 = json.loads(Path(ds_config).read_text()).get("zero_optimization", {}).get("stage") == 3

    def record(info):
        if extra_callback is not None:
            extra_callback(info)
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


# ----------------------------------------------------------------------------- resharding, accumulation
def _consolidated(eng) -> dict:
    """One engine's state gathered from the LIVE engine (not from a file) with DeepSpeed's accessors, a
    collective under ZeRO-3: per parameter its fp32 master weight and Adam's exp_avg / exp_avg_sq; the
    optimiser's step counts, the loss scaler's state and the module's buffers."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"params": {}, "buffers": {n: b.detach().cpu().clone() for n, b in eng.module.named_buffers()}}
    for name, p in eng.module.named_parameters():
        out["params"][name] = {key: fn(p).detach().float().cpu().clone() for key, fn in (
            ("fp32", safe_get_full_fp32_param), ("exp_avg", lambda t: safe_get_full_optimizer_state(t, "exp_avg")),
            ("exp_avg_sq", lambda t: safe_get_full_optimizer_state(t, "exp_avg_sq")))}
    out["step"] = sorted({float(s["step"]) for s in eng.engine.optimizer.optimizer.state.values() if "step" in s})
    out["scaler"] = eng.scaler.state_dict() if eng.scaler is not None else None
    return out


def _world() -> int:
    """The launch's world size (known before train() forms the process group)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def _engines(info) -> dict:
    return {name: info[f"{name}_engine"] for name in ("generator", "discriminator") if info[f"{name}_engine"]}


def _ds_names(args) -> list:
    return sorted({p.name for pattern in args.ds_configs.split(",") for p in DS.glob(pattern)})


def _reshard_cfg(args, out: Path, name: str):
    both = "hptransfer_engines" in json.loads((DS / name).read_text())  # the discriminators train too
    return _cfg(out, args.data, "[{resolution: 64, iterations: 2, batch_size: 2}]", f"loss.vgg_weights={args.vgg}",
                *(["loss.disc_at_resolution=64"] if both else ["loss.descriptors=0"]))  # no local terms: faster


def scenario_reshard_write(args) -> dict:
    world = _world()
    root, report = Path(args.out) / f"w{world}", {}
    for name in _ds_names(args):
        live = {}

        def capture(info, live=live):  # after every step, so after the one the checkpoint follows
            live.update({n: _consolidated(e) for n, e in _engines(info).items()})

        out = root / Path(name).stem
        result, own = _run(_reshard_cfg(args, out, name), DS / name, capture, stop_at_step=1)
        if dist.get_rank() == 0:
            torch.save(live, out / "live.pt")
        report[name] = {"step": result["global_step"], "stopped": result["stopped"], "own": _gathered(own)}
    if dist.get_rank() == 0:
        (root / "DONE").write_text("ok")
    return report


def _wait_for(root: Path, timeout_s: float = 1800.0) -> None:
    t0 = time.monotonic()
    while not (root / "DONE").is_file():
        if (root / "FAILED").is_file():
            raise RuntimeError(f"the other launch failed: {(root / 'FAILED').read_text()}")
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"no {root / 'DONE'} after {timeout_s:.0f} s")
        time.sleep(1.0)


def scenario_reshard_resume(args) -> dict:
    import hptransfer.train as train_module

    world, peer = _world(), args.peer_ranks
    _wait_for(Path(args.out) / f"w{peer}")
    report, original = {}, train_module._load_checkpoint
    for name in _ds_names(args):
        loaded, t = {}, {}

        def load_and_capture(run, stage, ckpt_dir, loaded=loaded, t=t):
            t0 = time.perf_counter()
            original(run, stage, ckpt_dir)
            t["load_s"] = time.perf_counter() - t0
            loaded.update({n: _consolidated(e) for n, e in stage.engines.items()})

        train_module._load_checkpoint = load_and_capture
        try:
            source = Path(args.out) / f"w{peer}" / Path(name).stem / "checkpoints" / "step_00000001"
            out = Path(args.out) / f"r{world}" / Path(name).stem
            result, own = _run(_reshard_cfg(args, out, name), DS / name, resume=str(source))
        finally:
            train_module._load_checkpoint = original
        if dist.get_rank() == 0:
            torch.save(loaded, out / "loaded.pt")
        report[name] = {"step": result["global_step"], "own": _gathered(own), "load_s": round(t["load_s"], 2),
                        "finite": all(bool(torch.isfinite(v.float()).all())
                                      for v in result["generator_state"].values()),
                        "scratch_left": sorted(p.name for p in (out / "checkpoints").glob(".universal-*"))}
    return report


def scenario_accum(args) -> dict:
    """1 rank x 2 micro-batches or 2 ranks x 1, fp32, per-rank BatchNorm statistics; step 1 dropped."""
    world = _world()
    ds = Path(args.out) / f"fp32_zero2_w{world}_rank{os.environ.get('RANK', 0)}.json"  # each rank its own file
    ds.parent.mkdir(parents=True, exist_ok=True)
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto"}))
    final = {}

    def nan_on_rank0(terms, info):  # one micro-batch of step 1 on one rank: the whole step must go
        if info["global_step"] == 1 and info["micro_step"] == 0 and dist.get_rank() == 0:
            return dict(terms, total=terms["total"] * float("nan"))
        return terms

    def capture(info):
        final.update({n: {k: v.detach().cpu().clone() for k, v in e.module.state_dict().items()}
                      for n, e in _engines(info).items()})
        final["accumulation"] = [e.accumulation for e in _engines(info).values()]

    cfg = _cfg(Path(args.out) / f"accum_w{world}", args.data, "[{resolution: 64, iterations: 3, batch_size: 2}]",
               *ACCUM_OVERRIDES, f"loss.vgg_weights={args.vgg}")
    result, _ = _run(cfg, ds, capture, loss_hook=nan_on_rank0)
    if dist.get_rank() == 0:
        torch.save(final, Path(args.out) / f"accum_w{world}.pt")
    meta = ckpt.read_meta(ckpt.read_latest(Path(args.out) / f"accum_w{world}" / "checkpoints"))
    return {"step": result["global_step"], "skipped": result["skipped"], "d_skipped": result["d_skipped"],
            "accumulation": final["accumulation"], "meta_state": meta["state"]}


# the accumulation scenario's settings, shared with the single-process run of tests/test_reshard.py
ACCUM_OVERRIDES = ("train.global_batch=4", "train.sync_batchnorm=false", "loss.disc_at_resolution=64")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--scenarios", default="growth")
    p.add_argument("--vgg", default="random", help="loss.vgg_weights of the reshard and accum scenarios")
    p.add_argument("--ds-configs", dest="ds_configs", default="zero*.json",
                   help="reshard scenarios: which configs/ds files (comma-separated globs; default every shipped one)")
    p.add_argument("--peer-ranks", dest="peer_ranks", type=int, default=None,
                   help="reshard_resume: the world size of the launch whose checkpoints it resumes")
    p.add_argument("--local_rank", type=int, default=None)  # passed by the launcher
    args = p.parse_args()
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ["HPTRANSFER_NO_BAR"] = "1"
    report = {"env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}}
    scenarios = {"growth": scenario_growth, "fp16": scenario_fp16, "reshard_write": scenario_reshard_write,
                 "reshard_resume": scenario_reshard_resume, "accum": scenario_accum,
                 # the generator under ZeRO-1, the discriminators (on at 64 px here) under ZeRO-2
                 "zero1": lambda a: _short(a, "zero1", "zero1g_zero2d_bf16.json", 2, "loss.disc_at_resolution=64"),
                 "zero3": lambda a: _short(a, "zero3", "zero3_bf16.json")}
    for name in args.scenarios.split(","):
        t0 = time.perf_counter()
        try:
            r = scenarios[name](args)
        except Exception as e:  # a launch waiting for this one's checkpoints must not wait forever
            marker = Path(args.out) / f"w{_world()}" / "FAILED"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"rank {rank}, scenario {name}: {type(e).__name__}: {e}")
            raise
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
