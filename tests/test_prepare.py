"""Dataset preparation tools (hptransfer data deepfashion | h36m | video) on tiny fixtures made here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hptransfer.data.check import check_dataset
from hptransfer.data.formats import read_annotations, read_pairs
from hptransfer.data.prepare_common import PrepareError


def _dot_image(h, w, y, x, r=3):
    arr = np.full((h, w, 3), 255, np.uint8)
    arr[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = (255, 0, 0)
    return Image.fromarray(arr)


def _find_dot(path):
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (arr[..., 0] > 180) & (arr[..., 1] < 90) & (arr[..., 2] < 90)
    ys, xs = np.nonzero(red)
    assert len(ys), f"no dot in {path}"
    return ys.mean(), xs.mean()


def _kp_list(values):
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def _write_ann(path, rows):
    lines = ["name:keypoints_y:keypoints_x"]
    for name, kp in rows.items():
        lines.append(f"{name}: {_kp_list(kp[:, 0])}: {_kp_list(kp[:, 1])}")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- deepfashion

SOURCES = ["MEN/Denim/id_00000080/01_1_front.jpg", "MEN/Denim/id_00000080/01_2_side.jpg",
           "WOMEN/Dresses/id_00000002/02_4_full.jpg", "WOMEN/Dresses/id_00000002/02_1_front.jpg"]
FLAT = ["fashionMENDenimid0000008001_1front.jpg", "fashionMENDenimid0000008001_2side.jpg",
        "fashionWOMENDressesid0000000202_4full.jpg", "fashionWOMENDressesid0000000202_1front.jpg"]


def _inshop(tmp_path, coords="256x176", index_col=False, highres=False):
    """A fake In-shop tree: square 256x256 img/ (or 150x220 'high-res') with one red dot per image,
    plus benchmark CSVs whose keypoint 0 is the dot (in ``coords``)."""
    img = tmp_path / ("img_highres" if highres else "img")
    ann = tmp_path / "ann"
    ann.mkdir()
    rows = {}
    for i, (rel, flat) in enumerate(zip(SOURCES, FLAT)):
        sy, sx = 60 + 30 * i, 100 + 10 * i  # dot in the 256x256 source
        p = img / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if highres:
            # 150x220 (W x H); canvas height 256 -> scale 256/220, width 174.5 centred in 176
            hy, hx = int(sy * 220 / 256), int((sx - 40) * 220 / 256)
            _dot_image(220, 150, hy, hx, r=2).save(p, quality=98)
            cy, cx = hy * 256 / 220, hx * 256 / 220 + (176 - 150 * 256 / 220) / 2
        else:
            _dot_image(256, 256, sy, sx).save(p, quality=98)
            cy, cx = sy, sx - 40
        kp = np.full((18, 2), -1.0)
        kp[0] = (cy, cx if coords == "256x176" else cx + 40)
        kp[1] = (cy + 20, (cx if coords == "256x176" else cx + 40))
        kp[4] = (cy, 160 if coords == "256x176" else 200)  # a wrist far right: max x tells the frame
        rows[flat] = kp
    _write_ann(ann / "fasion-resize-annotation-train.csv", {k: rows[k] for k in FLAT[:3]})
    _write_ann(ann / "fasion-resize-annotation-test.csv", {FLAT[3]: rows[FLAT[3]]})
    head = ",from,to\n" if index_col else "from,to\n"
    pr = lambda i, a, b: (f"{i}," if index_col else "") + f"{a},{b}\n"  # noqa: E731
    (ann / "fasion-resize-pairs-train.csv").write_text(head + pr(0, FLAT[0], FLAT[1]) + pr(1, FLAT[1], FLAT[2]))
    (ann / "fasion-resize-pairs-test.csv").write_text(head + pr(0, FLAT[3], FLAT[3]))
    return img, ann, rows


def test_flatten_name_matches_benchmark():
    from hptransfer.data.prepare_deepfashion import flatten_name

    assert flatten_name("img/MEN/Denim/id_00000080/01_1_front.jpg") == "fashionMENDenimid0000008001_1front.jpg"
    assert flatten_name("WOMEN/Blouses_Shirts/id_00000001/02_7_additional.jpg") == \
        "fashionWOMENBlouses_Shirtsid0000000102_7additional.jpg"
    with pytest.raises(PrepareError, match="GENDER"):
        flatten_name("a/b.jpg")


@pytest.mark.parametrize("coords,index_col,size,highres", [
    ("256x176", False, (256, 176), False),
    ("256x256", True, (256, 176), False),
    ("256x176", True, (512, 352), False),
    ("256x256", False, (256, 256), False),
    ("256x176", False, (256, 176), True),
])
def test_deepfashion_names_sizes_keypoints(tmp_path, coords, index_col, size, highres, caplog):
    from hptransfer.data.prepare_deepfashion import prepare

    img, ann, rows = _inshop(tmp_path, coords, index_col, highres)
    out = tmp_path / "out"
    caplog.set_level("INFO")
    s = prepare(img, ann, out, size=size)
    assert s["problems"] == 0 and not s["missing_images"] and s["written"] == 4
    assert f"{coords} coordinates" in caplog.text
    got = read_annotations(out / "annotations-train.csv")
    assert sorted(got) == sorted(FLAT[:3])
    assert read_pairs(out / "pairs-train.csv") == [(FLAT[0], FLAT[1]), (FLAT[1], FLAT[2])]
    for name, kp in got.items():
        im = Image.open(out / "images" / name)
        assert (im.height, im.width) == size
        dy, dx = _find_dot(out / "images" / name)
        # the keypoint on the dot in the source lands on the dot in the output
        assert abs(kp[0, 0] - dy) <= 1.5 and abs(kp[0, 1] - dx) <= 1.5, (name, kp[0], (dy, dx))
        assert kp[[2, 3] + list(range(5, 18))].max() == -1


def test_deepfashion_resume_missing_and_cli(tmp_path):
    from hptransfer.data.dataset import PairDataset
    from hptransfer.data.prepare_deepfashion import prepare

    img, ann, _ = _inshop(tmp_path)
    (img / SOURCES[2]).unlink()  # a row without its image
    out = tmp_path / "out"
    s = prepare(img, ann, out)
    assert s["missing_images"] == [FLAT[2]] and s["dropped_pairs"] == 1 and s["written"] == 3
    s2 = prepare(img, ann, out)
    assert s2["written"] == 0  # nothing redone
    assert not any(r["problems"] for r in check_dataset(out).values())
    ds = PairDataset(out, "train", 64)
    assert len(ds) == 1 and ds[0]["reference"].shape == (3, 64, 64)
    r = subprocess.run([sys.executable, "-m", "hptransfer", "data", "deepfashion", "--images", str(img),
                        "--annotations", str(ann), "--out", str(tmp_path / "cli"), "--size", "256x256"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote 3 images" in r.stdout
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fasion-resize-annotation-train.csv").write_text("name:keypoints_y:keypoints_x\nx.jpg: [1, 2]: [3]\n")
    (bad / "fasion-resize-pairs-train.csv").write_text("from,to\n")
    with pytest.raises(PrepareError, match="row 2"):
        prepare(img, bad, tmp_path / "o2")


def test_deepfashion_workers_and_direct_shards(tmp_path):
    """--workers 2 writes the same bytes as 1; --shards writes a shard folder (no images/) whose
    names and keypoints are the folder's, and a rerun makes nothing again."""
    import torch

    from hptransfer.data.dataset import PairDataset
    from hptransfer.data.formats import IMAGE_SIZES
    from hptransfer.data.prepare_deepfashion import prepare
    from hptransfer.data.shard_writer import ShardOptions
    from hptransfer.data.shards import ShardPairDataset, ShardSet

    img, ann, _ = _inshop(tmp_path)
    one, two, sh = tmp_path / "one", tmp_path / "two", tmp_path / "sh"
    prepare(img, ann, one, workers=1)
    prepare(img, ann, two, workers=2)
    for p in sorted(one.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            assert p.read_bytes() == (two / p.relative_to(one)).read_bytes(), p
    assert (one / IMAGE_SIZES).is_file()
    s = prepare(img, ann, sh, workers=2, shards=ShardOptions(sizes=[64, 256], image_format="png"))
    assert s["problems"] == 0 and s["written"] == 4 and not (sh / "images").exists()
    shards = ShardSet(sh)
    csv = read_annotations(one / "annotations-train.csv")
    assert shards.names("train") == sorted(csv)
    for name, row in zip(shards.names("train"), shards.table("train")):
        assert np.array_equal(row["kp"], csv[name]) and tuple(row["hw"]) == (256, 176)
    a, b = PairDataset(one, "train", 64), ShardPairDataset(sh, "train", 64)
    assert len(a) == len(b) == 2
    for i in range(2):
        assert torch.equal(a[i]["kp_target"], b[i]["kp_target"])
        assert (a[i]["reference"] - b[i]["reference"]).abs().mean() < 0.05  # the folder's JPEG generation apart
    assert prepare(img, ann, sh, workers=1, shards=ShardOptions(sizes=[64, 256], image_format="png"))["written"] == 0


# ---------------------------------------------------------------- video

def _dot_pos(t):
    return 20 + 2 * t, 16 + t  # (y, x) of the dot in source frame t


def _make_video(path, n=24, fps=12, h=80, w=64):
    import imageio_ffmpeg

    gen = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, quality=9, macro_block_size=16)
    gen.send(None)
    for t in range(n):
        y, x = _dot_pos(t)
        gen.send(np.asarray(_dot_image(h, w, y, x, r=4)).tobytes())
    gen.close()


def _openpose_jsons(folder, n):
    folder.mkdir(parents=True)
    for t in range(n):
        y, x = _dot_pos(t)
        kp = np.zeros((18, 3))
        kp[0] = (x, y, 0.9)
        kp[1] = (x, y - 10, 0.9)
        kp[2] = (x - 5, y - 10, 0.9)
        kp[5] = (x + 5, y - 10, 0.9)
        kp[10] = (x, 200, 0.9)  # outside the 80 px frame: written as missing
        (folder / f"frame_{t:012d}_keypoints.json").write_text(
            json.dumps({"version": 1.3, "people": [{"pose_keypoints_2d": kp.ravel().tolist()}]}))


def test_video_frames_keypoints_split_resume(tmp_path):
    from hptransfer.data.dataset import PairDataset
    from hptransfer.data.prepare_video import prepare

    vids = []
    for k in ("a", "b", "c"):
        _make_video(tmp_path / f"{k}.mp4")
        _openpose_jsons(tmp_path / "json" / k, 24)
        vids.append(tmp_path / f"{k}.mp4")
    out = tmp_path / "out"
    s = prepare(vids, out, fps=3, openpose_json=tmp_path / "json", test_videos=1, frame="full")
    assert s["problems"] == 0 and s["written"] == 18 and s["test"] == ["c"]
    ann = read_annotations(out / "annotations-train.csv")
    assert sorted(ann) == [f"{k}/f{i:06d}.jpg" for k in "ab" for i in (0, 4, 8, 12, 16, 20)]
    for name in ("a/f000008.jpg", "b/f000020.jpg"):
        dy, dx = _find_dot(out / "images" / name)
        assert abs(ann[name][0, 0] - dy) <= 1.5 and abs(ann[name][0, 1] - dx) <= 1.5
        assert (ann[name][10] == -1).all()
    pairs = read_pairs(out / "pairs-train.csv")
    assert len(pairs) == 2 * 6 * 5 and all(a.split("/")[0] == b.split("/")[0] for a, b in pairs)
    assert len(read_pairs(out / "pairs-test.csv")) == 30
    assert prepare(vids, out, fps=3, openpose_json=tmp_path / "json", test_videos=1, frame="full")["written"] == 0
    assert len(PairDataset(out, "test", 64)) == 30


def test_video_errors(tmp_path):
    from hptransfer.data import prepare_video

    _make_video(tmp_path / "a.mp4")
    _openpose_jsons(tmp_path / "json", 10)
    with pytest.raises(PrepareError, match="10 OpenPose JSON files but .*a.mp4 has 24 frames"):
        prepare_video.prepare([tmp_path / "a.mp4"], tmp_path / "o", openpose_json=tmp_path / "json")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(PrepareError, match="bad.mp4: cannot read video"):
        prepare_video.prepare([tmp_path / "bad.mp4"], tmp_path / "o", openpose_json=tmp_path / "json")
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        with pytest.raises(PrepareError, match=r'pip install "hptransfer\[mediapipe\]"'):
            prepare_video.prepare([tmp_path / "a.mp4"], tmp_path / "o")


def test_from_mediapipe33_mapping_and_hip_correction():
    from hptransfer.pose import MEDIAPIPE_HIP_SHIFT, from_mediapipe33

    lm = np.zeros((33, 4), np.float32)
    lm[:, 3] = 1.0
    lm[:, :2] = 0.5
    lm[11, :2] = (0.6, 0.3)   # left shoulder (x, y)
    lm[12, :2] = (0.4, 0.3)   # right shoulder
    lm[23, :2] = (0.58, 0.6)  # left hip
    lm[24, :2] = (0.42, 0.6)  # right hip
    lm[15, 3] = 0.1           # left wrist not visible
    kp = from_mediapipe33(lm, (200, 100))
    assert np.allclose(kp[5], (60, 60)) and np.allclose(kp[2], (60, 40))
    assert np.allclose(kp[1], (60, 50))
    assert np.allclose(kp[11], (120 + MEDIAPIPE_HIP_SHIFT * (60 - 120), 58 + MEDIAPIPE_HIP_SHIFT * (60 - 58)))
    assert (kp[7] == -1).all()


# ---------------------------------------------------------------- h36m

_H36M_Y = np.array([60, 60, 80, 100, 60, 80, 100, 45, 35, 28, 20, 35, 45, 55, 35, 45, 55], np.float32)
_H36M_X = np.array([50, 42, 42, 42, 58, 58, 58, 50, 50, 50, 50, 60, 64, 66, 40, 36, 34], np.float32)


def _h36m_pose(t):
    return np.stack([_H36M_X + 0.2 * t, _H36M_Y], axis=1)  # (17, 2) (x, y)


def _h36m_frame(t, h=120, w=100):
    arr = np.full((h, w, 3), 128, np.uint8)           # grey background
    arr[15:106, 25:76] = (0, 0, 200)                  # the "person"
    x, y = _h36m_pose(t)[9]
    arr[int(y) - 3:int(y) + 4, int(round(x)) - 3:int(round(x)) + 4] = (255, 0, 0)
    return arr


def _h36m_tree(tmp_path, n=50):
    import imageio_ffmpeg

    root = tmp_path / "h36m"
    poses = {}
    for seq in ("Posing.54138969", "Directions 1.54138969", "Eating.54138969"):
        d = root / "S1" / "Frames" / seq
        d.mkdir(parents=True)
        for t in range(n):
            Image.fromarray(_h36m_frame(t)).save(d / f"{t:05d}.png")
        poses[seq.split(".")[0]] = [np.stack([_h36m_pose(t) for t in range(n)])] * 4
    m = root / "S1" / "Masks" / "Posing.54138969"
    m.mkdir(parents=True)
    mask = np.zeros((120, 100), np.uint8)
    mask[15:106, 25:76] = 255
    for t in range(n):
        Image.fromarray(mask).save(m / f"{t:05d}.png")
    (root / "S1" / "Videos").mkdir()
    gen = imageio_ffmpeg.write_frames(str(root / "S1" / "Videos" / "Greeting.55011271.mp4"), (112, 128), fps=50,
                                      quality=9, macro_block_size=16)
    gen.send(None)
    for t in range(n):
        gen.send(np.ascontiguousarray(np.pad(_h36m_frame(t), ((0, 8), (0, 12), (0, 0)), constant_values=128)).tobytes())
    gen.close()
    poses["Greeting"] = [np.stack([_h36m_pose(t) for t in range(n)])] * 4
    positions = np.empty((), dtype=object)
    positions[()] = {"S1": poses}
    np.savez(root / "data_2d_h36m_gt.npz", positions_2d=positions)
    return root


def test_h36m_sampling_masks_keypoints_split(tmp_path, caplog):
    from hptransfer.data.dataset import PairDataset
    from hptransfer.data.prepare_h36m import prepare

    root = _h36m_tree(tmp_path)
    out = tmp_path / "out"
    caplog.set_level("INFO")
    s = prepare(root, out, size=96, keypoints="gt")
    assert s["problems"] == 0 and s["sequences"] == 3 and s["written"] == 9
    assert "Greeting.55011271: no masks" in caplog.text
    train = read_annotations(out / "annotations-train.csv")
    test = read_annotations(out / "annotations-test.csv")
    assert sorted(test) == [f"S1/Directions_1.54138969/f{i:06d}.jpg" for i in (0, 17, 33)]
    assert len(train) == 6 and not any("Eating" in n for n in train)
    pairs = read_pairs(out / "pairs-train.csv")
    # within subject and camera: Posing (cam 54138969) and Greeting (cam 55011271) never pair
    assert len(pairs) == 2 * 3 * 2 and all(a.split(".")[1][:8] == b.split(".")[1][:8] for a, b in pairs)
    for name, kp in train.items():
        assert Image.open(out / "images" / name).size == (96, 96)
        assert (kp[14:] == -1).all() and (kp[:14] >= 0).all()
        dy, dx = _find_dot(out / "images" / name)
        assert abs(kp[0, 0] - dy) <= 2 and abs(kp[0, 1] - dx) <= 2, (name, kp[0], dy, dx)
    # masked sequence: background whitened; unmasked one keeps its grey
    corner = lambda n: np.asarray(Image.open(out / "images" / n).convert("RGB"))[2, 2]  # noqa: E731
    assert corner("S1/Posing.54138969/f000017.jpg").min() > 240
    assert abs(int(corner("S1/Greeting.55011271/f000017.jpg")[0]) - 128) < 20
    assert prepare(root, out, size=96, keypoints="gt")["written"] == 0
    assert len(PairDataset(out, "train", 64)) == 12


def test_h36m_conversion_and_errors(tmp_path):
    from hptransfer.data.prepare_h36m import from_h36m17, prepare

    kp = from_h36m17(_h36m_pose(0))
    assert tuple(kp[1]) == (35, 50) and tuple(kp[4]) == (55, 34) and tuple(kp[13]) == (100, 58)
    root = _h36m_tree(tmp_path, n=20)
    for p in sorted((root / "S1" / "Masks" / "Posing.54138969").iterdir())[:3]:
        p.unlink()
    with pytest.raises(PrepareError, match="17 mask PNGs but 20 frames"):
        prepare(root, tmp_path / "o", size=64, keypoints="gt")
    (root / "data_2d_h36m_gt.npz").unlink()
    with pytest.raises(PrepareError, match="cdflib|no 2D poses"):
        prepare(root, tmp_path / "o", size=64, keypoints="gt")


def _openpose_file(path, kp_yx, confidence=0.9):
    flat = []
    for y, x in kp_yx:
        flat += [float(x), float(y), confidence if y >= 0 else 0.0]
    path.write_text(json.dumps({"people": [{"pose_keypoints_2d": flat}]}))


def test_h36m_keypoints_from_openpose_json(tmp_path):
    """--keypoints openpose: all 18 from the per-frame JSON files (eyes and ears included), in the crop
    the ground truth decides; one file per source frame or per sampled frame; errors name the folder."""
    from hptransfer.data.prepare_common import bbox_crop_box, crop_resize
    from hptransfer.data.prepare_h36m import from_h36m17, prepare

    n = 20
    root = _h36m_tree(tmp_path, n=n)
    js = tmp_path / "openpose"
    truth = {}
    for seq in ("Posing.54138969", "Directions 1.54138969", "Greeting.55011271"):
        d = js / "S1" / seq
        d.mkdir(parents=True)
        for t in range(n):
            kp = from_h36m17(_h36m_pose(t))
            kp[14:] = kp[0] + np.array([[-3, -2], [-3, 2], [-1, -5], [-1, 5]], np.float32)  # eyes, ears
            kp[10] = -1  # a joint OpenPose missed
            _openpose_file(d / f"{seq}_{t:012d}_keypoints.json", kp)
            truth[(seq, t)] = kp
    out = tmp_path / "out"
    s = prepare(root, out, size=96, keypoints="openpose", openpose_json=js)
    assert s["problems"] == 0
    ann = read_annotations(out / "annotations-train.csv")
    name = "S1/Posing.54138969/f000017.jpg"
    frame = Image.fromarray(_h36m_frame(17))
    box = bbox_crop_box(from_h36m17(_h36m_pose(17)), frame.width, frame.height, 1.0, 0.15)
    _, want = crop_resize(frame, truth[("Posing.54138969", 17)], box, (96, 96))
    np.testing.assert_allclose(ann[name], want, atol=0.51)  # annotations hold whole pixels
    assert (ann[name][14:] >= 0).all() and (ann[name][10] == -1).all()
    # one file per sampled frame (frames 0 and 17 of 20 at 3 fps from 50) works too; other counts do not
    d = js / "S1" / "Posing.54138969"
    for p in sorted(d.iterdir()):
        if int(p.name.split("_")[1]) not in (0, 17, 19):
            p.unlink()
    with pytest.raises(PrepareError, match=r"Posing.54138969: 3 OpenPose JSON files but S1/Posing.54138969 has 20"):
        prepare(root, tmp_path / "o2", size=96, keypoints="openpose", openpose_json=js)
    next(d.glob("*_000000000019_*")).unlink()
    prepare(root, tmp_path / "o3", size=96, keypoints="openpose", openpose_json=js)
    ann3 = read_annotations(tmp_path / "o3" / "annotations-train.csv")
    np.testing.assert_allclose(ann3["S1/Posing.54138969/f000017.jpg"], want, atol=0.51)
    with pytest.raises(PrepareError, match="needs --openpose-json"):
        prepare(root, tmp_path / "o4", size=96, keypoints="openpose")
    with pytest.raises(PrepareError, match="--keypoints must be one of"):
        prepare(root, tmp_path / "o4", size=96, keypoints="coco")


def test_merge_face_takes_eyes_and_ears_only_when_the_noses_agree():
    from hptransfer.data.prepare_h36m import merge_face

    gt = np.full((18, 2), -1, np.float32)
    gt[0], gt[1], gt[2], gt[5] = (30, 50), (40, 50), (42, 40), (42, 60)  # shoulders 20 px apart
    est = gt.copy()
    est[14:] = [(27, 47), (27, 53), (29, 44), (29, 56)]
    est[2] = (99, 99)  # the estimate's body joints are never taken
    got, taken = merge_face(gt, est)
    assert taken and (got[14:] == est[14:]).all() and (got[:14] == gt[:14]).all()
    est[0] = (30, 50 + 10.5)  # nose more than half a shoulder width away: another face, or a wrong one
    got, taken = merge_face(gt, est)
    assert not taken and (got[14:] == -1).all()
    est[0] = (30, 59)
    assert merge_face(gt, est)[1]


def test_interrupted_run_resumes_without_redoing(tmp_path, monkeypatch):
    """Ctrl-C after 4 frames with 2 workers: the frames in flight are finished and kept, the
    manifest is one JSON line per image, and the rerun makes only the rest."""
    from hptransfer.data import prepare_common
    from hptransfer.data.prepare_h36m import prepare

    root = _h36m_tree(tmp_path)
    out = tmp_path / "out"
    real_submit = prepare_common.Manifest.submit
    calls = []

    def flaky_submit(self, *a, **kw):
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C after 4 images
        calls.append(1)
        return real_submit(self, *a, **kw)

    monkeypatch.setattr(prepare_common.Manifest, "submit", flaky_submit)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, out, size=64, workers=2, keypoints="gt")
    monkeypatch.setattr(prepare_common.Manifest, "submit", real_submit)
    assert len(list((out / "images").rglob("*.jpg"))) == 4 and not list((out / "images").rglob("*.tmp"))
    lines = (out / prepare_common.MANIFEST).read_text().splitlines()
    assert len(lines) == 1 + 4 and json.loads(lines[0])["settings"]["tool"] == "h36m"
    assert prepare(root, out, size=64, workers=2, keypoints="gt")["written"] == 5  # only the remaining ones
    assert not any(r["problems"] for r in check_dataset(out).values())


def test_data_h36m_command_writes_shards_like_its_folder(tmp_path, capsys):
    """`hptransfer data h36m --root R --out OUT --shards --workers N` (docs/data.md): no images/ folder, and
    the shards hold the names, keypoints and pairs of the folder the same tool writes."""
    from hptransfer.cli import main
    from hptransfer.data.dataset import PairDataset
    from hptransfer.data.prepare_h36m import prepare
    from hptransfer.data.shards import ShardPairDataset, ShardSet

    root = _h36m_tree(tmp_path)
    folder, sh = tmp_path / "folder", tmp_path / "shards"
    prepare(root, folder, size=96, keypoints="gt")
    assert main(["data", "h36m", "--root", str(root), "--out", str(sh), "--shards", "--workers", "2", "--size", "96",
                 "--sizes", "64", "--image-format", "png", "--keypoints", "gt"]) == 0
    assert "wrote 9 images from 3 sequences" in capsys.readouterr().out and not (sh / "images").exists()
    shards = ShardSet(sh)
    for split in ("train", "test"):
        csv = read_annotations(folder / f"annotations-{split}.csv")
        assert shards.names(split) == sorted(csv), split
        for name, row in zip(shards.names(split), shards.table(split)):
            assert np.array_equal(row["kp"], csv[name]) and tuple(row["hw"]) == (96, 96), name
    assert len(ShardPairDataset(sh, "train", 64)) == len(PairDataset(folder, "train", 64)) == 12
    assert main(["data", "check", str(sh)]) == 0
