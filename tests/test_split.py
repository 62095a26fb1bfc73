"""``hptransfer data split``: one annotations file and one pairs file -> train/test files by person; no
person on both sides, no pair across the split, deterministic per seed, written all together or not at all."""
from __future__ import annotations

import numpy as np
import pytest

from hptransfer.cli import main
from hptransfer.data import read_annotations, read_pairs, write_annotations
from hptransfer.data.split import persons, split

KP = np.array([[10 + i, 20 + i] for i in range(18)], np.float32)


def _deepfashion(root, n_persons=10, per_person=3, extra_pair=None):
    """Benchmark-style flattened names, one annotations.csv, a pairs.csv with extra columns."""
    root.mkdir(parents=True, exist_ok=True)
    names = {p: [f"fashionWOMENDressesid{p:08d}{v:02d}_1front.jpg" for v in range(per_person)]
             for p in range(n_persons)}
    write_annotations(root / "annotations.csv", {n: KP for ns in names.values() for n in ns})
    rows = [f"{a},{b},test,0.5" for ns in names.values() for a in ns for b in ns if a != b]
    if extra_pair:
        rows.append(f"{extra_pair[0]},{extra_pair[1]},test,0.1")
    (root / "pairs.csv").write_text("from,to,split,score\n" + "\n".join(rows) + "\n")
    return names


def _read(root):
    return {s: (read_annotations(root / f"annotations-{s}.csv"), read_pairs(root / f"pairs-{s}.csv"))
            for s in ("train", "test")}


def test_split_by_person_keeps_people_and_pairs_on_one_side(tmp_path, capsys):
    names = _deepfashion(tmp_path / "d")
    assert main(["data", "split", str(tmp_path / "d"), "--by", "person", "--test", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "the person in each image from: DeepFashion id (30 images)" in out
    got = _read(tmp_path / "d")
    who = {n: p for p, ns in names.items() for n in ns}
    people = {s: {who[n] for n in ann} for s, (ann, _) in got.items()}
    assert len(people["test"]) == 2 and len(people["train"]) == 8 and not people["test"] & people["train"]
    for s, (ann, pairs) in got.items():
        assert pairs and all(a in ann and b in ann for a, b in pairs), s  # no pair crosses the split
    assert sum(len(p) for _, p in got.values()) == 10 * 3 * 2  # every pair kept, extra columns dropped
    assert (tmp_path / "d" / "pairs-test.csv").read_text().splitlines()[0] == "from,to"
    # the same seed gives the same files; existing files are not replaced without --force
    before = {p.name: p.read_text() for p in (tmp_path / "d").glob("*-*.csv")}
    assert main(["data", "split", str(tmp_path / "d")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["data", "split", str(tmp_path / "d"), "--force"]) == 0
    assert {p.name: p.read_text() for p in (tmp_path / "d").glob("*-*.csv")} == before
    assert main(["data", "split", str(tmp_path / "d"), "--force", "--seed", "3"]) == 0
    assert {p.name: p.read_text() for p in (tmp_path / "d").glob("*-*.csv")} != before


def test_a_pair_across_persons_keeps_them_together_and_image_split(tmp_path):
    names = _deepfashion(tmp_path / "d", n_persons=4, extra_pair=None)
    bridge = (names[0][0], names[1][0])
    _deepfashion(tmp_path / "e", n_persons=4, extra_pair=bridge)
    for seed in range(6):  # whichever side they land on, persons 0 and 1 are on the same one
        s = split(tmp_path / "e", test=0.5, seed=seed, out=tmp_path / f"o{seed}")
        assert s["joins"] == 1 and s["test"]["units"] + s["train"]["units"] == 3
        got = _read(tmp_path / f"o{seed}")
        side = {n: sp for sp, (ann, _) in got.items() for n in ann}
        assert side[names[0][0]] == side[names[1][2]]
    # --by image: units are images joined by pairs; each person's three images are one such unit here
    s = split(tmp_path / "d", test=1, by="image", out=tmp_path / "img")
    assert s["test"]["images"] == 3 and s["test"]["pairs"] == 6
    # names that say nothing about the person: --by image needs no person
    write_annotations(tmp_path / "f" / "annotations.csv", {f"{i}.jpg": KP for i in range(4)})
    (tmp_path / "f" / "pairs.csv").write_text("from,to\n0.jpg,1.jpg\n2.jpg,3.jpg\n")
    s = split(tmp_path / "f", test=0.5, by="image")
    assert s["test"]["images"] == 2 and s["test"]["pairs"] == 1 and s["train"]["pairs"] == 1


def test_person_rules(tmp_path):
    assert persons(["alice/1.jpg", "bob/x/2.png"])[0] == {"alice/1.jpg": "alice", "bob/x/2.png": "bob"}
    assert persons(["img/MEN/Denim/id_00000080/01_1_front.jpg"])[0] == {
        "img/MEN/Denim/id_00000080/01_1_front.jpg": "id00000080"}  # the id wins over the folder
    assert persons(["p01_a.jpg", "p01_b.jpg", "p02_a.jpg"], regex=r"^(p\d+)_")[0]["p02_a.jpg"] == "p02"
    with pytest.raises(ValueError, match="cannot tell the person of image 'x.jpg'"):
        persons(["x.jpg"])
    with pytest.raises(ValueError, match="does not match image 'x.jpg'"):
        persons(["p01_a.jpg", "x.jpg"], regex=r"^(p\d+)_")
    (tmp_path / "who.csv").write_text("name,person,note\nx.jpg,ann,-\ny.jpg,ann,-\n")
    assert persons(["x.jpg", "y.jpg"], person_csv=tmp_path / "who.csv")[0] == {"x.jpg": "ann", "y.jpg": "ann"}
    with pytest.raises(ValueError, match="no row for 1 of 2 images"):
        persons(["x.jpg", "z.jpg"], person_csv=tmp_path / "who.csv")


def test_all_or_nothing_and_resplitting_existing_split_files(tmp_path, monkeypatch):
    from hptransfer.data import split as split_module

    _deepfashion(tmp_path / "d", n_persons=5)
    calls = []

    def failing_write_pairs(path, pairs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        from hptransfer.data.formats import write_pairs
        write_pairs(path, pairs)

    monkeypatch.setattr(split_module, "write_pairs", failing_write_pairs)
    with pytest.raises(OSError):
        split(tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["annotations.csv", "pairs.csv"]
    monkeypatch.undo()
    # a dataset whose pairs are all marked test: re-split (the inputs are the split files themselves)
    (tmp_path / "d" / "annotations.csv").rename(tmp_path / "d" / "annotations-test.csv")
    (tmp_path / "d" / "pairs.csv").rename(tmp_path / "d" / "pairs-test.csv")
    s = split(tmp_path / "d", force=True)
    assert s["test"]["persons"] == 1 and s["train"]["persons"] == 4
    assert len(read_pairs(tmp_path / "d" / "pairs-train.csv")) == 4 * 6
