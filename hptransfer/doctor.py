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


DALI_BUILDS = {"nvidia-dali-cuda130": "13", "nvidia-dali-cuda120": "12"}  # distribution -> CUDA major


def dali_build(torch_cuda: str | None) -> dict:
    """Which DALI build is installed and whether it is the one for torch's CUDA major version:
    {"installed": [distributions], "wanted": distribution or None, "ok": bool, "hint": str}."""
    from importlib import metadata

    installed = []
    for name in DALI_BUILDS:
        try:
            installed.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    major = (torch_cuda or "").split(".")[0]
    wanted = next((n for n, m in DALI_BUILDS.items() if m == major), None)
    extra = {"13": "dali", "12": "dali-cuda12"}.get(major)
    ok = wanted is None or not installed or (len(installed) == 1 and installed[0].startswith(wanted + " "))
    hint = "" if ok else (f"torch is built for CUDA {torch_cuda}: keep only {wanted} "
                          f"(pip uninstall {' '.join(i.split()[0] for i in installed)}; pip install 'hptransfer[{extra}]')")
    return {"installed": installed, "wanted": wanted, "ok": ok, "hint": hint}


def run(args: argparse.Namespace) -> int:
    import torch

    from hptransfer import ops
    from hptransfer._version import __version__

    status = ops.backend_status(args.device)
    dali = dali_build(torch.version.cuda)
    if args.json:
        print(json.dumps({"hptransfer": __version__, **status, "dali_build": dali}, indent=2))
    else:
        print(f"hptransfer {__version__}")
        print(ops.format_backend_status(status))
        print(f"{'dali build':30s}{', '.join(dali['installed']) or 'not installed'}"
              f"{'' if dali['ok'] else '  MISMATCH: ' + dali['hint']}")
    fallbacks = [k for k, v in status["plan"].items() if "FALLBACK" in str(v)]
    if not dali["ok"]:
        fallbacks.append("dali (wrong CUDA build)")
    if args.strict and fallbacks:
        print(f"hptransfer doctor: fast paths that would fall back: {', '.join(fallbacks)}", file=sys.stderr)
        return 1
    return 0
