"""DeepSpeed through the trainer on this machine's first device, one rank: ZeRO-2 bf16
(configs/ds/zero2_bf16.json), 3 steps, stop (every rank writes its checkpoint), resume for 1 step; the
result must equal an uninterrupted 4-step run bit for bit (train.deterministic) and stay finite.

    python bench/ds_check.py --out ds_check.json                  # GPU: 256 px, model.width 0.25, VGG all five
    python bench/ds_check.py --resolution 64 --width 0.03125 --vgg-layers relu1_2 --fp32 --out x.json   # CPU

A single-rank world of its own (RANK, WORLD_SIZE, MASTER_ADDR/PORT set here unless a launcher set them), on
a synthetic dataset made in a temporary directory. JSON (atomically, with bench.common.environment()):
steps, seconds, ``resume_vs_full`` (largest parameter/buffer difference: 0.0 = bit-exact), ``finite``.
--fp32 runs the config without its autocast section, for the CPU dry run: on a CPU without bf16 instructions
(AVX2) a bf16 convolution took 67 times as long as in fp32 (one 64-channel 3x3 conv, measured on the CI kind
of machine), and the ZeRO, checkpoint and resume path is the same.
Exit status 0 when the resume is bit-exact and finite.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import environment, result_path, write_json  # noqa: E402

STEPS = 4  # 3, a stop, then 1 more


def _single_rank_world() -> None:
    if "RANK" in os.environ:  # a launcher formed the world
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=256 if cuda else 64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--width", type=float, default=0.25 if cuda else 1 / 32)
    p.add_argument("--vgg-layers", nargs="+", default=None, help="VGG taps (default: all five)")
    p.add_argument("--ds-config", default=str(REPO / "configs" / "ds" / "zero2_bf16.json"))
    p.add_argument("--fp32", action="store_true", help="without the config's bf16/fp16 autocast (a CPU dry run)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/ds_check-<device>.json)")
    args = p.parse_args(argv)
    _single_rank_world()
    os.environ.setdefault("HPTRANSFER_NO_BAR", "1")
    from hptransfer.config import load_config
    from hptransfer.data import synth
    from hptransfer.train import train

    out = Path(args.out) if args.out else result_path("ds_check")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ds_check_") as tmp:
        ds_config = args.ds_config
        if args.fp32:
            raw = {k: v for k, v in json.loads(Path(ds_config).read_text()).items()
                   if k not in ("bf16", "fp16", "torch_autocast")}
            ds_config = str(Path(tmp) / f"{Path(ds_config).stem}_fp32.json")
            Path(ds_config).write_text(json.dumps(raw))
        data = Path(tmp) / "data"
        synth.synthesize(data, identities=4, poses=3, size=args.resolution, seed=0)
        layers = f"loss.layers=[{','.join(args.vgg_layers)}]" if args.vgg_layers else None
        stage = f"[{{resolution: {args.resolution}, iterations: {STEPS}, batch_size: {args.batch}}}]"

        def cfg(name):
            return load_config(None, [o for o in (
                f"model.width={args.width}", "loss.vgg_weights=random", layers, "train.deterministic=true",
                "train.tensorboard=false", "train.sample_every=0", "train.log_every=1", "data.workers=0",
                "data.flip=false", f"data.root={data}", f"train.out_dir={Path(tmp) / name}", f"stages={stage}") if o])

        full = train(cfg("full"), ds_config=ds_config)
        first = train(cfg("resumed"), ds_config=ds_config, stop_at_step=STEPS - 1)
        resumed = train(cfg("resumed"), ds_config=ds_config, resume="auto")
    a, b = full["generator_state"], resumed["generator_state"]
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a) if a.keys() == b.keys() else None
    finite = all(bool(torch.isfinite(v.float()).all()) for v in b.values())
    ok = diff == 0.0 and finite and first["stopped"] and resumed["global_step"] == STEPS
    result = {"check": "ds_check", **environment(), "ds_config": Path(args.ds_config).name, "fp32": args.fp32,
              "resolution": args.resolution, "batch": args.batch, "width": args.width,
              "steps": {"full": full["global_step"], "stopped_at": first["global_step"],
                        "resumed_to": resumed["global_step"]},
              "keys_equal": a.keys() == b.keys(), "resume_vs_full": diff, "finite": finite,
              "seconds": round(time.perf_counter() - t0, 1), "result": "pass" if ok else "fail"}
    write_json(out, result)
    print(f"DeepSpeed {result['ds_config']} on {result['device']}, {args.resolution} px: {STEPS - 1} steps, stop, resume "
          f"to {resumed['global_step']}: largest difference to the uninterrupted run {diff}, finite {finite}: "
          f"{result['result']} ({result['seconds']} s); JSON: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
