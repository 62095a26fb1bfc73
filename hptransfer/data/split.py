"""``hptransfer data split DIR``: one annotations file and one pairs file (or splits that do not suit, e.g.
every pair marked test) -> ``annotations-{train,test}.csv`` and ``pairs-{train,test}.csv``, split by person
so that nobody in the test split was seen in training, and no pair crosses the split.

Who is the person in an image (:func:`persons`), in this order:

- ``--person-csv FILE``: a CSV with a ``name`` and a ``person`` column (others are ignored);
- ``--person-regex REGEX``: the first group (else the whole match) of REGEX searched in the image name,
  e.g. ``'^([^/]+)/'`` for the first folder or ``'^(\\w+?)_'`` for a prefix;
- by default: DeepFashion's item id (``id_00000080`` in an In-shop path, ``id00000080`` in the benchmark's
  flattened names), else the name's first folder (``alice/01.jpg`` -> ``alice``, as ``data photos`` and
  ``data video`` write them). A name that none of these fits is an error naming it.

Units: ``--by person`` (default) keeps each person's images together; ``--by image`` splits images, with
only the pairs keeping them together. A pair whose two images belong to different persons joins their
units (counted in the summary), so a pair is never cut. ``--test`` is the share of units held out (a
fraction below 1) or their number (1 or more); which units is decided by ``--seed`` (same inputs and
seed, same split). The four files are written through temp files and renamed together; existing split
files are replaced only with ``--force``.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np

from hptransfer.data.formats import (_read_text, read_annotations, read_pairs, write_annotations,
                                     write_pairs)
from hptransfer.errors import DataFormatError, InputError, OutputExistsError

log = logging.getLogger(__name__)

DEEPFASHION_ID = re.compile(r"id_?(\d{8})")  # In-shop item ids are 8 digits
SPLITS = ("train", "test")
PERSON_RULES = """who is in an image (in this order):
  --person-csv FILE    a CSV with columns name,person
  --person-regex REGEX the first group of REGEX found in the image name, e.g. '^([^/]+)/' = the first folder
  default              DeepFashion's item id (id_00000080, or id00000080 in flattened names), else the name's
                       first folder (alice/01.jpg -> alice); any other name is an error naming it"""


def _read_person_csv(path: Path) -> dict[str, str]:
    rows = list(csv.reader(io.StringIO(_read_text(path))))
    header = [h.strip() for h in rows[0]] if rows else []
    if "name" not in header or "person" not in header:
        raise DataFormatError(f"{path}: row 1: header must have a 'name' and a 'person' column, "
                              f"got {','.join(header)!r}")
    i_name, i_person = header.index("name"), header.index("person")
    out = {}
    for row, fields in enumerate(rows[1:], start=2):
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise DataFormatError(f"{path}: row {row}: expected {len(header)} fields (as the header), "
                                  f"got {len(fields)}")
        name, person = fields[i_name].strip(), fields[i_person].strip()
        if not person:
            raise DataFormatError(f"{path}: row {row}: empty person for {name!r}")
        out[name] = person
    return out


def persons(names, regex: Optional[str] = None, person_csv=None) -> tuple[dict[str, str], Counter]:
    """({name: person}, {rule: count of names it decided}) by the rules of the module docstring."""
    names = list(names)
    rules: Counter = Counter()
    if person_csv is not None:
        table = _read_person_csv(Path(person_csv))
        missing = [n for n in names if n not in table]
        if missing:
            raise InputError(f"{person_csv}: no row for {len(missing)} of {len(names)} images (first: {missing[0]!r})")
        rules["csv"] = len(names)
        return {n: table[n] for n in names}, rules
    if regex is not None:
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise InputError(f"--person-regex {regex!r}: {e}") from None
    out = {}
    for n in names:
        if regex is not None:
            m = pattern.search(n)
            if m is None:
                raise InputError(f"--person-regex {regex!r} does not match image {n!r}")
            out[n] = m.group(1) if pattern.groups else m.group(0)
            rules["regex"] += 1
            continue
        m = DEEPFASHION_ID.search(n)
        parts = PurePosixPath(n).parts
        if m is not None:
            out[n], rule = "id" + m.group(1), "DeepFashion id"
        elif len(parts) > 1:
            out[n], rule = parts[0], "first folder"
        else:
            raise InputError(f"cannot tell the person of image {n!r}: no DeepFashion id (id_XXXXXXXX) and no folder "
                             f"in its name; give --person-regex REGEX or --person-csv FILE (columns name,person)")
        rules[rule] += 1
    return out, rules


def add_person_arguments(parser) -> None:
    """``--person-regex`` and ``--person-csv``, shared with ``data photos``."""
    parser.add_argument("--person-regex", default=None, metavar="REGEX",
                        help="the person is REGEX's first group in the image name, e.g. '^([^/]+)/' (the first "
                             "folder); default: DeepFashion's id_XXXXXXXX, else the first folder")
    parser.add_argument("--person-csv", default=None, metavar="FILE",
                        help="CSV with columns name,person saying who is in each image")


def _inputs(root: Path, annotations: Optional[str], pairs: Optional[str]) -> tuple[list[Path], list[Path]]:
    """The annotation and pairs files to split: given, else annotations.csv + pairs.csv, else every split's."""
    if annotations or pairs:
        if not (annotations and pairs):
            raise InputError("--annotations and --pairs go together")
        return [Path(annotations)], [Path(pairs)]
    if (root / "annotations.csv").is_file() or (root / "pairs.csv").is_file():
        return [root / "annotations.csv"], [root / "pairs.csv"]
    ann = sorted(root.glob("annotations-*.csv"))
    if not ann:
        raise InputError(f"{root}: no annotations.csv (or annotations-<split>.csv) to split")
    return ann, [root / f"pairs-{p.name[len('annotations-'):]}" for p in ann]


def _units(names: list[str], person: Optional[dict], pairs: list) -> tuple[dict[str, str], int]:
    """{name: unit} where a unit is a person (or an image when ``person`` is None) joined with every
    unit a pair links it to (union-find); and the number of pairs that joined two units."""
    parent: dict[str, str] = {}

    def find(u: str) -> str:
        while parent.setdefault(u, u) != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    of = {n: (person[n] if person is not None else n) for n in names}
    joins = 0
    for a, b in pairs:
        ra, rb = find(of[a]), find(of[b])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        if of[a] != of[b]:
            joins += 1
    return {n: find(u) for n, u in of.items()}, joins


def split(root, test: float = 0.2, by: str = "person", seed: int = 0, regex: Optional[str] = None,
          person_csv=None, annotations: Optional[str] = None, pairs: Optional[str] = None, out=None,
          force: bool = False) -> dict:
    """Split ``root``'s annotations and pairs (see the module docstring); returns the summary
    {split: {"units", "persons", "images", "pairs"}, "rules": {...}, "joins": n, "files": [...]}."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    out = Path(out) if out is not None else root
    if by not in ("person", "image"):
        raise InputError(f"--by must be person or image, got {by!r}")
    if test <= 0:
        raise InputError(f"--test must be > 0 (a fraction below 1, or a count), got {test}")
    targets = [out / f"{kind}-{s}.csv" for s in SPLITS for kind in ("annotations", "pairs")]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise OutputExistsError(f"{existing[0]} exists ({len(existing)} of the 4 split files do); --force replaces "
                                "them (after reading the inputs)")
    ann_files, pair_files = _inputs(root, annotations, pairs)
    ann: dict = {}
    for p in ann_files:
        for name, kp in read_annotations(p).items():
            if name in ann:
                raise DataFormatError(f"{p}: image {name!r} is annotated in an earlier file too")
            ann[name] = kp
    all_pairs: list = []
    for p in pair_files:
        all_pairs += read_pairs(p, known_names=ann)
    names = sorted(ann)
    if by == "image" and regex is None and person_csv is None:  # no person needed: each image counts as one
        who, rules = {n: n for n in names}, {"the image itself": len(names)}
    else:
        who, rules = persons(names, regex, person_csv)
    unit, joins = _units(names, who if by == "person" else None, all_pairs)
    if joins and by == "person":
        log.warning("%d pairs link images of different persons; those persons stay in one split together", joins)
    keys = sorted(set(unit.values()))
    if len(keys) < 2:
        raise InputError(f"{root}: all {len(names)} images form one {'person' if by == 'person' else 'group'} "
                         "(linked by pairs): nothing to split")
    n_test = int(test) if test >= 1 else int(round(test * len(keys)))
    n_test = min(max(n_test, 1), len(keys) - 1)
    order = np.random.default_rng(seed).permutation(len(keys))
    test_units = {keys[i] for i in order[:n_test]}
    side = {n: "test" if unit[n] in test_units else "train" for n in names}
    summary: dict = {"rules": dict(rules), "joins": joins, "files": [str(p) for p in targets]}
    content = {}
    for s in SPLITS:
        s_names = [n for n in names if side[n] == s]
        s_pairs = [(a, b) for a, b in all_pairs if side[a] == s]  # side[b] is the same: a unit never straddles
        content[s] = ({n: ann[n] for n in s_names}, s_pairs)
        summary[s] = {"units": len({unit[n] for n in s_names}), "persons": len({who[n] for n in s_names}),
                      "images": len(s_names), "pairs": len(s_pairs)}
    _write_together(out, content)
    return summary


def _write_together(out: Path, content: dict) -> None:
    """The four split files written into a temp folder in ``out``, then renamed into place one after the
    other (a failure before the renames leaves ``out`` as it was)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".split-"))
    try:
        for s, (ann, pairs) in content.items():
            write_annotations(tmp / f"annotations-{s}.csv", ann)
            write_pairs(tmp / f"pairs-{s}.csv", pairs)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = PERSON_RULES
    parser.add_argument("root", help="dataset folder: images/ and annotations.csv + pairs.csv (or split files)")
    parser.add_argument("--by", choices=("person", "image"), default="person",
                        help="person (default): each person's images in one split; image: only pairs held together")
    parser.add_argument("--test", type=float, default=0.2,
                        help="persons (or images) held out for test: a fraction below 1, or a count (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="which persons go to test (same seed, same split)")
    add_person_arguments(parser)
    parser.add_argument("--annotations", default=None, help="annotation file to split (default: ROOT/annotations.csv, "
                        "else every ROOT/annotations-*.csv)")
    parser.add_argument("--pairs", default=None, help="pairs file to split (default: ROOT/pairs.csv, else every "
                        "ROOT/pairs-*.csv); columns other than from,to are ignored")
    parser.add_argument("--out", default=None, help="where the split files go (default: ROOT)")
    parser.add_argument("--force", action="store_true", help="replace existing annotations-/pairs-{train,test}.csv")


def run(args) -> int:
    s = split(args.root, args.test, args.by, args.seed, args.person_regex, args.person_csv, args.annotations,
              args.pairs, args.out, args.force)
    rules = ", ".join(f"{r} ({n} images)" for r, n in s["rules"].items())
    print(f"the person in each image from: {rules}" + (f"; {s['joins']} pairs join two persons (kept together)"
                                                    if s["joins"] and args.by == "person" else ""))
    print(f"{'':8s} {'persons':>8s} {'images':>8s} {'pairs':>8s}")
    for sp in SPLITS:
        print(f"{sp:8s} {s[sp]['persons']:>8d} {s[sp]['images']:>8d} {s[sp]['pairs']:>8d}")
    print(f"wrote {', '.join(Path(f).name for f in s['files'])} in {Path(s['files'][0]).parent} (seed {args.seed}); "
          f"next: hptransfer data check {args.out or args.root}")
    return 0
