"""``hptransfer data check DIR``: validate a dataset and print a summary; ``hptransfer data show``:
draw skeletons on images in a grid PNG for a person to look at."""
from __future__ import annotations

import io
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np

from hptransfer.data.formats import (IMAGE_SIZES, DataFormatError, atomic_write_bytes, read_annotations,
                                     read_image_sizes, read_pairs)
from hptransfer.errors import InputError

log = logging.getLogger(__name__)

JOINT_NAMES = ("nose", "neck", "r_sho", "r_elb", "r_wri", "l_sho", "l_elb", "l_wri", "r_hip", "r_kne", "r_ank",
               "l_hip", "l_kne", "l_ank", "r_eye", "l_eye", "r_ear", "l_ear")


def splits_in(root: Path) -> list[str]:
    """Split names that have an annotations-<split>.csv file."""
    return sorted(p.name[len("annotations-"):-len(".csv")] for p in root.glob("annotations-*.csv"))


def check_dataset(root, decode: bool = True) -> dict:
    """Validate every split of ``root`` (a folder or a shard folder); returns {split: stats} with a
    "problems" list in each.

    ``decode``: fully decode each image (finds truncated files; header-only otherwise).
    """
    from PIL import Image

    from hptransfer.data.shards import is_shard_root

    root = Path(root)
    if is_shard_root(root):
        return check_shards(root, decode)
    index_problems = []
    try:
        indexed = read_image_sizes(root)
    except DataFormatError as e:
        indexed, index_problems = {}, [str(e)]
    report = {}
    for split in splits_in(root):
        problems: list[str] = [] if report else list(index_problems)
        stats = {"images": 0, "pairs": 0, "visible": np.zeros(18, np.int64), "sizes": Counter(), "problems": problems}
        try:
            ann = read_annotations(root / f"annotations-{split}.csv", image_dir=root / "images", skip_bad=True)
        except (DataFormatError, FileNotFoundError) as e:
            problems.append(str(e))
            report[split] = stats
            continue
        problems += ann.problems
        stats["images"] = len(ann)
        for name, kp in ann.items():
            stats["visible"] += (kp >= 0).all(axis=1)
            if name in indexed and tuple(indexed[name]) != ann.sizes.get(name, indexed[name]):
                problems.append(f"{root / IMAGE_SIZES}: {name} is {indexed[name][0]}x{indexed[name][1]} there, the image "
                                f"is {ann.sizes[name][0]}x{ann.sizes[name][1]} (delete the file to have it rebuilt)")
            stats["sizes"][ann.sizes.get(name)] += 1
            if decode:
                try:
                    with Image.open(root / "images" / name) as im:
                        im.load()
                except (OSError, ValueError, SyntaxError) as e:
                    problems.append(f"{root / 'images' / name}: image does not decode ({e})")
        pairs_path = root / f"pairs-{split}.csv"
        try:
            pairs = read_pairs(pairs_path, known_names=ann.keys(), skip_bad=True)
            problems += pairs.problems
            stats["pairs"] = len(pairs)
        except (DataFormatError, FileNotFoundError) as e:
            problems.append(str(e))
        report[split] = stats
    return report


def check_shards(root, decode: bool = True) -> dict:
    """:func:`check_dataset` of a shard folder: every shard is there with its recorded size (and with
    ``decode`` its sha256), each split's table matches its names, pairs and the shards' wds2idx
    indexes, and every member of every size reads (length, CRC-32) and, with ``decode``, decodes to
    R x R. Problems name the shard and member."""
    import hashlib

    from PIL import Image

    from hptransfer.data.dataset import fit_keypoints
    from hptransfer.data.shards import ShardSet, read_wds_index, sample_key

    root = Path(root)
    shards = ShardSet(root)
    shard_problems, indexes = [], {}
    for k, meta in enumerate(shards.manifest["shards"]):
        path = root / meta["name"]
        if not path.is_file():
            shard_problems.append(f"shard {path} is missing")
            continue
        if path.stat().st_size != meta["bytes"]:
            shard_problems.append(f"shard {path}: {path.stat().st_size} bytes, the manifest says {meta['bytes']}")
        elif decode:
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    sha.update(block)
            if sha.hexdigest() != meta["sha256"]:
                shard_problems.append(f"shard {path}: sha256 differs from the manifest's (the file changed)")
        try:
            indexes[k] = dict(read_wds_index(path.with_suffix(".idx")))
        except (OSError, DataFormatError) as e:
            shard_problems.append(f"{path.with_suffix('.idx')}: {e}")
    report = {}
    for split in shards.splits():
        problems = list(shard_problems) if not report else []
        stats = {"images": 0, "pairs": 0, "visible": np.zeros(18, np.int64), "sizes": Counter(), "problems": problems}
        report[split] = stats
        try:
            table, pairs, names = shards.table(split), shards.pairs(split), shards.names(split)
        except (OSError, DataFormatError) as e:
            problems.append(str(e))
            continue
        stats["images"], stats["pairs"] = len(table), len(pairs)
        if len(names) != len(table):
            problems.append(f"{root / f'{split}.names.txt'}: {len(names)} names for {len(table)} table rows")
        if len(pairs) and (pairs.min() < 0 or pairs.max() >= len(table)):
            problems.append(f"{root / f'{split}.pairs.npy'}: rows outside the table (0..{len(table) - 1})")
        for i in range(len(table)):
            row = table[i]
            kp = np.asarray(row["kp"])
            stats["visible"] += (kp >= 0).all(axis=1)
            stats["sizes"][tuple(int(v) for v in row["hw"])] += 1
            members = indexes.get(int(row["shard"]), {}).get(sample_key(int(row["key"])))
            for col, R in enumerate(shards.sizes):
                where = shards.where(row, R)
                ext = f"{R}.{shards.ext}"
                if members is not None and members.get(ext) != (int(row["offset"][col]), int(row["size"][col])):
                    problems.append(f"{where}: the table's offset/size differ from the shard's wds2idx index")
                    continue
                try:
                    data = shards.read(row, R)
                    if decode:
                        with Image.open(io.BytesIO(data)) as im:
                            im.load()
                            if im.size != (R, R):
                                problems.append(f"{where}: is {im.width}x{im.height}, expected {R}x{R}")
                except (OSError, ValueError, SyntaxError) as e:
                    problems.append(str(e) if isinstance(e, (DataFormatError, FileNotFoundError))
                                    else f"{where}: does not decode ({e})")
            if decode and i < 4:  # the json member's keypoints are the table's, mapped (a spot check)
                try:
                    meta = _json_member(shards, row, members)
                except (OSError, ValueError) as e:
                    problems.append(f"{root / shards.shards[int(row['shard'])]}: member {sample_key(int(row['key']))}"
                                    f".json: unreadable ({e})")
                    meta = None
                if meta is not None:
                    for R in shards.sizes:
                        want = fit_keypoints(kp, int(row["hw"][0]), int(row["hw"][1]), R, shards.fit)
                        if not np.array_equal(np.asarray(meta["keypoints_at"][str(R)], np.float32), want):
                            problems.append(f"{shards.where(row, R)}: the json member's keypoints differ from the table's")
    return report


def _json_member(shards, row, members):
    import json

    if not members or "json" not in members:
        return None
    offset, size = members["json"]
    with open(shards.root / shards.shards[int(row["shard"])], "rb") as f:
        f.seek(offset)
        return json.loads(f.read(size))


def format_report(report: dict) -> str:
    """The summary table of :func:`check_dataset`'s result."""
    splits = list(report)
    lines = [f"{'':14s}" + "".join(f"{s:>10s}" for s in splits)]
    lines.append(f"{'images':14s}" + "".join(f"{report[s]['images']:>10d}" for s in splits))
    lines.append(f"{'pairs':14s}" + "".join(f"{report[s]['pairs']:>10d}" for s in splits))
    lines.append("visible per joint:")
    for j, name in enumerate(JOINT_NAMES):
        lines.append(f"  {j:2d} {name:9s}" + "".join(f"{int(report[s]['visible'][j]):>10d}" for s in splits))
    for s in splits:
        sizes = ", ".join(f"{'?' if hw is None else f'{hw[0]}x{hw[1]}'} ({n})"
                          for hw, n in report[s]["sizes"].most_common(5))
        lines.append(f"image sizes ({s}): {sizes or '-'}")
    n = sum(len(report[s]["problems"]) for s in splits)
    lines.append(f"problems found: {n}")
    for s in splits:
        for p in report[s]["problems"][:20]:
            lines.append(f"  {p}")
        if len(report[s]["problems"]) > 20:
            lines.append(f"  ... and {len(report[s]['problems']) - 20} more in {s}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("root", help="dataset folder (images/, annotations-*.csv, pairs-*.csv) or shard folder")
    parser.add_argument("--no-decode", action="store_true", help="read image headers only (faster)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="bad rows/images are skipped and counted (exit 0 if usable data remains)")


def run(args) -> int:
    root = Path(args.root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder")
    report = check_dataset(root, decode=not args.no_decode)
    if not report:
        single = [n for n in ("annotations.csv", "pairs.csv") if (root / n).is_file()]
        hint = (f" (it has {' and '.join(single)}: make the splits with `hptransfer data split {root}`)" if single
                else " (a dataset holds images/, annotations-<split>.csv and pairs-<split>.csv, or tar shards with "
                     "manifest.json: `hptransfer data shard`)")
        raise InputError(f"{root}: no annotations-<split>.csv or shard manifest.json found{hint}")
    print(format_report(report))
    bad = sum(len(r["problems"]) for r in report.values())
    if args.skip_bad:
        print(f"skipped {bad} bad rows/images (--skip-bad)")
        return 0 if any(r["pairs"] for r in report.values()) else 1
    return 1 if bad else 0


# ---------------------------------------------------------------- show

def draw_descriptors(img, kp: np.ndarray, resolution: int, count="auto", scale: float = 1.0):
    """Fig. 4, left: the local descriptors of (18, 2) (y, x) keypoints of an image of side ``resolution``
    (``count`` 18 / 31 / 44, "auto" = the paper's rule at that resolution) as centres with their
    R/8 boxes, drawn on PIL ``img`` (the image resized by ``scale``), in place. Keypoint descriptors
    in red, the ones interpolated along limbs in blue."""
    import torch
    from PIL import ImageDraw

    from hptransfer.pose import crop_size, descriptor_count, local_descriptors

    n = descriptor_count(resolution, count)
    if n == 0:
        return img
    centres, valid = local_descriptors(torch.as_tensor(kp, dtype=torch.float32)[None], resolution, n)
    half = crop_size(resolution) * scale / 2
    d = ImageDraw.Draw(img)
    for i in np.flatnonzero(valid[0].numpy()):
        y, x = ((centres[0, i].numpy() + 0.5) * scale - 0.5).tolist()
        col = (220, 30, 30) if i < 18 else (30, 90, 230)
        d.rectangle((x - half, y - half, x + half, y + half), outline=col)
        d.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=col)
    return img


def show_grid(root, out, n: int = 16, split: str = "train", seed: int = 0, cell: int = 224,
              descriptors=None) -> int:
    """Write a PNG grid of ``n`` images of ``split`` with skeletons drawn (with ``descriptors``, 18 /
    31 / 44 / "auto": the local descriptors and their boxes instead, :func:`draw_descriptors`);
    returns the count drawn."""
    from PIL import Image

    from hptransfer.images import OPENPOSE_COLOURS, draw_skeleton

    root = Path(root)
    names, fetch = _image_source(root, split)
    if not names:
        raise DataFormatError(f"{root}: split {split!r} has no images")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(names), min(n, len(names)), replace=False).tolist())
    cols = math.ceil(math.sqrt(len(pick)))
    rows = math.ceil(len(pick) / cols)
    grid = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    for i, idx in enumerate(pick):
        img, kp = fetch(idx)
        s = cell / max(img.width, img.height)
        if descriptors is not None:  # boxes at the image's own resolution, drawn before resizing the keypoints
            big = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
            draw_descriptors(big, kp, max(img.width, img.height), descriptors, s)
            grid.paste(big, ((i % cols) * cell, (i // cols) * cell))
            continue
        if s != 1:
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
            kp[(kp >= 0).all(axis=1)] = (kp[(kp >= 0).all(axis=1)] + 0.5) * s - 0.5
        w = max(1, round(img.width / 100))  # OpenPose's colours, joints outlined, on the photo
        draw_skeleton(kp, img, limb_colours=OPENPOSE_COLOURS, joint_colours=OPENPOSE_COLOURS, joint_outline=(0, 0, 0),
                      width=w, joint_radius=w + 1)
        grid.paste(img, ((i % cols) * cell, (i // cols) * cell))
    buf = io.BytesIO()
    grid.save(buf, format="PNG", optimize=True)
    atomic_write_bytes(out, buf.getvalue())
    return len(pick)


def _image_source(root: Path, split: str):
    """(names, fetch(i) -> (PIL RGB image, (18, 2) keypoints in its pixels)) of a split: a folder's
    images, or a shard folder's largest-size members."""
    from PIL import Image

    from hptransfer.data.shards import ShardSet, is_shard_root

    if is_shard_root(root):
        from hptransfer.data.dataset import fit_keypoints

        shards = ShardSet(root)
        table, R = shards.table(split), max(shards.sizes)

        def fetch_member(i):
            row = table[i]
            with Image.open(io.BytesIO(shards.read(row, R))) as im:
                img = im.convert("RGB")
            return img, fit_keypoints(row["kp"], int(row["hw"][0]), int(row["hw"][1]), R, shards.fit)
        return shards.names(split), fetch_member
    ann = read_annotations(root / f"annotations-{split}.csv")
    names = sorted(ann)

    def fetch_file(i):
        with Image.open(root / "images" / names[i]) as im:
            return im.convert("RGB"), ann[names[i]].copy()
    return names, fetch_file


def add_show_arguments(parser) -> None:
    parser.add_argument("root", help="dataset folder or shard folder")
    parser.add_argument("--n", type=int, default=16, help="number of images")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=0, help="which images (random pick)")
    parser.add_argument("--cell", type=int, default=224, help="cell size in pixels (keeps a 16-image grid under 1 MB)")
    parser.add_argument("--descriptors", nargs="?", const="auto", default=None, choices=["auto", "18", "31", "44"],
                        help="draw the local descriptors (centres and R/8 boxes, Fig. 4) instead of skeletons: "
                             "auto (the paper's count at the image's resolution) or 18 / 31 / 44")


def run_show(args) -> int:
    desc = args.descriptors if args.descriptors in (None, "auto") else int(args.descriptors)
    k = show_grid(args.root, args.out, n=args.n, split=args.split, seed=args.seed, cell=args.cell, descriptors=desc)
    print(f"wrote {args.out} ({k} images of {args.split})")
    return 0
