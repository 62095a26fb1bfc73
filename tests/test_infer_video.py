"""Pose readers (CSV, OpenPose COCO-18 / BODY_25, COCO-17, MediaPipe mapping), hptransfer infer and video."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hptransfer import infer, video
from hptransfer.export import export_generator, generate
from hptransfer.models import Generator

# One person, OpenPose-18 (y, x) integer pixels of a 80x60 image; the left ear is missing.
PERSON = np.array([[10, 30], [20, 30], [20, 22], [30, 20], [40, 18], [20, 38], [30, 40], [40, 42],
                   [44, 25], [58, 25], [72, 25], [44, 35], [58, 35], [72, 35], [8, 28], [8, 32],
                   [10, 26], [-1, -1]], np.float32)
# OpenPose-18 index -> COCO-17 / BODY_25 index (inverse of hptransfer.pose's tables)
TO_COCO17 = {0: 0, 15: 1, 14: 2, 17: 3, 16: 4, 5: 5, 2: 6, 6: 7, 3: 8, 7: 9, 4: 10, 11: 11, 8: 12, 12: 13,
             9: 14, 13: 15, 10: 16}
TO_BODY25 = {o: o for o in range(8)} | {8: 9, 9: 10, 10: 11, 11: 12, 12: 13, 13: 14, 14: 15, 15: 16, 16: 17,
                                        17: 18}


def _xyc(n, mapping, kp):
    arr = np.zeros((n, 3), np.float32)
    for o, i in mapping.items():
        if (kp[o] >= 0).all():
            arr[i] = (kp[o][1], kp[o][0], 0.9)
    return arr


def write_pose_fixtures(d, kp=PERSON, tag=""):
    from hptransfer.data import write_annotations
    write_annotations(d / f"poses{tag}.csv", {"person.jpg": kp})
    op18 = _xyc(18, {i: i for i in range(18)}, kp)
    (d / f"op18{tag}.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": op18.ravel().tolist()}]}))
    b25 = _xyc(25, TO_BODY25, kp)
    b25[8] = (30, 44, 0.9)       # mid-hip and feet exist in BODY_25 only
    b25[19:] = (30, 75, 0.8)
    (d / f"body25{tag}.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": b25.ravel().tolist()}]}))
    c17 = _xyc(17, TO_COCO17, kp)
    c17[:, 2] = np.where(c17[:, 2] > 0, 2, 0)
    (d / f"coco17{tag}.json").write_text(json.dumps([{"keypoints": c17.ravel().tolist()}]))


def test_every_pose_format_gives_the_same_keypoints(tmp_path):
    write_pose_fixtures(tmp_path)
    sources = [(str(tmp_path / "poses.csv"), "person.jpg"), (f"{tmp_path / 'poses.csv'}:person.jpg", None),
               (str(tmp_path / "op18.json"), None), (str(tmp_path / "body25.json"), None),
               (str(tmp_path / "coco17.json"), None)]
    for src, name in sources:
        kp, size = infer.read_pose(src, name)
        assert size is None
        np.testing.assert_allclose(kp, PERSON, err_msg=src)


def test_pose_errors_are_clear(tmp_path):
    write_pose_fixtures(tmp_path)
    with pytest.raises(ValueError, match="--pose-name"):
        infer.read_pose(str(tmp_path / "poses.csv"))
    with pytest.raises(KeyError, match="nobody"):
        infer.read_pose(str(tmp_path / "poses.csv"), "nobody")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        infer.read_pose(str(tmp_path / "missing.json"))


def test_mediapipe_mapping():
    H, W = 200, 100
    lm = np.zeros((33, 4), np.float32)
    lm[:, 3] = 1.0
    pts = {0: (50, 20), 11: (60, 50), 12: (40, 50), 13: (65, 80), 14: (35, 80), 23: (58, 130), 24: (42, 130),
           2: (53, 17), 5: (47, 17), 7: (56, 19), 8: (44, 19)}
    for i, (x, y) in pts.items():
        lm[i, :2] = (x / W, y / H)
    lm[27:29, 3] = 0.1  # ankles not visible
    kp = infer.mediapipe_to_openpose18(lm, H, W, hip_shift=0.25)
    np.testing.assert_allclose(kp[2], (50, 40), atol=1e-4)   # right shoulder = MediaPipe 12
    np.testing.assert_allclose(kp[5], (50, 60), atol=1e-4)
    np.testing.assert_allclose(kp[1], (50, 50), atol=1e-4)   # neck = shoulder midpoint
    # each hip moves a quarter of the way toward its shoulder (80 px above it)
    np.testing.assert_allclose(kp[8], (130 - 20, 42 - 0.5), atol=1e-4)
    np.testing.assert_allclose(kp[11], (130 - 20, 58 + 0.5), atol=1e-4)
    np.testing.assert_allclose(kp[14], (17, 47), atol=1e-4)  # right eye = MediaPipe 5
    assert (kp[10] == -1).all() and (kp[13] == -1).all()


def test_image_pose_without_mediapipe_says_how_to_install(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_mediapipe(name, *a, **kw):
        if name.startswith("mediapipe"):
            raise ImportError("no mediapipe")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_mediapipe)
    Image.new("RGB", (40, 60), (200, 10, 10)).save(tmp_path / "p.png")
    with pytest.raises(ImportError, match=r"pip install --no-deps -r requirements-mediapipe.txt"):
        infer.read_pose(str(tmp_path / "p.png"))


@pytest.fixture
def exported(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    g = Generator(tiny_cfg, 64).eval()
    return g, export_generator(g, tmp_path / "export")


def _reference(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    return tmp_path / "ref.png"


def test_infer_cli_fits_like_training(exported, tmp_path):
    from hptransfer.cli import main
    from hptransfer.data.dataset import fit_image, fit_keypoints, to_tensor
    g, path = exported
    ref = _reference(tmp_path)
    write_pose_fixtures(tmp_path)
    out = tmp_path / "out.png"
    assert main(["infer", "--checkpoint", str(path), "--reference", str(ref), "--pose", str(tmp_path / "op18.json"),
                 "--out", str(out), "--device", "cpu"]) == 0
    got = np.asarray(Image.open(out))
    # independent path: the data module's own fit functions on the 80x60 reference and its pose
    r = to_tensor(fit_image(Image.open(ref).convert("RGB"), 64))
    kp = torch.from_numpy(fit_keypoints(PERSON, 80, 60, 64))
    want = ((generate(g, r[None], kp[None])[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert got.shape == (64, 64, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # --pose-size changes the mapping (coordinates taken as pixels of a 160x120 image)
    out2 = tmp_path / "out2.png"
    assert main(["infer", "--checkpoint", str(path), "--reference", str(ref), "--pose",
                 f"{tmp_path / 'poses.csv'}:person.jpg", "--pose-size", "160x120", "--out", str(out2), "--device", "cpu"]) == 0
    assert not np.array_equal(np.asarray(Image.open(out2)), got)


@pytest.mark.parametrize("side_by_side", [False, True])
def test_video_frame_count_and_size(exported, tmp_path, side_by_side):
    import imageio.v2 as imageio
    from hptransfer.cli import main
    _, path = exported
    ref = _reference(tmp_path)
    poses = tmp_path / "poses"
    poses.mkdir()
    for t in range(5):
        kp = PERSON.copy()
        kp[4] += (t * 3, 0)  # the right wrist moves
        write_pose_fixtures(tmp_path, kp, tag=str(t))
        (tmp_path / f"op18{t}.json").rename(poses / f"frame_{t:03d}.json")
    out = tmp_path / "dance.mp4"
    args = ["video", "--checkpoint", str(path), "--reference", str(ref), "--poses", str(poses), "--out", str(out),
            "--fps", "10", "--batch-size", "2", "--device", "cpu"] + (["--side-by-side"] if side_by_side else [])
    assert main(args) == 0
    reader = imageio.get_reader(str(out), format="FFMPEG")
    frames = list(reader.iter_data())
    reader.close()
    assert len(frames) == 5
    assert frames[0].shape[:2] == (64, 128 if side_by_side else 64)


def test_pose_sequence_from_csv_and_driving_video(tmp_path, monkeypatch):
    import imageio.v2 as imageio
    from hptransfer.data import write_annotations
    kps = {f"f{t}.jpg": np.where(PERSON < 0, -1, PERSON + t) for t in range(3)}
    write_annotations(tmp_path / "seq.csv", kps)
    poses, size = video.read_pose_sequence(tmp_path / "seq.csv")
    assert size is None and len(poses) == 3
    np.testing.assert_allclose(poses[1], np.where(PERSON < 0, -1, PERSON + 1))
    # driving video: one estimate per frame (estimator stubbed: MediaPipe is an optional extra)
    frames = [np.full((48, 32, 3), 20 * t, np.uint8) for t in range(4)]
    vid = tmp_path / "drive.mp4"
    assert video.write_video(iter(frames), vid, fps=5) == 4
    seen = []
    monkeypatch.setattr(infer, "estimate_pose", lambda img: (seen.append(img.shape), PERSON)[1])
    poses, size = video.read_pose_sequence(vid)
    assert len(poses) == 4 and size == (48, 32) and seen[0] == (48, 32, 3)


def test_eval_generates_a_split(exported, tmp_path):
    import json
    from hptransfer.cli import main
    from hptransfer.data import synth
    _, path = exported
    root = tmp_path / "data"
    synth.synthesize(root, identities=2, poses=2, size=64, seed=0)
    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(path), "--data", str(root), "--split", "test", "--device", "cpu",
                 "--metrics", "ssim,local_ssim", "--protocol", "gaussian", "--save-dir", str(tmp_path / "gen"),
                 "--out", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    n = m["ssim_gaussian"]["n"]
    assert n > 0 and m["local_ssim"]["n"] == n and 0 < m["local_ssim"]["value"] <= 1
    assert len(list((tmp_path / "gen").glob("*.png"))) == n
    # --pose-following on the synthetic split: copying the reference errs equally both ways (pairs in
    # both orders); without synth.json it is a clear error
    assert main(["eval", "--checkpoint", str(path), "--data", str(root), "--device", "cpu", "--metrics", "ssim",
                 "--pose-following", "--out", str(out)]) == 0
    pf = json.loads(out.read_text())["pose_following"]
    assert pf["pairs"] == n and pf["copy_reference"]["vacated_l1"] > 0.05
    assert pf["copy_reference"]["vacated_l1"] == pytest.approx(pf["copy_reference"]["new_body_l1"])
    assert 0 < pf["model"]["vacated_l1"] < 1 and 0 < pf["model"]["new_body_l1"] < 1
    (root / "synth.json").unlink()
    assert main(["eval", "--checkpoint", str(path), "--data", str(root), "--device", "cpu", "--metrics", "ssim",
                 "--pose-following"]) == 2


def _messages(caplog, level=None):
    import logging
    return [r.getMessage() for r in caplog.records if level is None or r.levelno >= getattr(logging, level)]


def test_infer_warns_when_pose_frame_and_reference_disagree(exported, tmp_path, caplog):
    """A pose CSV of a 256x256 image against a 512x256 (H x W) reference: fit framing would take its
    coordinates as pixels of the reference and draw the person at half size, shifted. Said, with the fix."""
    import logging

    from hptransfer.cli import main
    from hptransfer.data import write_annotations
    _, path = exported
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (512, 256, 3), dtype=np.uint8)).save(tmp_path / "tall.png")
    kp = np.where(PERSON < 0, -1, PERSON * 256 / 80).astype(np.float32)  # the person filling a 256x256 image
    write_annotations(tmp_path / "poses.csv", {"p.jpg": kp})
    args = ["infer", "--checkpoint", str(path), "--reference", str(tmp_path / "tall.png"), "--pose",
            f"{tmp_path / 'poses.csv'}:p.jpg", "--out", str(tmp_path / "o.png"), "--device", "cpu"]
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    warned = _messages(caplog, "WARNING")
    assert any("spans only 40%" in m and "512x256 reference" in m and "--pose-size" in m for m in warned), warned
    assert any(m.startswith("framing: fit (the keypoints lie inside the 512x256 reference") for m in _messages(caplog))
    caplog.clear()
    with caplog.at_level(logging.INFO):  # the pose's own frame given: no size warning, the shapes still differ
        assert main(args + ["--pose-size", "256x256"]) == 0
    warned = _messages(caplog, "WARNING")
    assert not any("spans only" in m for m in warned)
    assert any("pose's frame (256x256) and the reference (512x256) differ in shape" in m for m in warned), warned
    caplog.clear()
    # the CSV is a dataset's (its image beside it): the image's size is read, nothing assumed
    (tmp_path / "images").mkdir()
    Image.new("RGB", (256, 256)).save(tmp_path / "images" / "p.jpg")
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert not any("spans only" in m for m in _messages(caplog, "WARNING"))
    assert any("frame size is known" in m for m in _messages(caplog))


def test_infer_warns_on_few_keypoints_and_says_why_it_frames_the_person(exported, tmp_path, caplog):
    import logging

    from hptransfer.cli import main
    _, path = exported
    ref = _reference(tmp_path)
    few = np.full((18, 2), -1, np.float32)
    few[:2] = PERSON[:2]  # nose and neck only
    write_pose_fixtures(tmp_path, few, tag="few")
    with caplog.at_level(logging.INFO):
        assert main(["infer", "--checkpoint", str(path), "--reference", str(ref), "--pose",
                     str(tmp_path / "op18few.json"), "--out", str(tmp_path / "o.png"), "--device", "cpu"]) == 0
    assert any("only 2 of 18 keypoints (nose, neck)" in m for m in _messages(caplog, "WARNING"))
    caplog.clear()
    far = np.where(PERSON < 0, -1, PERSON * 10).astype(np.float32)  # a 800x600 frame's coordinates
    write_pose_fixtures(tmp_path, far, tag="far")
    with caplog.at_level(logging.INFO):
        assert main(["infer", "--checkpoint", str(path), "--reference", str(ref), "--pose",
                     str(tmp_path / "op18far.json"), "--out", str(tmp_path / "o.png"), "--device", "cpu"]) == 0
    framing = [m for m in _messages(caplog) if m.startswith("framing: ")]
    assert framing == ["framing: person (17 keypoints lie outside the 80x60 reference (up to y 720, x 420): the pose "
                       "is in another frame's coordinates, so a box around the person)"]
    assert not any("keypoints" in m and "only" in m for m in _messages(caplog, "WARNING"))


def test_video_warns_once_for_poses_with_few_keypoints(exported, tmp_path, caplog):
    import logging

    from hptransfer.cli import main
    from hptransfer.data import write_annotations
    _, path = exported
    ref = _reference(tmp_path)
    seq = {f"f{t}.jpg": PERSON.copy() for t in range(4)}
    for t in (1, 3):
        seq[f"f{t}.jpg"][3:] = -1  # nose, neck, right shoulder only
    write_annotations(tmp_path / "seq.csv", seq)
    with caplog.at_level(logging.WARNING):
        assert main(["video", "--checkpoint", str(path), "--reference", str(ref), "--poses", str(tmp_path / "seq.csv"),
                     "--out", str(tmp_path / "v.mp4"), "--device", "cpu"]) == 0
    few = [m for m in _messages(caplog, "WARNING") if "keypoints" in m and "only" in m]
    assert len(few) == 1 and "(pose 1 of 4): only 3 of 18" in few[0] and "1 more poses have fewer than 8" in few[0]
