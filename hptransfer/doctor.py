"""``hptransfer doctor``: the versions that matter and what each fast path will run here.

Run it on a new cluster before training: a fast path that falls back (an extension built without
CUDA, Triton that does not import) shows as FALLBACK with its reason, and ``--strict`` turns that
into a non-zero exit for scripts. The same table heads every train.log.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="device to plan for (default: cuda if present, else cpu)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any fast path would fall back")


def run(args: argparse.Namespace) -> int:
    from hptransfer import ops
    from hptransfer._version import __version__

    status = ops.backend_status(args.device)
    if args.json:
        print(json.dumps({"hptransfer": __version__, **status}, indent=2))
    else:
        print(f"hptransfer {__version__}")
        print(ops.format_backend_status(status))
    fallbacks = [k for k, v in status["plan"].items() if "FALLBACK" in str(v)]
    if args.strict and fallbacks:
        print(f"hptransfer doctor: fast paths that would fall back: {', '.join(fallbacks)}", file=sys.stderr)
        return 1
    return 0
