"""The ``hptransfer`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up, importing a
module when its subcommand runs so ``hptransfer --help`` stays fast.

Errors the user can fix (:mod:`hptransfer.errors`) are caught here, in one place, for every
subcommand: one line ``error: ...`` on stderr, exit status 2; ``--debug`` (anywhere on the command
line) or ``HPTRANSFER_DEBUG=1`` (any on value, as every ``hptransfer._env`` flag) shows their traceback.
Other exceptions are bugs and keep theirs."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hptransfer._env import flag

# name -> (module, one-line help)
COMMANDS = {
    "data": ("hptransfer.data.cli", "synthesize, prepare, check and show datasets"),
    "train": ("hptransfer.train", "progressive training (also: deepspeed hptransfer/train.py ...)"),
    "eval": ("hptransfer.evaluate", "score generated images: SSIM (both protocols), MS-SSIM, local-SSIM, LPIPS, FID"),
    "ablate": ("hptransfer.ablate", "the paper's Table 1: train and score every variant x seed, table and figure"),
    "compare": ("hptransfer.compare", "the paper's Table 2: score several methods' output folders in one table"),
    "infer": ("hptransfer.infer", "generate one image of a reference person in a target pose"),
    "video": ("hptransfer.video", "generate a pose-guided video"),
    "export": ("hptransfer.export", "export a checkpoint as safetensors, ONNX or TorchScript"),
    "model-summary": ("hptransfer.models.summary", "table of stages: resolution, channels, parameters, FLOPs"),
    "demo": ("hptransfer.demo", "the end-to-end CPU demo behind `make demo`"),
    "garment": ("hptransfer.garment", "garment transfer / virtual try-on with the transfer and appearance flow networks"),
    "garment-study": ("hptransfer.garment_study", "the appearance flow against the affine paste: curves with seeds"),
    "doctor": ("hptransfer.doctor", "versions, and what each fast path will run on this machine"),
    "weights": ("hptransfer.weights", "download and verify the ImageNet weights (VGG-16, AlexNet, Inception)"),
}


def _load(name: str):
    """The module of subcommand ``name`` (an unknown name never gets here: argparse rejects it)."""
    return importlib.import_module(COMMANDS[name][0])


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hptransfer", description="Pose-guided high-resolution appearance transfer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of user errors too (also HPTRANSFER_DEBUG=1; accepted anywhere)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            _load(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is global but accepted after the subcommand too (data subcommands parse their own rest)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected not in COMMANDS:
        selected = None
    parser = build_parser(selected)
    args = parse_args_with_overrides(parser, argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command is None:
        parser.print_help()
        return 0
    return run_guarded(_load(args.command).run, args, debug, check_device=True)


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that ``section.key=value`` overrides may come anywhere, also
    between options (``train --config a.yaml data.root=x --out runs/y``): argparse takes one run of
    positionals only and would reject the rest."""
    args, rest = parser.parse_known_args(argv)
    if rest and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in a and not a.startswith("-") for a in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def run_guarded(run, args, debug: bool = False, check_device: bool = False) -> int:
    """``run(args)`` with user errors as one line ``error: ...`` on stderr and status 2 (the traceback
    with ``debug`` or HPTRANSFER_DEBUG=1); other exceptions propagate. Also for entry points outside
    this command (``deepspeed hptransfer/train.py``). ``check_device``: a ``--device`` that torch
    cannot parse is a user error (every subcommand's ``--device``, checked here once)."""
    from hptransfer.errors import InputError, user_message

    try:
        debug = debug or flag("HPTRANSFER_DEBUG")  # a bad value is itself a one-line user error
        if check_device and getattr(args, "device", None):
            import torch
            try:
                torch.device(args.device)
            except RuntimeError as e:
                raise InputError(f"--device {args.device}: {e}") from None
        return int(run(args) or 0)
    except Exception as e:
        message = user_message(e)
        if message is None or debug:
            raise
        _close_progress_bars()
        print(f"error: {message}", file=sys.stderr)
        return 2


def _close_progress_bars() -> None:
    """Close tqdm bars left open by the failed command, so the error line starts a line of its own."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ()) or ()):
        bar.close()


if __name__ == "__main__":
    raise SystemExit(main())
