"""``hptransfer eval``: generate a test split with an exported generator and score it, or score
existing images (``--pred DIR --gt DIR``, matched by file name) so other methods' outputs are
compared under the same protocol. Two folders holding different names are refused (the score would
be of another test set), unless ``--intersection`` restricts both to the common names and says how
many it dropped.

Metrics: SSIM under the "gaussian" (sigma 1.5), "gaussian12" (sigma 1.2) and/or "uniform51" protocols
(see :mod:`hptransfer.metrics`), MS-SSIM, local-SSIM (needs keypoints: generated splits, or ``--data``
with the ground truth's annotations), LPIPS and FID (need weights on disk: ``hptransfer weights
fetch``). FID names its network (``--fid-network``: torchvision's Inception-v3 or the TF FID
Inception) and its reference set (``--fid-reference``: the training images, as the peers' scripts
score, from ``--data``'s train split or ``--fid-real DIR``; or the test ground truth); every FID and
SSIM printed carries its protocol. A metric
whose weights or inputs are missing is one short "unavailable (reason)" line in the table (the long
explanation, e.g. where the weights go, is logged once) unless it was requested with ``--metrics``:
then it is an error. ``--json`` prints the results as JSON on stdout instead of the table.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hptransfer import metrics as M
from hptransfer.errors import InputError, UserError

log = logging.getLogger(__name__)

ALL_METRICS = ("ssim", "ms_ssim", "local_ssim", "lpips", "fid")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", help="generate the split and score it: export directory, training checkpoint "
                   "(single-process or DeepSpeed: step_* dir) or run directory (its latest checkpoint)")
    p.add_argument("--data", help="dataset root (benchmark format); with --pred/--gt: annotations for local-SSIM")
    p.add_argument("--split", default="test")
    p.add_argument("--resolution", type=int, default=None, help="check the generator's resolution")
    p.add_argument("--pred", help="folder of generated images (scored against --gt by file name)")
    p.add_argument("--gt", help="folder of ground-truth images (the same names as --pred, else an error)")
    p.add_argument("--intersection", action="store_true",
                   help="with --pred/--gt holding different names: score the names both have (the dropped ones "
                        "are counted and named in the log) instead of stopping")
    p.add_argument("--protocol", default="both", choices=[*M.ALL_PROTOCOLS, "both", "all"],
                   help="SSIM protocol: gaussian (sigma 1.5), gaussian12 (sigma 1.2), uniform51; both = gaussian and "
                        "uniform51 (default); all = the three")
    p.add_argument("--data-range", default="255", choices=["255", "pred"],
                   help="SSIM data range: 255, or each prediction's max-min (PATN/GFLA Gaussian SSIM scripts)")
    p.add_argument("--crop", default=None, help="x0:x1 columns kept for every metric (e.g. 40:216: DeepFashion's 176-wide frame)")
    p.add_argument("--metrics", default=None, help=f"comma list from {','.join(ALL_METRICS)}; "
                   "listed metrics must run (missing weights = error); default: all that can")
    p.add_argument("--lpips-net", default="alex", choices=["alex", "vgg"])
    p.add_argument("--lpips-weights", default=None, help="torchvision backbone file (else env var / hub cache)")
    add_fid_arguments(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="score only the first N images/pairs")
    p.add_argument("--save-dir", default=None, help="with --checkpoint: also save generated images here")
    p.add_argument("--pose-following", action="store_true",
                   help="with --checkpoint on a synthetic dataset (synth.json): also the vacated / new-body L1 "
                        "of the model and of copying the reference (see pose_following)")
    p.add_argument("--device", default=None, help="default: cuda when present")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (no table)")


def add_fid_arguments(p) -> None:
    """FID's protocol options, shared by ``eval`` and ``compare``."""
    p.add_argument("--fid-network", default="torchvision", choices=list(M.FID_NETWORKS),
                   help="torchvision: torchvision's Inception-v3 as PCDMs' evaluation feeds it (default); "
                        "pt_inception: the TF FID Inception of pytorch-fid / clean-fid (weights fetch fid_inception)")
    p.add_argument("--fid-reference", default="train", choices=["train", "test-gt"],
                   help="FID's real images: train = the training images (the peers' protocol; --data's train split "
                        "or --fid-real DIR; default), test-gt = the ground truth of the scored images")
    p.add_argument("--fid-real", default=None, metavar="DIR", help="folder of FID's reference images (with "
                   "--fid-reference train; default: --data's train split)")
    p.add_argument("--inception-weights", default=None,
                   help="the FID network's weights file (else env var / hub cache)")


def protocols_of(name: str) -> list[str]:
    """``--protocol`` value -> SSIM protocols."""
    return {"both": list(M.PROTOCOLS), "all": list(M.ALL_PROTOCOLS)}.get(name, [name])


def fid_reference_of(args):
    """``--fid-reference``/``--fid-real``/``--data`` -> :func:`evaluate`'s ``fid_reference``: None (the
    test ground truth) or a function returning :func:`training_images`' answer."""
    if args.fid_reference == "test-gt":
        return None
    return lambda: training_images(args.data, args.fid_real, batch_size=args.batch_size)


def training_images(data=None, folder=None, split: str = "train", batch_size: int = 16):
    """(description, batches factory) of FID's reference images: ``folder``'s images, else ``data``'s
    ``split``; an InputError when there are none."""
    if folder is not None:
        root = Path(folder)
        if not root.is_dir():
            raise InputError(f"--fid-real {root}: no such folder")
        paths = sorted(q for q in root.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        where = f"--fid-real {root}"
    elif data is not None:
        from hptransfer.data import read_annotations

        ann = Path(data) / f"annotations-{split}.csv"
        if not ann.is_file():
            raise InputError(f"{ann}: no {split} split for FID's reference images (give --fid-real DIR, or "
                             "--fid-reference test-gt)")
        paths = [Path(data) / "images" / n for n in sorted(read_annotations(ann))]
        where = f"{split} split of {data}"
    else:
        raise InputError("FID against the training images needs --data (its train split) or --fid-real DIR "
                         "(or --fid-reference test-gt)")
    if len(paths) < 2:
        raise InputError(f"FID's reference ({where}) has {len(paths)} images; it needs at least 2")
    kind = "training images" if folder is None else "images"
    return f"{len(paths)} {kind} ({where})", lambda: image_batches(paths, batch_size)


def image_batches(paths: list[Path], batch_size: int):
    """uint8 (B, 3, H, W) batches of the images at ``paths``; a batch holds images of one size."""
    batch: list = []
    for path in paths:
        img = _load_uint8(path)
        if batch and (len(batch) == batch_size or img.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield torch.stack(batch)


# ---------------------------------------------------------------- inputs

def _load_uint8(path: Path) -> torch.Tensor:
    from PIL import Image
    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise InputError(f"{path}: cannot read image: {e}") from None
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


class Matching(list):
    """``[(pred path, gt path), ...]`` matched by name; ``.pred_only`` / ``.gt_only``: the names (relative,
    '/'-separated) of predictions without a ground truth and of ground truths without a prediction;
    ``.pred_dir`` / ``.gt_dir``; ``key(pair)``: the ground truth's name of a pair."""

    def __init__(self, pairs, pred_only, gt_only, pred_dir: Path, gt_dir: Path, gt_total: int):
        super().__init__(pairs)
        self.pred_only, self.gt_only, self.pred_dir, self.gt_dir = pred_only, gt_only, pred_dir, gt_dir
        self.gt_total = gt_total

    def key(self, pair) -> str:
        return pair[1].relative_to(self.gt_dir).as_posix()

    def mismatch(self) -> Optional[str]:
        """What differs between the two sets, in a sentence, or None when they are the same names."""
        if not self.pred_only and not self.gt_only:
            return None
        parts = [f"{len(self.pred_only)} predictions have no ground truth (first: {self.pred_only[0]})"
                 if self.pred_only else "",
                 f"{len(self.gt_only)} ground-truth images have no prediction (first: {self.gt_only[0]})"
                 if self.gt_only else ""]
        return (f"{self.pred_dir} holds {len(self) + len(self.pred_only)} images and {self.gt_dir} {self.gt_total}, "
                f"{len(self)} with the same name: " + "; ".join(p for p in parts if p))


def match_folders(pred_dir: Path, gt_dir: Path) -> Matching:
    """(pred, gt) paths matched by file name (then by stem, so .png outputs match .jpg ground truth),
    with the names on either side that have no partner (:class:`Matching`); none matching is an error."""
    def listing(d: Path):
        if not d.is_dir():
            raise InputError(f"{d}: no such folder")
        return sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    gts = listing(gt_dir)
    by_name = {p.relative_to(gt_dir).as_posix(): p for p in gts}
    by_stem = {p.relative_to(gt_dir).with_suffix("").as_posix(): p for p in gts}
    pairs, unmatched, used = [], [], set()
    for p in listing(pred_dir):
        rel = p.relative_to(pred_dir)
        g = by_name.get(rel.as_posix()) or by_stem.get(rel.with_suffix("").as_posix())
        if g is None:
            unmatched.append(rel.as_posix())
        else:
            pairs.append((p, g))
            used.add(g)
    if not pairs:
        raise InputError(f"no image in {pred_dir} has a same-named ground truth in {gt_dir}")
    gt_only = [p.relative_to(gt_dir).as_posix() for p in gts if p not in used]
    return Matching(pairs, unmatched, gt_only, Path(pred_dir), Path(gt_dir), len(gts))


def ground_truth_keypoints(pairs, gt_dir: Path, annotations) -> tuple[list, list[str]]:
    """The ground truth's (18, 2) keypoints for each (pred, gt) pair from ``annotations`` (looked up by
    the name relative to ``gt_dir``, then by file name), all -1 where the annotations have no row; and
    the names without a row (their local-SSIM is undefined: :func:`keypoint_note`)."""
    kps, missing = [], []
    for _, g in pairs:
        rel = Path(g).relative_to(gt_dir).as_posix()
        kp = annotations.get(rel)
        if kp is None:
            kp = annotations.get(Path(g).name)
        if kp is None:
            missing.append(rel)
        kps.append(torch.as_tensor(kp) if kp is not None else torch.full((18, 2), -1.0))
    return kps, missing


def keypoint_note(missing: list[str], total: int, source) -> Optional[str]:
    """The reason local-SSIM leaves images out (or cannot run) when ``missing`` names have no row in
    the annotation file ``source``; logged by the caller, and the table's reason when none has one."""
    if not missing:
        return None
    return (f"{len(missing)} of {total} ground-truth images have no row in {source} (first: {missing[0]}): "
            "local-SSIM needs their keypoints")


def _folder_batches(pairs, keypoints, batch_size: int):
    """(pred uint8, gt uint8, kp or None) batches of matched files; ``keypoints`` aligned with ``pairs``
    (:func:`ground_truth_keypoints`) or None."""
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        preds, gts = [], []
        for p, g in chunk:
            a, b = _load_uint8(p), _load_uint8(g)
            if a.shape != b.shape:
                raise InputError(f"{p}: size {tuple(a.shape[1:])} differs from ground truth {g} {tuple(b.shape[1:])}")
            preds.append(a)
            gts.append(b)
        kps = keypoints[i:i + batch_size] if keypoints is not None else None
        if len({t.shape for t in gts}) > 1:  # mixed sizes: score one at a time
            for j in range(len(chunk)):
                yield preds[j][None], gts[j][None], (kps[j][None] if kps else None)
        else:
            yield torch.stack(preds), torch.stack(gts), (torch.stack(kps) if kps else None)


def _generated_batches(args, device):
    from hptransfer.data import PairDataset
    from hptransfer.export import generate, load_any
    from hptransfer.infer import save_image

    g = load_any(args.checkpoint, device=device, prefer_export=True)
    if args.resolution is not None and args.resolution != g.resolution:
        raise InputError(f"{args.checkpoint} holds a {g.resolution}-px generator, not {args.resolution}")
    ds = PairDataset(args.data, args.split, g.resolution)
    n = len(ds) if args.limit is None else min(args.limit, len(ds))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=args.batch_size,
                                         shuffle=False, num_workers=0)
    save = Path(args.save_dir) if args.save_dir else None
    if save:
        save.mkdir(parents=True, exist_ok=True)
    for batch in loader:
        fake = generate(g, batch["reference"], batch["kp_target"])
        fake8 = M.to_uint8(fake.cpu())
        if save:
            for j, idx in enumerate(batch["index"].tolist()):
                a, b = ds.pairs[idx]
                name = f"{Path(a).stem}___{Path(b).stem}.png"
                save_image(fake8[j], save / name)  # atomic: a stopped run leaves no broken PNG
        yield fake8, M.to_uint8(batch["target"]), batch["kp_target"]


# ---------------------------------------------------------------- scoring

def crop_batches(batches, crop: Optional[tuple[int, int]]):
    """(pred, gt, kp) batches with columns crop[0]:crop[1] kept; keypoints (y, x) shifted to the kept
    frame, those outside it marked missing (-1)."""
    for pred, gt, kp in batches:
        if crop is None:
            yield pred, gt, kp
            continue
        x0, x1 = crop
        if x1 > pred.shape[-1]:
            raise InputError(f"--crop {x0}:{x1} is wider than the images ({pred.shape[-1]} px)")
        if kp is not None:
            kp = kp.clone().float()
            missing = (kp < 0).any(-1)
            kp[..., 1] -= x0
            outside = missing | (kp[..., 1] < 0) | (kp[..., 1] > x1 - x0 - 1)
            kp[outside] = -1.0
        yield pred[..., x0:x1].contiguous(), gt[..., x0:x1].contiguous(), kp


# Why a metric is undefined (NaN) for an image, when the caller knows no better reason.
UNDEFINED = {"local_ssim": "no valid descriptor (keypoints missing)"}


def evaluate(batches, protocols, crop, wanted, explicit: bool, device, lpips_net="alex",
             lpips_weights=None, inception_weights=None, total=None, data_range="255",
             reasons: Optional[dict] = None, fid_network: str = "torchvision", fid_reference=None) -> dict:
    """Score (pred uint8, gt uint8, kp or None) batches. Returns {metric: {"value", "n", "protocol"[,
    "left_out", "why"]} | {"unavailable"}}; "protocol" says in words how the number was made (SSIM window
    and data range; FID network and reference set).

    ``crop`` = (x0, x1) keeps those columns of every image for EVERY metric (:func:`crop_batches`), FID's
    reference images included. ``fid_reference``: None (the ground truth of ``batches``), or a function
    returning (description, batches factory) (:func:`training_images`) or raising InputError (then FID
    is unavailable, or with ``explicit`` an error). An unavailable metric gets a short reason; a longer one
    (where weights go) is logged once. A metric in ``wanted`` with ``explicit`` raises :class:`UserError`
    instead. Images for which a metric is undefined (local-SSIM without keypoints) are left out of its mean
    and counted, with ``reasons[metric]`` (else :data:`UNDEFINED`) as the why; a metric undefined for every
    image is unavailable with that reason: no NaN reaches the table."""
    from tqdm import tqdm

    results: dict = {}
    per: dict[str, list] = {}
    protocols = list(protocols)
    models: dict = {}

    logged = set()

    def unavailable(name, reason):
        if isinstance(reason, BaseException):  # WeightsUnavailable: .short for the table, the rest logged
            detail, reason = str(reason), getattr(reason, "short", None) or str(reason)
            if detail != reason and detail not in logged:
                logged.add(detail)
                log.warning("%s", detail)
        if explicit and name in wanted:
            raise UserError(f"{name}: {reason}")
        results[name] = {"unavailable": reason}
        wanted.discard(name)
        log.info("%s unavailable: %s", name, reason)

    if "lpips" in wanted:
        try:
            models["lpips"] = M.LPIPSMetric(lpips_net, lpips_weights, device=device)
        except (M.WeightsUnavailable, ImportError) as e:
            unavailable("lpips", e)
    reference = None
    if "fid" in wanted:
        try:
            models["fid"] = M.InceptionFeatures(fid_network, inception_weights, device=device)
        except (M.WeightsUnavailable, ImportError, ValueError) as e:
            unavailable("fid", e)
    if "fid" in wanted and fid_reference is not None:
        try:
            reference = fid_reference()
        except InputError as e:
            unavailable("fid", str(e))
    feats = {"pred": [], "gt": []}
    for pred, gt, kp in tqdm(crop_batches(batches, crop), total=total, desc="eval", unit="batch", leave=False):
        x, y = pred.to(device), gt.to(device)
        if "ssim" in wanted:
            for p in list(protocols):
                try:
                    v = M.ssim(x, y, p, data_range=data_range if data_range == "pred" else 255.0).cpu()
                    per.setdefault(f"ssim_{p}", []).append(v)
                except ValueError as e:  # e.g. a 51-px window on smaller images
                    if explicit:
                        raise UserError(f"ssim_{p}: {e}") from None
                    protocols.remove(p)
                    per.pop(f"ssim_{p}", None)
                    results[f"ssim_{p}"] = {"unavailable": str(e)}
        if "ms_ssim" in wanted:
            try:
                v = M.ms_ssim(x, y).cpu()
                per.setdefault("ms_ssim", []).append(v)
            except ValueError as e:
                unavailable("ms_ssim", str(e))
        if "local_ssim" in wanted:
            if kp is None:
                unavailable("local_ssim", "no keypoints (pass --data with the ground truth's annotations)")
            else:
                per.setdefault("local_ssim", []).append(M.local_ssim(x, y, kp.to(device)).cpu())
        if "lpips" in wanted:
            per.setdefault(f"lpips_{lpips_net}", []).append(models["lpips"](x, y))
        if "fid" in wanted:
            feats["pred"].append(models["fid"](x))
            if reference is None:
                feats["gt"].append(models["fid"](y))
    range_text = "data range = each prediction's max - min" if data_range == "pred" else "data range 255"
    for name, vals in per.items():
        if name in results:  # became unavailable part-way
            continue
        v = torch.cat(vals).numpy()
        ok = v[~np.isnan(v)]
        why = (reasons or {}).get(name) or UNDEFINED.get(name, "undefined")
        if not len(ok):
            if explicit and name in wanted:
                raise UserError(f"{name}: not defined for any of the {len(v)} images: {why}")
            results[name] = {"unavailable": f"not defined for any of the {len(v)} images: {why}"}
            continue
        results[name] = {"value": float(ok.mean()), "n": int(len(ok))}
        if len(ok) < len(v):
            results[name].update(left_out=int(len(v) - len(ok)), why=why)
        if name.startswith("ssim_"):
            results[name]["protocol"] = f"{M.PROTOCOL_TEXT[name[5:]]}, {range_text}"
    if "fid" in wanted:
        where = "the test ground truth"
        if reference is not None:
            where, make = reference
            for ref in make():
                if crop is not None:
                    if crop[1] > ref.shape[-1]:
                        raise InputError(f"--crop {crop[0]}:{crop[1]} is wider than FID's reference images "
                                         f"({ref.shape[-1]} px)")
                    ref = ref[..., crop[0]:crop[1]]
                feats["gt"].append(models["fid"](ref.to(device)))
        a, b = torch.cat(feats["pred"]).numpy(), torch.cat(feats["gt"]).numpy()
        try:
            results["fid"] = {"value": M.frechet_distance(a, b), "n": int(len(a)), "reference_n": int(len(b)),
                              "protocol": f"{fid_network} network; reference: {where}"}
        except ValueError as e:
            unavailable("fid", str(e))
    return results


def evaluate_export(export_dir, data_root, split: str = "test", metrics=("ssim", "ms_ssim", "local_ssim"),
                    batch_size: int = 16, device=None, baseline: bool = True) -> dict:
    """Generate ``split`` of ``data_root`` with an export and score it; with ``baseline`` also score the
    copy-the-reference baseline (reference image vs target), which a pose-transfer model must beat.

    Returns {"model": results, "copy_reference": results} (results as :func:`evaluate` returns them).
    """
    from types import SimpleNamespace

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args = SimpleNamespace(checkpoint=str(export_dir), data=str(data_root), split=split, resolution=None,
                           batch_size=batch_size, limit=None, save_dir=None)
    out = {"model": evaluate(_generated_batches(args, device), list(M.PROTOCOLS), None, set(metrics), False, device)}
    if baseline:
        from hptransfer.data import PairDataset
        from hptransfer.export import load_any

        resolution = load_any(export_dir, prefer_export=True).resolution
        ds = PairDataset(data_root, split, resolution)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
        copies = ((M.to_uint8(b["reference"]), M.to_uint8(b["target"]), b["kp_target"]) for b in loader)
        out["copy_reference"] = evaluate(copies, list(M.PROTOCOLS), None, set(metrics), False, device)
    return out


def pose_following(export_dir, data_root, split: str = "test", batch_size: int = 16, device=None) -> dict:
    """Does the output take the target pose? On a synthetic dataset (body masks from
    ``hptransfer.data.synth.body_masks``), mean L1 (images in [0, 1]) between output and ground truth
    over the *vacated* pixels (body in the reference, background in the target: the reference's pose
    must disappear there) and the *new-body* pixels (body in the target only: the person must appear
    there), for the model and for copying the reference. Lower is better; copying the reference scores
    the full foreground/background difference on both.

    Returns {"model": {"vacated_l1", "new_body_l1"}, "copy_reference": {...}, "pairs": n}.
    """
    import torch.nn.functional as F

    from hptransfer.data import PairDataset
    from hptransfer.data.synth import body_masks
    from hptransfer.export import generate, load_any

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = load_any(export_dir, device=device, prefer_export=True)
    R = g.resolution
    ds = PairDataset(data_root, split, R)
    masks = {k: torch.from_numpy(m)[None, None].float() for k, m in
             body_masks(data_root, {n for pair in ds.pairs for n in pair}).items()}
    masks = {k: (F.interpolate(m, size=(R, R), mode="nearest") if m.shape[-1] != R else m)[0, 0].bool()
             for k, m in masks.items()}
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    out = region_errors(loader, ds.pairs, masks,
                        lambda batch: generate(g, batch["reference"], batch["kp_target"]).float().cpu())
    out["pairs"] = len(ds)
    return out


def region_errors(batches, pairs, masks: dict, produce) -> dict:
    """:func:`pose_following`'s sums: ``batches`` of PairDataset items, ``pairs[index]`` = (reference
    name, target name), ``masks[name]`` (R, R) bool, ``produce(batch)`` -> outputs (B, 3, R, R) in [-1, 1].
    Returns {"model"|"copy_reference": {"vacated_l1", "new_body_l1"}}."""
    sums = {who: {"vacated": [0.0, 0], "new_body": [0.0, 0]} for who in ("model", "copy_reference")}
    for batch in batches:
        for who, out in (("model", produce(batch)), ("copy_reference", batch["reference"])):
            err = (out - batch["target"]).abs().mean(1) / 2  # (B, R, R), [0, 1] image range
            for j, idx in enumerate(batch["index"].tolist()):
                ref_body, tgt_body = (masks[n] for n in pairs[idx])
                for region, m in (("vacated", ref_body & ~tgt_body), ("new_body", tgt_body & ~ref_body)):
                    sums[who][region][0] += float(err[j][m].sum())
                    sums[who][region][1] += int(m.sum())
    return {who: {f"{region}_l1": s / max(n, 1) for region, (s, n) in regions.items()} for who, regions in sums.items()}


def format_table(results: dict) -> str:
    rows = [("metric", "value", "n", "protocol")]
    for name, r in results.items():
        if "unavailable" in r:
            rows.append((name, f"unavailable ({r['unavailable']})", "", ""))
        else:
            left = f"  ({r['left_out']} images left out: {r['why']})" if r.get("left_out") else ""
            rows.append((name, f"{r['value']:.4f}{left}", str(r["n"]), r.get("protocol", "")))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows if not r[1].startswith("unavailable"))
    w2 = max(len(r[2]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {c:>{w2}}  {b:<{w1}}  {d}".rstrip() for a, b, c, d in rows)


def _json_safe(obj):
    """NaN/inf (e.g. local-SSIM of images without keypoints) -> null: strict JSON for other tools."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def run(args) -> int:
    from hptransfer.data.formats import atomic_write_text  # a full disk: an error naming the file, no temp file

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    protocols = protocols_of(args.protocol)
    try:
        crop = M.parse_crop(args.crop)
    except ValueError as e:
        raise InputError(str(e)) from None
    explicit = args.metrics is not None
    wanted = set(ALL_METRICS) if not explicit else {m.strip() for m in args.metrics.split(",") if m.strip()}
    bad = wanted - set(ALL_METRICS)
    if bad:
        raise InputError(f"unknown metrics {sorted(bad)}; choose from {', '.join(ALL_METRICS)}")
    reasons, scored = None, {}
    if args.checkpoint:
        if not args.data:
            raise InputError("--checkpoint needs --data (the dataset to generate from)")
        batches, total, source = _generated_batches(args, device), None, {"checkpoint": args.checkpoint}
    elif args.pred and args.gt:
        matched = match_folders(Path(args.pred), Path(args.gt))
        differ = matched.mismatch()
        if differ and not args.intersection:
            raise InputError(f"{differ}; scoring would compare other images than the ground truth holds: pass "
                             f"--intersection to score the {len(matched)} common names only")
        if differ:
            log.warning("--intersection: scoring the %d common names only; %s", len(matched), differ)
        pairs = matched[: args.limit]
        keypoints = None
        if args.data and "local_ssim" in wanted:  # --data may be there for FID's training images only
            from hptransfer.data import read_annotations
            ann_path = Path(args.data) / f"annotations-{args.split}.csv"
            keypoints, missing = ground_truth_keypoints(pairs, Path(args.gt), read_annotations(ann_path))
            if missing:
                log.warning("%s", keypoint_note(missing, len(pairs), ann_path))
                reasons = {"local_ssim": f"no row in {ann_path.name}"}
        batches = _folder_batches(pairs, keypoints, args.batch_size)
        total = math.ceil(len(pairs) / args.batch_size)
        source = {"pred": args.pred, "gt": args.gt}
        scored = {"images": len(pairs), "left_out": {"predictions": matched.pred_only,
                                                      "ground_truth": matched.gt_only}}
    else:
        raise InputError("give --checkpoint EXPORT --data DIR, or --pred DIR --gt DIR")
    if args.pose_following:
        from hptransfer.data.synth import PARAMS_FILE

        if not args.checkpoint:
            raise InputError("--pose-following needs --checkpoint EXPORT --data DIR (a synthetic dataset)")
        if not (Path(args.data) / PARAMS_FILE).is_file():  # checked before the slow part
            raise InputError(f"--pose-following needs {Path(args.data) / PARAMS_FILE}: body masks exist only for "
                             "datasets written by `hptransfer data synth`")
    results = evaluate(batches, protocols, crop, wanted, explicit, device, args.lpips_net,
                       args.lpips_weights, args.inception_weights, total, args.data_range, reasons,
                       args.fid_network, fid_reference_of(args))
    following = None
    if args.pose_following:
        following = pose_following(args.checkpoint, args.data, args.split, args.batch_size, device)
    doc = {"source": source, "split": args.split, "protocols": protocols, "crop": args.crop,
           "data_range": args.data_range, **scored, "metrics": results}
    if following is not None:
        doc["pose_following"] = following
    doc = _json_safe(doc)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        if scored:
            print(f"{scored['images']} images: {args.pred} against {args.gt}")
        print(format_table(results))
        if following is not None:
            print(f"pose following ({following['pairs']} pairs; L1, image range [0, 1]; lower is better)")
            print(f"{'':16s}  {'vacated':>8s}  {'new body':>8s}")
            for who in ("model", "copy_reference"):
                print(f"{who:16s}  {following[who]['vacated_l1']:8.4f}  {following[who]['new_body_l1']:8.4f}")
    if args.out:
        atomic_write_text(args.out, json.dumps(doc, indent=1))
        if not args.json:
            print(f"wrote {args.out}")
    return 0
