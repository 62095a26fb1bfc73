"""``hptransfer compare``: the paper's Table 2 as a command: several methods' output folders scored
against one ground-truth folder under the same protocol, one table.

    hptransfer compare --gt data/df/test_gt --method ours=out/ours --method PATN=out/patn \\
        [--crop 40:216] [--data data/df --split test] [--out table.json] [--md table.md]

Images are matched by file name (:func:`hptransfer.evaluate.match_folders`), and every method is scored
on the same images: the ground-truth names that every method has (what is left out is counted in the
table's notes and named in the log). ``--crop x0:x1`` keeps
columns x0:x1 of prediction and ground truth *before* every metric (SSIM under both protocols,
MS-SSIM, local-SSIM, LPIPS, FID), so a 256x256 output scored with ``--crop 40:216`` is compared on a
176-wide DeepFashion frame (the paper states no protocol; PATN-lineage scripts score 256x176 images);
keypoints (``--data``, for local-SSIM) are
shifted with it, and those outside the kept columns count as missing. Scoring itself is
:func:`hptransfer.evaluate.evaluate`.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from hptransfer import metrics as M
from hptransfer.errors import ConfigError, InputError
from hptransfer.evaluate import add_fid_arguments

log = logging.getLogger(__name__)

# (result key, header, higher is better)
COLUMNS = (
    ("ssim_gaussian", "SSIM (Gaussian σ1.5)", True),
    ("ssim_gaussian12", "SSIM (Gaussian σ1.2)", True),
    ("ssim_uniform51", "SSIM (uniform 51)", True),
    ("ms_ssim", "MS-SSIM", True),
    ("local_ssim", "local-SSIM", True),
    ("lpips_alex", "LPIPS (alex)", False),
    ("lpips_vgg", "LPIPS (vgg)", False),
    ("fid", "FID", False),
)


def add_arguments(p) -> None:
    p.add_argument("--gt", required=True, help="folder of ground-truth images")
    p.add_argument("--method", action="append", required=True, metavar="NAME=DIR",
                   help="a method's output folder (same file names as --gt); repeat for each method")
    p.add_argument("--crop", default=None, help="x0:x1 columns kept for EVERY metric (e.g. 40:216)")
    p.add_argument("--data", default=None, help="dataset root whose annotations-SPLIT.csv holds the ground "
                   "truth's keypoints (for local-SSIM)")
    p.add_argument("--split", default="test")
    p.add_argument("--metrics", default=None, help="comma list from ssim,ms_ssim,local_ssim,lpips,fid; listed "
                   "metrics must run (missing weights = error); default: all that can")
    p.add_argument("--data-range", default="255", choices=["255", "pred"],
                   help="SSIM data range: 255, or each prediction's max-min (PATN/GFLA Gaussian SSIM scripts)")
    p.add_argument("--protocol", default="both", choices=[*M.ALL_PROTOCOLS, "both", "all"],
                   help="SSIM protocols (as hptransfer eval): both = gaussian and uniform51 (default), all = the three")
    p.add_argument("--lpips-net", default="alex", choices=["alex", "vgg"])
    p.add_argument("--lpips-weights", default=None)
    add_fid_arguments(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--md", default=None, help="write the table as Markdown here")


def parse_methods(items: list[str]) -> list[tuple[str, Path]]:
    out, seen = [], set()
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--method {item!r} must look like NAME=DIR")
        if name in seen:
            raise ConfigError(f"--method {name!r} given twice")
        seen.add(name)
        out.append((name, Path(folder)))
    return out


def compare(gt: str | Path, methods: list[tuple[str, Path]], crop: Optional[tuple[int, int]] = None,
            data: Optional[str] = None, split: str = "test", metrics: Optional[set] = None,
            data_range: str = "255", lpips_net: str = "alex", lpips_weights=None, inception_weights=None,
            batch_size: int = 16, device=None, protocols: Optional[list] = None, fid_network: str = "torchvision",
            fid_reference=None) -> dict:
    """Every method scored on the same images: the ground-truth names that every method has a prediction
    for (a prediction without a ground truth, or of a name another method lacks, is left out and named in
    the log). Returns {"results": {method: {metric: {"value", "n", "protocol", ...} | {"unavailable"}}}
    (evaluate's results; ``fid_reference`` as :func:`hptransfer.evaluate.evaluate` takes it), "images": n,
    "dropped": {method: [names]}, "ground_truth_unused": n}."""
    from hptransfer.evaluate import (ALL_METRICS, _folder_batches, evaluate, ground_truth_keypoints, keypoint_note,
                                     match_folders)

    gt = Path(gt)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    explicit = metrics is not None
    wanted = set(metrics) if explicit else set(ALL_METRICS)
    if wanted - set(ALL_METRICS):
        raise ConfigError(f"unknown metrics {sorted(wanted - set(ALL_METRICS))}; choose from {', '.join(ALL_METRICS)}")
    annotations = ann_path = None
    if data and "local_ssim" in wanted:  # --data may be there for FID's training images only
        from hptransfer.data import read_annotations
        ann_path = Path(data) / f"annotations-{split}.csv"
        annotations = read_annotations(ann_path)
    elif not explicit:
        wanted.discard("local_ssim")  # needs the ground truth's keypoints
    matched = {name: match_folders(folder, gt) for name, folder in methods}
    by_key = {name: {m.key(p): p for p in m} for name, m in matched.items()}
    common = sorted(set.intersection(*(set(k) for k in by_key.values())))
    dropped = {name: sorted(set(k) - set(common)) + m.pred_only for (name, m), k in zip(matched.items(),
                                                                                        by_key.values())}
    unused_gt = next(iter(matched.values())).gt_total - len(common)
    if not common:
        raise InputError(f"no ground-truth image in {gt} has a prediction from every method: "
                         + ", ".join(f"{n} {len(k)}" for n, k in by_key.items()) + " matched each")
    if any(dropped.values()):
        log.warning("%s", dropped_note(dropped, len(common)))
    reasons = None
    results = {}
    for name, _ in methods:
        pairs = [by_key[name][k] for k in common]
        keypoints = None
        if annotations is not None:
            keypoints, missing = ground_truth_keypoints(pairs, gt, annotations)
            if missing and name == methods[0][0]:  # the same names for every method: said once
                log.warning("%s", keypoint_note(missing, len(pairs), ann_path))
            reasons = {"local_ssim": f"no row in {ann_path.name}"} if missing else None
        log.info("scoring %s: %d images", name, len(pairs))
        results[name] = evaluate(_folder_batches(pairs, keypoints, batch_size), list(protocols or M.PROTOCOLS), crop,
                                 set(wanted), explicit, device, lpips_net, lpips_weights, inception_weights,
                                 math.ceil(len(pairs) / batch_size), data_range, reasons, fid_network, fid_reference)
    return {"results": results, "images": len(common), "dropped": dropped, "ground_truth_unused": unused_gt}


def dropped_note(dropped: dict, common: int) -> str:
    """Which predictions the common set left out, per method, in a sentence."""
    parts = [f"{name} {len(names)} (first: {names[0]})" for name, names in dropped.items() if names]
    return (f"every method is scored on the {common} ground-truth names all of them have; predictions left out: "
            + ", ".join(parts))


def format_markdown(compared: dict, crop_text: Optional[str]) -> str:
    """The table of :func:`compare`'s result, with notes: the images every method was scored on, what was
    left out and why, unavailable metrics and why."""
    results = compared["results"]
    cols = [c for c in COLUMNS if any("value" in r.get(c[0], {}) for r in results.values())]
    lines = ["| Method | n | " + " | ".join(f"{h} {'↑' if up else '↓'}" for _, h, up in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for name, r in results.items():
        cells = [f"{r[k]['value']:.4f}" + (f" (n={r[k]['n']})" if r[k].get("left_out") else "")
                 if "value" in r.get(k, {}) else "" for k, _, _ in cols]
        lines.append(f"| {name} | {compared['images']} | " + " | ".join(cells) + " |")
    notes = [f"every method on the same {compared['images']} ground-truth images"]
    if any(compared["dropped"].values()):
        notes.append("predictions left out (no ground truth, or a name not every method has): "
                     + ", ".join(f"{n} {len(d)}" for n, d in compared["dropped"].items() if d))
    if compared["ground_truth_unused"]:
        notes.append(f"{compared['ground_truth_unused']} ground-truth images without a prediction from every method")
    notes.append(f"columns {crop_text} of every image for every metric" if crop_text else "whole images")
    left = sorted({f"{k}: {v['left_out']} images left out ({v['why']})" for r in results.values()
                   for k, v in r.items() if v.get("left_out")})
    notes += left
    missing = sorted({f"{k}: {v['unavailable']}" for r in results.values() for k, v in r.items() if "unavailable" in v})
    protocol = {k: v["protocol"] for r in results.values() for k, v in r.items() if "protocol" in v}
    notes += [f"{h}: {protocol[k]}" for k, h, _ in cols if k in protocol]
    notes += [f"unavailable: {m}" for m in missing]
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + ".\n"


def run(args) -> int:
    from hptransfer.checkpoint import atomic_write_text

    methods = parse_methods(args.method)
    crop = M.parse_crop(args.crop)
    wanted = None if args.metrics is None else {m.strip() for m in args.metrics.split(",") if m.strip()}
    from hptransfer.evaluate import fid_reference_of, protocols_of

    try:
        compared = compare(args.gt, methods, crop, args.data, args.split, wanted, args.data_range, args.lpips_net,
                           args.lpips_weights, args.inception_weights, args.batch_size, args.device,
                           protocols_of(args.protocol), args.fid_network, fid_reference_of(args))
    except RuntimeError as e:  # a metric listed in --metrics cannot run (evaluate's message names it)
        print(f"error: {e}")
        return 1
    md = format_markdown(compared, args.crop)
    print(md)
    if args.md:
        atomic_write_text(args.md, md)
    if args.out:
        doc = {"gt": args.gt, "methods": {n: str(f) for n, f in methods}, "crop": args.crop, "split": args.split,
               "data_range": args.data_range, "images": compared["images"], "dropped": compared["dropped"],
               "ground_truth_unused": compared["ground_truth_unused"], "results": compared["results"]}
        atomic_write_text(args.out, json.dumps(doc, indent=1))
        print(f"wrote {args.out}")
    return 0
