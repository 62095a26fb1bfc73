"""Tar shards (hptransfer data shard, ShardPairDataset, DALI from shards) against the folder they came
from: the round trip at every resolution, rank sharding, exact resume in training, the two loaders'
equality, damaged members, the writer's resume after a kill, the manifests' linear cost, and no image
header read when training starts. Toy sizes: 6 images, 16-64 px."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from hptransfer.data import PairDataset, make_loader, write_annotations, write_pairs
from hptransfer.data.dataset import fit_image, fit_keypoints, load_image
from hptransfer.data.formats import IMAGE_SIZES, DataFormatError
from hptransfer.data.shard_writer import ShardOptions, ShardSink, shard_folder
from hptransfer.data.shards import ShardPairDataset, ShardSet, open_pair_dataset

SIZES = [16, 32, 64]
# (H, W): portrait, landscape, square, tiny (upscaled), exactly 64 (stored as is), odd
SHAPES = [(96, 64), (48, 80), (128, 128), (13, 9), (64, 64), (70, 100)]


def _image(h, w, rng):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 1, (3, 3))
    img = np.stack([255 * (c[k, 0] * xx / w + c[k, 1] * yy / h + c[k, 2] * np.sin(xx / 3 + k)) / 3 + 60
                    for k in range(3)], -1)
    img[: h // 3, : w // 4] = (20, 200, 40)  # asymmetric: a missed mirror shows
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_folder(root, seed=0):
    """6 images (5 PNG, the 64x64 one JPEG), random keypoints (some missing), 12 train pairs, 4 test."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    ann = {}
    for i, (h, w) in enumerate(SHAPES):
        name = f"sub/p{i}.jpg" if (h, w) == (64, 64) else f"sub/p{i}.png"
        (root / "images" / "sub").mkdir(exist_ok=True)
        _image(h, w, rng).save(root / "images" / name, quality=90)
        kp = np.stack([rng.integers(0, h, 18), rng.integers(0, w, 18)], 1).astype(np.float32)
        kp[rng.random(18) < 0.2] = -1
        ann[name] = kp
    names = sorted(ann)
    write_annotations(root / "annotations-train.csv", {n: ann[n] for n in names[:5]})
    write_pairs(root / "pairs-train.csv", [(names[i % 5], names[(i * 2 + 1) % 5]) for i in range(12)])
    write_annotations(root / "annotations-test.csv", {n: ann[n] for n in names[4:]})
    write_pairs(root / "pairs-test.csv", [(names[4], names[5]), (names[5], names[4])] * 2)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder") / "ds")


@pytest.fixture(scope="module")
def png_shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "png"
    shard_folder(folder, out, ShardOptions(sizes=SIZES, image_format="png", shard_bytes=12_000), workers=1)
    return out


def _items_equal(a, b, what):
    for k in ("reference", "target", "kp_reference", "kp_target", "index"):
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), f"{what}: {k} differs"


def test_round_trip_every_sample_and_resolution(folder, png_shards):
    """Read with the stdlib's tarfile (not our reader): every member is the folder's image after
    fit_image at its size, pixel for pixel, and its json keypoints are fit_keypoints'; then the two
    datasets give equal items (flips included) at every size."""
    manifest = json.loads((png_shards / "manifest.json").read_text())
    assert manifest["sizes"] == SIZES and len(manifest["shards"]) >= 3  # 12 kB shards: several
    seen = set()
    for meta in manifest["shards"]:
        with tarfile.open(png_shards / meta["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name in [n for n in members if n.endswith(".json")]:
            key = name[:-5]
            info = json.loads(members[name])
            src = load_image(folder / "images" / info["name"])
            kp = np.asarray(info["keypoints"], np.float32)
            for R in SIZES:
                got = np.asarray(Image.open(io.BytesIO(members[f"{key}.{R}.png"])).convert("RGB"))
                assert np.array_equal(got, np.asarray(fit_image(src, R))), (info["name"], R)
                want_kp = fit_keypoints(kp, src.height, src.width, R)
                assert np.array_equal(np.asarray(info["keypoints_at"][str(R)], np.float32), want_kp)
            seen.add(info["name"])
    assert len(seen) == len(SHAPES)  # each name once, though p4 is in both splits
    for split in ("train", "test"):
        for R in SIZES:
            a = PairDataset(folder, split, R, flip=True, seed=5)
            b = open_pair_dataset(png_shards, split, R, flip=True, seed=5)
            assert isinstance(b, ShardPairDataset) and len(a) == len(b)
            for i in range(len(a)):
                _items_equal(a[i], b[i], f"{split} {R}px pair {i}")


def test_jpeg_members_near_the_folder_and_square_sources_kept(folder, tmp_path):
    out = tmp_path / "jpg"
    shard_folder(folder, out, ShardOptions(sizes=[32, 64], image_format="jpg", quality=95), workers=2)
    shards = ShardSet(out)
    table, names = shards.table("test"), shards.names("test")
    row = table[names.index("sub/p4.jpg")]  # the 64x64 JPEG source: stored as it is at 64 px
    assert shards.read(row, 64) == (folder / "images" / "sub/p4.jpg").read_bytes()
    for R in (32, 64):
        a, b = PairDataset(folder, "train", R), ShardPairDataset(out, "train", R)
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert torch.equal(x["kp_reference"], y["kp_reference"]) and torch.equal(x["kp_target"], y["kp_target"])
            diff = (x["reference"] - y["reference"]).abs() * 127.5
            # one JPEG generation at quality 95 on smooth images: measured max 9, mean 0.6 units
            assert diff.max() <= 20 and diff.mean() <= 1.5, (R, i, float(diff.max()), float(diff.mean()))


def test_dali_webdataset_reader_reads_our_index(png_shards):
    """The .idx files are DALI's wds2idx format: fn.readers.webdataset with them returns, sample by
    sample, the bytes our tables point at."""
    from nvidia.dali import fn, pipeline_def

    shards = ShardSet(png_shards)
    tars = [m["name"] for m in shards.manifest["shards"]]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        return tuple(fn.readers.webdataset(paths=[str(png_shards / n) for n in tars],
                                           index_paths=[str(png_shards / n.replace(".tar", ".idx")) for n in tars],
                                           ext=["32.png", "json"], missing_component_behavior="error"))

    p = pipe()
    p.build()
    rows = {n: shards.table(s)[i] for s in shards.splits() for i, n in enumerate(shards.names(s))}
    for _ in range(sum(m["samples"] for m in shards.manifest["shards"])):
        img, meta = p.run()
        name = json.loads(np.array(meta.as_tensor()).tobytes())["name"]
        assert np.array(img.as_tensor()).tobytes() == shards.read(rows.pop(name), 32)
    assert not rows  # every image once


def test_dali_equals_torch_from_shards_ranks_and_resume(png_shards):
    """Same batches, bit for bit (PNG members), per rank of 2; the ranks are disjoint and cover the
    epoch; skip_batches continues at the exact batch; the order follows (seed, epoch)."""
    from hptransfer.data.dali import make_dali_loader_from_dataset

    R = 32
    ds = ShardPairDataset(png_shards, "train", R, flip=True, seed=3)
    seen = []
    for rank in range(2):
        t = list(make_loader(ds, 2, workers=0, seed=3, epoch=1, rank=rank, world_size=2, pin_memory=False))
        d = list(make_dali_loader_from_dataset(ds, 2, seed=3, epoch=1, rank=rank, world_size=2, num_threads=1,
                                               workers=2))
        assert len(t) == len(d) == 3
        for x, y in zip(t, d):
            _items_equal(x, y, f"rank {rank}")
        resumed = list(make_dali_loader_from_dataset(ds, 2, seed=3, epoch=1, rank=rank, world_size=2, num_threads=1,
                                                     workers=1, skip_batches=2))
        _items_equal(resumed[0], t[2], f"rank {rank} resumed")
        seen.append([i for b in t for i in b["index"].tolist()])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(12))
    other = [b["index"].tolist() for b in make_loader(ds, 2, workers=0, seed=3, epoch=2, pin_memory=False)]
    assert other != [b["index"].tolist() for b in make_loader(ds, 2, workers=0, seed=3, epoch=1, pin_memory=False)]


def _damage(src, dst, how):
    shutil.copytree(src, dst)
    shards = ShardSet(dst)
    table = shards.table("train")
    row = table[int(shards.pairs("train")[0][0])]  # the first pair's reference
    path = dst / shards.shards[int(row["shard"])]
    col = shards.sizes.index(32)
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[int(row["offset"][col]) + int(row["size"][col]) // 2] ^= 0x55
        path.write_bytes(bytes(data))
    else:  # truncate the shard inside the member
        with open(path, "r+b") as f:
            f.truncate(int(row["offset"][col]) + 10)
    return path, shards.where(row, 32).split(": member ")[1]


@pytest.mark.parametrize("how,words", [("flip", "corrupt"), ("truncate", "truncated")])
def test_damaged_member_names_shard_and_member(png_shards, tmp_path, how, words):
    from hptransfer.cli import main
    from hptransfer.data.dali import make_dali_loader_from_dataset

    root = tmp_path / "bad"
    path, member = _damage(png_shards, root, how)
    ds = ShardPairDataset(root, "train", 32)
    with pytest.raises(DataFormatError, match=f"{path}: member {member}: {words}"):
        list(make_loader(ds, 4, workers=0, seed=0, shuffle=False, pin_memory=False))
    with pytest.raises(DataFormatError, match=f"{path}: member {member}: {words}"):  # from a DALI worker, no hang
        list(make_dali_loader_from_dataset(ds, 4, seed=0, shuffle=False, num_threads=1, workers=2))
    skip = ShardPairDataset(root, "train", 32, skip_bad=True)
    t = list(make_loader(skip, 4, workers=0, seed=0, shuffle=False, pin_memory=False))
    dali = make_dali_loader_from_dataset(skip, 4, seed=0, shuffle=False, num_threads=1, workers=1)
    d = list(dali)
    assert skip.decode_failures >= 1 and dali.skipped >= 1
    for x, y in zip(t, d):
        _items_equal(x, y, "skip_bad")
    assert main(["data", "check", str(root)]) == 1
    assert main(["data", "check", str(root), "--no-decode"]) == 1  # the fast check still reads every member
    assert main(["data", "check", str(root), "--skip-bad"]) == 0


def test_writer_resumes_after_a_kill_to_the_same_bytes(folder, tmp_path, monkeypatch):
    opts = ShardOptions(sizes=[16, 32], image_format="png", shard_bytes=8_000)  # 2 samples per shard
    whole = tmp_path / "whole"
    shard_folder(folder, whole, opts, workers=1)
    killed = tmp_path / "killed"
    real_write, calls = ShardSink._write, []

    def dies(self, *a):
        if len(calls) == 3:  # a shard committed and one open: no finally runs on a kill
            monkeypatch.setattr(ShardSink, "finish", lambda self: None)
            raise KeyboardInterrupt
        calls.append(1)
        return real_write(self, *a)

    monkeypatch.setattr(ShardSink, "_write", dies)
    with pytest.raises(KeyboardInterrupt):
        shard_folder(folder, killed, opts, workers=1)
    monkeypatch.undo()
    assert list(killed.glob(".*.tmp")) and not (killed / "manifest.json").exists()
    committed = [json.loads(x) for x in (killed / ".shard-log.jsonl").read_text().splitlines()[1:]]
    assert any("shard" in r for r in committed)
    again = shard_folder(folder, killed, opts, workers=2)
    assert again["written"] < len(SHAPES)  # the committed samples were not made again
    assert not list(killed.glob(".*.tmp"))
    files = sorted(p.name for p in whole.iterdir() if not p.name.startswith("."))
    assert files == sorted(p.name for p in killed.iterdir() if not p.name.startswith("."))
    for name in files:
        if name != "manifest.json":  # its "source" names the output folder
            assert (whole / name).read_bytes() == (killed / name).read_bytes(), name
    with pytest.raises(Exception, match="other settings"):
        shard_folder(folder, killed, ShardOptions(sizes=[16], image_format="png"), workers=1)


def _written_bytes() -> int:
    """Bytes this process has passed to write() (Linux /proc/self/io: counts every rewrite)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar")).split()[1])


@pytest.mark.parametrize("sink", ["folder", "shards"])
def test_manifest_cost_is_linear(tmp_path, sink):
    """Bytes written for 2N images are about twice those for N (the old manifest, rewritten whole every
    50 images, wrote 3.4x here: 600960 vs 2030680 bytes)."""
    from hptransfer.data.shard_writer import open_sink

    img = Image.new("RGB", (4, 4), (10, 20, 30))
    kp = np.arange(36, dtype=np.float32).reshape(18, 2)
    cost = {}
    for n in (400, 800):
        before = _written_bytes()
        s = open_sink(tmp_path / f"{sink}{n}", {"tool": "test"}, workers=1,
                      shards=ShardOptions(sizes=[4], image_format="png") if sink == "shards" else None)
        for i in range(n):
            s.add(f"im{i:05d}.png", img, kp)
        s.finish()
        cost[n] = _written_bytes() - before
    assert 1.8 < cost[800] / cost[400] < 2.3, cost


def test_no_image_header_read_at_training_start(folder, png_shards, tmp_path, monkeypatch, caplog):
    """PIL.Image.open is not called to open a folder with image-sizes.csv or a shard folder; an older
    folder without it is scanned once (one warning), the index written, and not scanned again."""
    import PIL.Image

    old = tmp_path / "old"
    shutil.copytree(folder, old)
    (old / IMAGE_SIZES).unlink(missing_ok=True)
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    caplog.set_level("WARNING")
    PairDataset(old, "train", 32)
    assert len(opened) == len(SHAPES) and (old / IMAGE_SIZES).is_file()  # every split scanned at once
    assert caplog.text.count(f"read the headers of {len(SHAPES)} images") == 1
    opened.clear()
    for ds in (PairDataset(old, "train", 32), PairDataset(old, "test", 64),
               open_pair_dataset(png_shards, "train", 64), open_pair_dataset(png_shards, "test", 16)):
        assert len(ds) > 0
    assert opened == [] and caplog.text.count("read the headers") == 1
    (old / "annotations-train.csv").write_text(_bad_x(old))
    with pytest.raises(DataFormatError, match="row 3: keypoint outside"):  # sizes from the index still check
        PairDataset(old, "train", 32)
    assert opened == []


def test_check_finds_a_stale_size_index(folder, tmp_path):
    from hptransfer.data.check import check_dataset
    from hptransfer.data.formats import read_image_sizes, write_image_sizes

    root = tmp_path / "ds"
    shutil.copytree(folder, root)
    PairDataset(root, "train", 16)  # writes the index
    sizes = read_image_sizes(root)
    assert sizes["sub/p0.png"] == SHAPES[0]
    write_image_sizes(root, {**sizes, "sub/p0.png": (5, 5)})
    problems = [p for r in check_dataset(root, decode=False).values() for p in r["problems"]]
    assert len(problems) == 1 and "sub/p0.png is 5x5 there, the image is 96x64" in problems[0]


def _bad_x(root) -> str:
    """annotations-train.csv with row 3's first x far outside its image."""
    lines = (root / "annotations-train.csv").read_text().splitlines()
    name, ys, xs = lines[2].split(":")
    values = json.loads(xs)
    values[0] = 5000
    lines[2] = f"{name}:{ys}: {json.dumps(values)}"
    return "\n".join(lines) + "\n"


def test_dataset_pickles_without_its_table(png_shards):
    """DALI's Python workers are spawned on a GPU (CUDA forbids fork): the dataset travels pickled,
    without its memory-mapped table or open files, and reopens them there."""
    import pickle

    ds = ShardPairDataset(png_shards, "train", 32, flip=True, seed=1)
    first = ds[0]
    blob = pickle.dumps(ds)
    assert ds.table[1:].tobytes() not in blob  # the table is not in it
    again = pickle.loads(blob)
    assert not again.shards._maps and not again.shards._fds
    _items_equal(first, again[0], "unpickled")


def test_shard_errors_name_what_is_wrong(png_shards, tmp_path):
    with pytest.raises(DataFormatError, match=r"hold \[16, 32, 64\] px, not 128 px"):
        ShardPairDataset(png_shards, "train", 128)
    with pytest.raises(DataFormatError, match="written with fit='pad'"):
        ShardPairDataset(png_shards, "train", 32, fit="resize")
    with pytest.raises(FileNotFoundError, match="no split 'val'"):
        ShardPairDataset(png_shards, "val", 32)
    moved = tmp_path / "moved"
    shutil.copytree(png_shards, moved)
    first = json.loads((moved / "manifest.json").read_text())["shards"][0]["name"]
    (moved / first).unlink()
    ds = ShardPairDataset(moved, "train", 32)
    with pytest.raises(FileNotFoundError, match=f"shard {moved / first} is missing"):
        [ds[i] for i in range(len(ds))]


def test_cli_shard_check_show(folder, tmp_path, capsys):
    from hptransfer.cli import main

    out = tmp_path / "cli"
    assert main(["data", "shard", str(folder), str(out), "--sizes", "16,32", "--workers", "1",
                 "--shard-size", "20kB", "--image-format", "png"]) == 0
    assert "data check: 0 problems" in capsys.readouterr().out
    assert main(["data", "check", str(out)]) == 0
    report = capsys.readouterr().out
    assert "problems found: 0" in report and "images" in report
    assert main(["data", "check", str(out), "--no-decode"]) == 0
    assert main(["data", "show", str(out), "--n", "3", "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 0
    assert main(["data", "shard", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "no annotations" in capsys.readouterr().err
    assert main(["data", "shard", str(folder), str(tmp_path / "y"), "--shard-size", "big"]) == 2
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "images" / "sub/p1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 9)
    args = ["data", "shard", str(broken), str(tmp_path / "z"), "--sizes", "16", "--workers", "1"]
    assert main(args) == 2
    assert "sub/p1.png is unreadable" in capsys.readouterr().err
    assert main(args[:3] + [str(tmp_path / "z2")] + args[4:] + ["--skip-bad"]) == 0
    assert "skipped 1" in capsys.readouterr().out
    assert len(ShardPairDataset(tmp_path / "z2", "train", 16)) < 12  # its pairs went with it


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory):
    """A 64-px synthetic folder (the trainer tests' data) and its PNG shards."""
    from test_train import make_dataset

    root = make_dataset(tmp_path_factory.mktemp("synth") / "ds")
    out = tmp_path_factory.mktemp("synthshards") / "sh"
    shard_folder(root, out, ShardOptions(sizes=[64], image_format="png", shard_bytes=50_000), workers=1)
    return root, out


def test_training_from_shards_equals_folder_and_resumes_exactly(synth_pair, tmp_path):
    """A tiny run from the shards reaches the folder run's weights bit for bit, and one stopped
    mid-epoch and resumed from the shards reaches them too."""
    from test_train import tiny_cfg

    from hptransfer.train import train

    os.environ["HPTRANSFER_NO_BAR"] = "1"
    folder_root, shard_root = synth_pair
    stage = "stages=[{resolution: 64, iterations: 4, batch_size: 2}]"
    extra = ("train.sample_every=0", "loss.layers=[relu1_2]", stage)
    ref = train(tiny_cfg(folder_root, tmp_path / "folder", *extra))
    cfg = tiny_cfg(shard_root, tmp_path / "shards", *extra)
    first = train(cfg, stop_at_step=2)
    assert first["stopped"]
    resumed = train(cfg, resume="auto")
    assert resumed["global_step"] == 4
    for k, v in ref["generator_state"].items():
        assert torch.equal(v, resumed["generator_state"][k]), k
