"""``hptransfer data shard SRC OUT``: a folder dataset -> tar shards with every stage's resolution
(the layout: :mod:`hptransfer.data.shards`); and :class:`ShardSink`, through which the preparation
tools write shards directly (``--shards``).

Each sample is made in a worker process: the source image decoded once, fitted to each size with
:func:`hptransfer.data.dataset.fit_image` (what the folder loader does at that size) and encoded
(``--image-format png``: lossless; ``jpg``: ``--quality``; a source JPEG that is already R x R is
stored as it is). The main process writes the tars with webdataset's ``TarWriter`` (fixed mtime: the
same input gives the same bytes, whatever ``--workers``), closes a shard at ``--shard-size``, indexes
it with DALI's ``wds2idx`` and renames it into place, then appends one line to ``.shard-log.jsonl``:
that line commits the shard. The log holds one line per sample and one per shard (linear); a killed
run, started again with the same arguments, keeps every committed shard and redoes the rest. The
split tables and ``manifest.json`` are written (atomically) at the end.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from hptransfer.data.formats import (DataFormatError, atomic_write_bytes, atomic_write_text, read_annotations,
                                     read_pairs, stored_keypoints)
from hptransfer.data.prepare_common import (JsonLines, Manifest, PrepareError, WorkerPool, default_workers,
                                            progress)
from hptransfer.data.shards import FORMAT, MANIFEST, VERSION, read_wds_index, sample_key, table_dtype

log = logging.getLogger(__name__)

LOG = ".shard-log.jsonl"
STAGE_SIZES = (64, 128, 256, 512, 1024)
IMAGE_FORMATS = ("jpg", "png")


@dataclass
class ShardOptions:
    """What the shards hold: each sample at ``sizes`` (px, fitted with ``fit``), as ``image_format``
    (``quality`` for jpg), about ``shard_bytes`` per tar."""

    sizes: list = field(default_factory=lambda: list(STAGE_SIZES))
    fit: str = "pad"
    image_format: str = "jpg"
    quality: int = 95
    shard_bytes: int = 10**9

    def __post_init__(self):
        self.sizes = sorted({int(s) for s in self.sizes})
        if not self.sizes or self.sizes[0] < 1:
            raise PrepareError(f"--sizes must be positive pixel sizes, got {self.sizes}")
        if self.image_format not in IMAGE_FORMATS:
            raise PrepareError(f"--image-format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.fit not in ("pad", "resize"):
            raise PrepareError(f"--fit must be pad or resize, got {self.fit!r}")
        if not 1 <= self.quality <= 100:
            raise PrepareError(f"--quality must be in [1, 100], got {self.quality}")


def parse_bytes(text: str) -> int:
    """'1GB' -> 10**9, '500MB', '64KiB', '2e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise PrepareError(f"--shard-size {text!r} is not a size like 1GB or 500MB")
    base = 1024 if m.group(3) else 1000
    value = float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " ")
    if value < 1:
        raise PrepareError(f"--shard-size must be positive, got {text!r}")
    return int(value)


def parse_sizes(text: str) -> list:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise PrepareError(f"--sizes {text!r} is not a comma-separated list of pixel sizes, e.g. 64,128,256") from None


# ----------------------------------------------------------------------------- worker side
def _encode(image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)  # fast; the bytes decode to the same pixels at any level
    else:  # 4:4:4: chroma subsampling bleeds colour across a 64-px body (measured: max error 58 -> 13 units)
        image.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _make_sample(name: str, split: str, opts: ShardOptions, job: Callable, args: tuple):
    """Worker side of :meth:`ShardSink.submit`: (name, split, members {ext: bytes}, record) or
    (name, split, None, None) when the job drops the image."""
    from hptransfer.data.dataset import fit_image, fit_keypoints

    made = job(*args)
    if made is None:
        return name, split, None, None
    image, kp = made[0].convert("RGB"), stored_keypoints(made[1]).astype(np.float32)
    source = made[2] if len(made) > 2 else None  # the source file's bytes, where there is one
    H, W = image.height, image.width
    members, at = {}, {}
    for R in opts.sizes:
        fitted = fit_image(image, R, opts.fit)
        if fitted is image and source is not None and source[:2] == b"\xff\xd8" and opts.image_format == "jpg":
            members[f"{R}.jpg"] = source  # already R x R: the source JPEG as it is, no second generation
        else:
            members[f"{R}.{opts.image_format}"] = _encode(fitted, opts.image_format, opts.quality)
        at[str(R)] = fit_keypoints(kp, H, W, R, opts.fit).tolist()
    sha = hashlib.sha256(source if source is not None else image.tobytes()).hexdigest()
    meta = {"name": name, "split": split, "height": H, "width": W, "keypoints": kp.tolist(),
            "keypoints_at": at, "fit": opts.fit, "source_sha256": sha}
    members["json"] = json.dumps(meta).encode("utf-8")
    record = {"name": name, "hw": [H, W], "kp": kp.ravel().tolist(),
              "crc": [zlib.crc32(members[f"{R}.{opts.image_format}"]) for R in opts.sizes]}
    return name, split, members, record


def _folder_image(path: Path, kp):
    """A folder's image for :func:`_make_sample`: (PIL image, keypoints, the file's bytes)."""
    from hptransfer.data.dataset import load_image

    image = load_image(path)
    return image, kp, path.read_bytes()


def _folder_image_or_skip(path: Path, kp):
    """:func:`_folder_image`, or None (counted by the caller) for an image that does not decode."""
    try:
        return _folder_image(path, kp)
    except (DataFormatError, FileNotFoundError) as e:
        log.warning("skipped %s", e)
        return None


# ----------------------------------------------------------------------------- the sink
class _HashingFile:
    """A write-only file that hashes what goes through it (the shard's sha256 without reading it back)."""

    def __init__(self, path: Path):
        self.f, self.sha, self.size = open(path, "wb"), hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class _OpenShard:
    def __init__(self, out: Path, name: str):
        from webdataset import TarWriter

        self.name, self.path = name, out / name
        out.mkdir(parents=True, exist_ok=True)
        self.tmp = out / f".{name}.tmp"
        self.file = _HashingFile(self.tmp)
        self.writer = TarWriter(self.file, encoder=False, mtime=0)
        self.samples: list[dict] = []
        self.bytes = 0


def _check_writer_dependencies() -> None:
    """Writing shards needs webdataset (TarWriter) and DALI's wds2idx (the index format its reader takes);
    reading them needs neither. A one-line error naming the extra, not an ImportError mid-shard."""
    import importlib.util

    missing = [name for name, module in (("webdataset", "webdataset"), ("DALI (its wds2idx)", "wds2idx"))
               if importlib.util.find_spec(module) is None]
    if missing:
        from hptransfer.errors import MissingDependency

        raise MissingDependency(f"writing tar shards needs {' and '.join(missing)}: pip install 'hptransfer[shards]' "
                                "(or 'hptransfer[shards,dali-cuda12]' on CUDA 12; requirements.txt pins both)")


class ShardSink:
    """Samples into tar shards, with :class:`~hptransfer.data.prepare_common.Manifest`'s interface:
    ``is_done``, ``keypoints``, ``submit(name, split, job, *args)``, ``add``, ``finish``,
    ``write_split``. Shards are named after the split a sample was submitted under
    (``train-000000.tar``); a split's table may point into any shard (a name lives once in the set)."""

    def __init__(self, out, settings: dict, opts: ShardOptions, workers: int = 1):
        _check_writer_dependencies()  # before anything is written
        self.out = Path(out)
        self.opts = opts
        self.settings = {"tool": settings, **asdict(opts)}
        for stale in self.out.glob(".*.tar.tmp"):
            stale.unlink()
        self.log = JsonLines(self.out / LOG, self.settings, on_mismatch="error")
        self.done: dict[str, dict] = {}
        self.shards: list[dict] = []  # committed, in commit order (the table's shard numbers)
        pending: list[dict] = []
        for r in self.log.records:
            if "shard" in r:
                self.shards.append(r)
                for s in pending:
                    self.done[s["name"]] = dict(s, shard=r["shard"])
                pending = []
            else:
                pending.append(r)
        self.keys = sum(s["samples"] for s in self.shards)  # uncommitted samples' keys are given again
        self.open: dict[str, _OpenShard] = {}
        self.pool = WorkerPool(workers)
        self.writes = 0
        self.splits: dict[str, dict] = {}  # split -> its manifest entry, as written by write_split

    # -- Manifest's interface
    def is_done(self, name: str) -> bool:
        """Written by this run, or committed by an earlier one."""
        return name in self.done

    def keypoints(self, name: str) -> np.ndarray:
        return np.asarray(self.done[name]["kp"], dtype=np.float32).reshape(18, 2)

    def submit(self, name: str, split: str, job: Callable, *args) -> None:
        for result in self.pool.submit(_make_sample, name, split, self.opts, job, args):
            self._write(*result)

    def add(self, name: str, image, kp, split: str = "train") -> None:
        from hptransfer.data.prepare_common import _given

        self.submit(name, split, _given, image, kp)

    def finish(self) -> None:
        """Wait for the workers, write what they made and commit every open shard (call before
        write_split; also on an interruption: what was made is kept)."""
        try:
            for result in self.pool.drain():
                self._write(*result)
            for split in list(self.open):
                self._commit(split)
        finally:
            self.pool.close()
            self.log.close()

    def write_split(self, split: str, annotations: dict, pairs: list) -> None:
        """The split's table (rows in the order of ``annotations``' names; the keypoints are the ones
        recorded with each sample), pairs and names; then ``manifest.json``. Commits open shards."""
        for open_split in list(self.open):
            self._commit(open_split)
        names = list(annotations)
        missing = [n for n in names if n not in self.done]
        if missing:
            raise PrepareError(f"{self.out}: split {split!r} names {len(missing)} images that are in no committed "
                               f"shard (e.g. {missing[0]!r})")
        row_of = {n: i for i, n in enumerate(names)}
        index_of = {s["shard"]: k for k, s in enumerate(self.shards)}
        indexes: dict[str, dict] = {}
        table = np.zeros(len(names), table_dtype(len(self.opts.sizes)))
        exts = [f"{R}.{self.opts.image_format}" for R in self.opts.sizes]
        for i, name in enumerate(names):
            rec = self.done[name]
            shard = rec["shard"]
            if shard not in indexes:
                indexes[shard] = dict(read_wds_index(self.out / shard.replace(".tar", ".idx")))
            members = indexes[shard][sample_key(rec["key"])]
            table[i] = (index_of[shard], rec["key"], rec["hw"], np.asarray(rec["kp"], np.float32).reshape(18, 2),
                        [members[e][0] for e in exts], [members[e][1] for e in exts], rec["crc"])
        pair_rows = np.array([(row_of[a], row_of[b]) for a, b in pairs], np.int32).reshape(-1, 2)
        for suffix, arr in (("samples", table), ("pairs", pair_rows)):
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            atomic_write_bytes(self.out / f"{split}.{suffix}.npy", buf.getvalue())
        atomic_write_text(self.out / f"{split}.names.txt", "".join(n + "\n" for n in names))
        self.splits[split] = {"images": len(names), "pairs": len(pair_rows),
                              "shards": sorted({self.done[n]["shard"] for n in names})}
        self._write_manifest()
        log.info("%s: %d images, %d pairs in %d shards", split, len(names), len(pair_rows),
                 len(self.splits[split]["shards"]))

    # -- internals
    def _write(self, name: str, split: str, members: Optional[dict], record: Optional[dict]) -> None:
        if members is None or name in self.done:
            return
        shard = self.open.get(split)
        if shard is None:
            number = sum(1 for s in self.shards if s["split"] == split)
            shard = self.open[split] = _OpenShard(self.out, f"{split}-{number:06d}.tar")
        key = self.keys
        self.keys += 1
        shard.writer.write({"__key__": sample_key(key), **members})
        shard.bytes += sum(512 + -(-len(v) // 512) * 512 for v in members.values())  # tar header + padded data
        shard.samples.append(dict(record, key=key))
        self.done[name] = dict(record, key=key, shard=shard.name)  # durable once the shard commits
        self.writes += 1
        if shard.bytes >= self.opts.shard_bytes:
            self._commit(split)

    def _commit(self, split: str) -> None:
        """Close, index (DALI's wds2idx), rename into place, then log: the log line is the commit."""
        from wds2idx import IndexCreator

        shard = self.open.pop(split)
        shard.writer.close()
        shard.file.close()
        idx_tmp = self.out / f".{shard.name}.idx.tmp"
        with IndexCreator(str(shard.tmp), str(idx_tmp), verbose=False) as creator:
            creator.create_index()
        os.replace(idx_tmp, shard.path.with_suffix(".idx"))
        os.replace(shard.tmp, shard.path)
        for s in shard.samples:
            self.log.append(s)
        commit = {"shard": shard.name, "split": split, "samples": len(shard.samples), "bytes": shard.file.size,
                  "sha256": shard.file.sha.hexdigest()}
        self.log.append(commit)
        self.shards.append(commit)
        log.info("wrote %s: %d samples, %.1f MB", shard.name, len(shard.samples), shard.file.size / 1e6)

    def _write_manifest(self) -> None:
        old = {}
        if (self.out / MANIFEST).is_file():
            old = json.loads((self.out / MANIFEST).read_text()).get("splits", {})
        manifest = {"format": FORMAT, "version": VERSION, "sizes": self.opts.sizes, "fit": self.opts.fit,
                    "image_format": self.opts.image_format, "quality": self.opts.quality,
                    "splits": {**old, **self.splits},
                    "shards": [{k: s[k] for k in ("shard", "split", "samples", "bytes", "sha256")} for s in self.shards],
                    "source": self.settings["tool"]}
        for s in manifest["shards"]:
            s["name"] = s.pop("shard")
        atomic_write_text(self.out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


# ----------------------------------------------------------------------------- sinks for the preparers
def add_sink_arguments(parser, shards_flag: bool = True) -> None:
    """--workers and the shard options, shared by ``data shard`` and the preparation tools (which
    also get ``--shards``: write OUT as a shard folder instead of images and CSVs)."""
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes making images (default: the cores this process may use)")
    if shards_flag:
        parser.add_argument("--shards", action="store_true",
                            help="write --out as tar shards with every stage's resolution (no images/ folder)")
    parser.add_argument("--sizes", default=",".join(map(str, STAGE_SIZES)),
                        help="shards: the stage resolutions each sample holds, comma-separated")
    parser.add_argument("--shard-size", default="1GB", help="shards: bytes per tar shard (e.g. 1GB, 500MB)")
    parser.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpg",
                        help="shards: members as jpg (smaller; nvJPEG decodes them on GPUs) or png (lossless)")
    parser.add_argument("--quality", type=int, default=95, help="shards: JPEG quality")
    parser.add_argument("--fit", choices=("pad", "resize"), default="pad",
                        help="shards: how each image is fitted to R x R (data.fit must match at training)")


def shard_options(args) -> ShardOptions:
    if args.workers < 1:
        raise PrepareError(f"--workers must be at least 1, got {args.workers}")
    return ShardOptions(sizes=parse_sizes(args.sizes), fit=args.fit, image_format=args.image_format,
                        quality=args.quality, shard_bytes=parse_bytes(args.shard_size))


def sink_shards(args) -> Optional[ShardOptions]:
    """A preparation tool's shard options: None without ``--shards`` (a folder)."""
    opts = shard_options(args)
    return opts if args.shards else None


def open_sink(out, settings: dict, workers: int = 1, shards: Optional[ShardOptions] = None):
    """The preparation tools' sink: a folder (:class:`~hptransfer.data.prepare_common.Manifest`), or
    a shard folder when ``shards`` options are given."""
    if shards is None:
        return Manifest(out, settings, workers)
    return ShardSink(out, settings, shards, workers)


# ----------------------------------------------------------------------------- data shard
def shard_folder(src, out, opts: ShardOptions, workers: int = 1, skip_bad: bool = False,
                 splits: Optional[list] = None) -> dict:
    """Write the folder dataset ``src`` as shards in ``out``; returns {"written", "skipped", "splits"}."""
    from hptransfer.data.check import splits_in

    src, out = Path(src), Path(out)
    splits = splits or splits_in(src)
    if not splits:
        raise PrepareError(f"{src}: no annotations-<split>.csv found (not a folder dataset)")
    if src.resolve() == out.resolve():
        raise PrepareError(f"{out}: the output must be another folder than the source")
    source = {"from": str(src)}
    for split in splits:
        for kind in ("annotations", "pairs"):
            p = src / f"{kind}-{split}.csv"
            source[f"{kind}-{split}.csv sha256"] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    tables, skipped = {}, 0
    for split in splits:  # all read before anything is written: bad rows stop the command here
        ann = read_annotations(src / f"annotations-{split}.csv", skip_bad=skip_bad)
        pairs = read_pairs(src / f"pairs-{split}.csv", known_names=ann.keys(), skip_bad=skip_bad)
        skipped += len(ann.problems) + len(pairs.problems)
        tables[split] = (ann, pairs)
    sink = ShardSink(out, source, opts, workers)
    job = _folder_image_or_skip if skip_bad else _folder_image
    try:
        for split, (ann, _) in tables.items():
            names = sorted(ann)
            for name in progress(names, total=len(names), desc=f"shard {split}"):
                if not sink.is_done(name):
                    sink.submit(name, split, job, src / "images" / name, ann[name])
    finally:
        sink.finish()
    for split, (ann, pairs) in tables.items():
        names = sorted(ann)
        kept = [n for n in names if sink.is_done(n)]
        dropped = len(names) - len(kept)
        kept_set = set(kept)
        kept_pairs = [(a, b) for a, b in pairs if a in kept_set and b in kept_set]
        if dropped:
            log.warning("%s: %d images did not decode and were skipped (--skip-bad), and %d pairs with them", split,
                        dropped, len(pairs) - len(kept_pairs))
        skipped += dropped
        sink.write_split(split, {n: None for n in kept}, kept_pairs)
    return {"written": sink.writes, "skipped": skipped, "splits": sink.splits}


def add_arguments(parser) -> None:
    parser.add_argument("src", help="folder dataset (images/, annotations-*.csv, pairs-*.csv)")
    parser.add_argument("out", help="output shard folder")
    parser.add_argument("--skip-bad", action="store_true", help="skip (and count) bad rows and images")
    parser.add_argument("--splits", nargs="+", help="splits to write (default: every annotations-<split>.csv)")
    add_sink_arguments(parser, shards_flag=False)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    s = shard_folder(args.src, args.out, shard_options(args), args.workers, args.skip_bad, args.splits)
    from hptransfer.data.prepare_common import final_check

    problems = final_check(Path(args.out))
    counts = ", ".join(f"{k}: {v['images']} images, {v['pairs']} pairs, {len(v['shards'])} shards"
                       for k, v in s["splits"].items())
    print(f"{args.out}: wrote {s['written']} samples ({counts}); skipped {s['skipped']}; data check: "
          f"{problems} problems")
    return 1 if problems else 0
