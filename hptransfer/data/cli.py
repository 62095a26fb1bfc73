"""``hptransfer data <subcommand>``. Each subcommand is one entry of :data:`SUBCOMMANDS`:
name -> ("module" or "module:prefix", help). The module exposes ``add_arguments(parser)`` and
``run(args) -> int`` (or ``add_<prefix>_arguments`` / ``run_<prefix>``). Modules are imported only
when their subcommand runs, so ``hptransfer data --help`` stays fast and a missing optional
dependency (e.g. DALI) only affects its own subcommand."""
from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = {
    "synth": ("hptransfer.data.synth", "render a synthetic people dataset in the benchmark format"),
    "check": ("hptransfer.data.check", "validate a dataset and print a summary (non-zero exit on problems)"),
    "show": ("hptransfer.data.check:show", "draw skeletons on images in a grid PNG"),
    "deepfashion": ("hptransfer.data.prepare_deepfashion", "DeepFashion In-shop + benchmark CSVs -> dataset"),
    "h36m": ("hptransfer.data.prepare_h36m", "Human3.6M videos/frames + 2D poses + masks -> dataset"),
    "video": ("hptransfer.data.prepare_video", "videos (+ OpenPose JSON or mediapipe) -> dataset"),
    "photos": ("hptransfer.data.prepare_photos", "a folder of your photos (+ keypoint CSV or MediaPipe) -> "
               "images/, annotations.csv, pairs.csv"),
    "split": ("hptransfer.data.split", "annotations.csv + pairs.csv -> train/test split files, by person"),
    "shard": ("hptransfer.data.shard_writer", "dataset folder -> tar shards with every stage's resolution"),
}


def _functions(name: str):
    target, _ = SUBCOMMANDS[name]
    module_name, _, prefix = target.partition(":")
    module = importlib.import_module(module_name)
    if prefix:
        return getattr(module, f"add_{prefix}_arguments"), getattr(module, f"run_{prefix}")
    return module.add_arguments, module.run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    lines = [f"  {n:10s} {h}" for n, (_, h) in SUBCOMMANDS.items()]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "subcommands:\n" + "\n".join(lines) + "\n\n`hptransfer data SUBCOMMAND --help` for its options."
    parser.add_argument("subcommand", choices=sorted(SUBCOMMANDS), metavar="SUBCOMMAND")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args) -> int:
    name = args.subcommand
    add, run_fn = _functions(name)
    p = argparse.ArgumentParser(prog=f"hptransfer data {name}", description=SUBCOMMANDS[name][1])
    add(p)
    sub_args = p.parse_args(args.rest)
    return int(run_fn(sub_args) or 0)
