"""``hptransfer data deepfashion``: DeepFashion In-shop + the pose-transfer benchmark files -> our layout.

Inputs: the In-shop image tree (``img/`` or ``img_highres/``, e.g. ``img/MEN/Denim/id_00000080/01_1_front.jpg``)
and the benchmark's ``fasion-resize-annotation-{train,test}.csv`` / ``fasion-resize-pairs-{train,test}.csv``
(the 256x176 release, or the 256x256 one). Output names are the benchmark's flattened names
(``fashionMENDenimid0000008001_1front.jpg``, see :func:`flatten_name`).

Geometry: the benchmark's keypoints live on a canvas 256 px high and 176 (or 256) px wide; the
source image, scaled to the canvas height, sits centred on it (the 256x256 ``img/`` images thus lose
40 px each side at 176 wide, the 750x1101 high-res ones fit with <1 px of padding). The output
(``--size``) is the same construction at the output height: the image is scaled to the output height
and centred (cropped or padded with white), keypoints scale by out_H/256 and shift by the centring
offset.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from hptransfer.data.formats import DataFormatError, read_annotations, read_pairs
from hptransfer.data.prepare_common import PrepareError, final_check, parse_size, progress
from hptransfer.data.shard_writer import ShardOptions, add_sink_arguments, open_sink, sink_shards

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
CANVAS_H = 256


def flatten_name(rel: str) -> str:
    """In-shop relative path -> the benchmark's flattened name.

    ``[img/]MEN/Denim/id_00000080/01_1_front.jpg`` -> ``fashionMENDenimid0000008001_1front.jpg``:
    the rule of the benchmark's ``tool/generate_fashion_datasets.py`` (PATN/GFLA): 'fashion' +
    gender + category + the id without '_' + the file name keeping only its first '_'.
    """
    parts = Path(rel.replace("\\", "/")).parts
    if parts and parts[0] in ("img", "img_highres"):
        parts = parts[1:]
    if len(parts) != 4:
        raise PrepareError(f"{rel}: expected GENDER/CATEGORY/id_XXXXXXXX/FILE under the In-shop image folder")
    gender, category, ident, fname = parts
    head, *rest = fname.split("_")
    return "fashion" + gender + category + ident.replace("_", "") + head + "_" + "".join(rest)


def index_images(images: Path) -> dict[str, Path]:
    """Walk the In-shop tree: flattened name -> source path. ``images`` is ``img/`` (holding MEN/,
    WOMEN/) or its parent."""
    images = Path(images)
    if not images.is_dir():
        raise PrepareError(f"{images}: image folder not found")
    for sub in ("img_highres", "img"):
        if not (images / "MEN").is_dir() and not (images / "WOMEN").is_dir() and (images / sub).is_dir():
            images = images / sub
            break
    out = {}
    for dirpath, _, files in os.walk(images):
        for f in files:
            if f.lower().endswith(IMAGE_EXTS):
                p = Path(dirpath) / f
                rel = p.relative_to(images).as_posix()
                try:
                    out[flatten_name(rel)] = p
                except PrepareError:
                    log.debug("skipping %s (not GENDER/CATEGORY/ID/FILE)", p)
    if not out:
        raise PrepareError(f"{images}: no images found in the GENDER/CATEGORY/id_X/FILE layout")
    return out


def find_csv(folder: Path, kind: str, split: str) -> Optional[Path]:
    """The benchmark file of ``kind`` ('annotation' or 'pairs') for ``split``, or None."""
    for stem in ("fasion-resize", "fashion-resize", "fasion", "fashion"):
        p = folder / f"{stem}-{kind}-{split}.csv"
        if p.exists():
            return p
    found = sorted(folder.glob(f"*{kind}*{split}*.csv"))
    if len(found) > 1:
        raise PrepareError(f"{folder}: several {kind} files for {split}: {[f.name for f in found]}; keep one")
    return found[0] if found else None


def detect_canvas_width(ann: dict, path: Path, override: str = "auto") -> int:
    """176 or 256: the width of the coordinate frame of ``ann`` (max x over rows > 176 means 256)."""
    if override != "auto":
        return parse_size(override)[1]
    xs = [kp[:, 1].max() for kp in ann.values() if (kp[:, 1] >= 0).any()]
    max_x = max(xs) if xs else 0
    width = 256 if max_x > 176 else 176
    log.info("%s: max x over rows is %.0f -> keypoints are in %dx%d coordinates (override with --coords)",
             path.name, max_x, CANVAS_H, width)
    return width


def convert(src: Path, kp: np.ndarray, canvas_w: int, size: tuple[int, int]):
    """Load ``src``, fit it to ``size`` (H, W); map (18, 2) (y, x) canvas keypoints to the output."""
    from PIL import Image

    out_h, out_w = size
    with Image.open(src) as im:
        im = im.convert("RGB")
        scale = out_h / im.height
        new_w = max(1, round(im.width * scale))
        im = im.resize((new_w, out_h), Image.BICUBIC)
    canvas = Image.new("RGB", (out_w, out_h), (255, 255, 255))
    canvas.paste(im, ((out_w - new_w) // 2, 0))
    c = out_h / CANVAS_H
    dx = (out_w - canvas_w * c) / 2
    kp = np.asarray(kp, dtype=np.float32)
    vis = (kp >= 0).all(axis=1)
    new = np.full_like(kp, -1)
    new[vis, 0] = kp[vis, 0] * c
    new[vis, 1] = kp[vis, 1] * c + dx
    inside = vis & (new[:, 1] >= 0) & (new[:, 1] <= out_w - 1) & (new[:, 0] <= out_h - 1)
    new[~inside] = -1
    return canvas, new


def _convert_or_skip(src: Path, kp: np.ndarray, canvas_w: int, size: tuple[int, int]):
    """:func:`convert` in a sink's worker; None (the image is listed as missing) when it cannot be read."""
    try:
        return convert(src, kp, canvas_w, size)
    except OSError as e:
        log.warning("%s: cannot read image (%s); skipped", src, e)
        return None


def prepare(images, annotations, out, size=(256, 176), coords: str = "auto", workers: int = 1,
            shards: Optional[ShardOptions] = None) -> dict:
    """Convert the benchmark; returns {"written": n, "missing_images": [...], "dropped_pairs": n, "problems": n}.
    ``workers``: processes converting images; ``shards``: write a shard folder instead of a folder."""
    images, annotations, out = Path(images), Path(annotations), Path(out)
    index = index_images(images)
    log.info("%s: %d In-shop images", images, len(index))
    from PIL import Image
    with Image.open(next(iter(index.values()))) as im:
        if im.height < size[0]:
            log.warning("%s: images are %dx%d, smaller than the output %dx%d: they will be upsampled "
                        "(use img_highres/ for 512x352)", images, im.height, im.width, *size)
    manifest = open_sink(out, {"tool": "deepfashion", "size": list(size), "coords": coords}, workers, shards)
    summary = {"written": 0, "missing_images": [], "dropped_pairs": 0}
    splits = {}
    try:
        for split in ("train", "test"):
            ann_path = find_csv(annotations, "annotation", split)
            pairs_path = find_csv(annotations, "pairs", split)
            if ann_path is None:
                log.warning("%s: no annotation file for %s", annotations, split)
                continue
            if pairs_path is None:
                raise PrepareError(f"{annotations}: annotation file {ann_path.name} has no pairs file for {split}")
            try:
                ann = read_annotations(ann_path)
                pairs = read_pairs(pairs_path)
            except DataFormatError as e:
                raise PrepareError(str(e)) from None
            canvas_w = detect_canvas_width(ann, ann_path, coords)
            missing = [n for n in ann if n not in index]
            for n in missing:
                log.warning("%s: row for %s: no such image under %s", ann_path, n, images)
            summary["missing_images"] += missing
            todo = [n for n in ann if n in index]
            for name in progress(todo, total=len(todo), desc=f"deepfashion {split}"):
                if not manifest.is_done(name):
                    manifest.submit(name, split, _convert_or_skip, index[name], ann[name], canvas_w, size)
            splits[split] = (todo, pairs, pairs_path)
    finally:
        manifest.finish()
    if not splits:
        raise PrepareError(f"{annotations}: no fasion-resize-annotation-{{train,test}}.csv found")
    for split, (todo, pairs, pairs_path) in splits.items():
        done_ann = {n: manifest.keypoints(n) for n in todo if manifest.is_done(n)}
        summary["missing_images"] += [n for n in todo if n not in done_ann]
        kept = [(a, b) for a, b in pairs if a in done_ann and b in done_ann]
        dropped = len(pairs) - len(kept)
        if dropped:
            unknown = sorted({n for p in pairs for n in p if n not in done_ann})
            log.warning("%s: %d pairs dropped: %d names without an annotation row or image (e.g. %s)",
                        pairs_path, dropped, len(unknown), ", ".join(unknown[:3]))
        summary["dropped_pairs"] += dropped
        manifest.write_split(split, done_ann, kept)
    summary["written"] = manifest.writes
    if summary["missing_images"]:
        log.warning("%d annotation rows have no image (listed above)", len(summary["missing_images"]))
    summary["problems"] = final_check(out)
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("--images", required=True, help="In-shop img/ or img_highres/ folder (or its parent)")
    parser.add_argument("--annotations", required=True,
                        help="folder with fasion-resize-annotation-{train,test}.csv and fasion-resize-pairs-*.csv")
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--size", default="256x176", choices=["256x176", "256x256", "512x352"], help="output HxW")
    parser.add_argument("--coords", default="auto", choices=["auto", "256x176", "256x256"],
                        help="coordinate frame of the CSV keypoints (auto: from the max x over rows)")
    add_sink_arguments(parser)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        s = prepare(args.images, args.annotations, args.out, parse_size(args.size), args.coords, args.workers,
                    sink_shards(args))
    except PrepareError as e:
        print(f"error: {e}")
        return 2
    print(f"{args.out}: wrote {s['written']} images; {len(s['missing_images'])} missing images, "
          f"{s['dropped_pairs']} pairs dropped; data check: {s['problems']} problems")
    return 1 if s["problems"] else 0
