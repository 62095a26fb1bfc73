"""Synthetic people: determinism, split, garment consistency across poses, keypoints on the body."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from hptransfer.data import read_annotations, read_pairs
from hptransfer.data.synth import body_masks, render_identity, synthesize


def _digest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, identities=5, poses=3, size=64, seed=0, workers=1)
    return root


def test_layout_and_format(small):
    for split in ("train", "test"):
        lines = (small / f"annotations-{split}.csv").read_text().splitlines()
        assert lines[0] == "name:keypoints_y:keypoints_x"
        assert all(l.count(":") == 2 and "[" in l for l in lines[1:])
        assert (small / f"pairs-{split}.csv").read_text().splitlines()[0] == "from,to"
        ann = read_annotations(small / f"annotations-{split}.csv", image_dir=small / "images")
        pairs = read_pairs(small / f"pairs-{split}.csv", known_names=ann)
        assert all(hw == (64, 64) for hw in ann.sizes.values())
        # all ordered pairs of different poses of one identity
        ids = {n.split("_")[0] for n in ann}
        assert len(pairs) == len(ids) * 3 * 2
        assert all(a != b and a.split("_")[0] == b.split("_")[0] for a, b in pairs)


def test_train_test_identities_disjoint(small):
    ids = {s: {n.split("_")[0] for n in read_annotations(small / f"annotations-{s}.csv")} for s in ("train", "test")}
    assert ids["train"] and ids["test"] and not ids["train"] & ids["test"]
    assert len(ids["train"] | ids["test"]) == 5


def test_deterministic_bytes(small, tmp_path):
    synthesize(tmp_path / "a", identities=5, poses=3, size=64, seed=0, workers=2)  # other worker count
    assert _digest(tmp_path / "a") == _digest(small)
    synthesize(tmp_path / "b", identities=5, poses=3, size=64, seed=1, workers=1)
    a, b = _digest(small), _digest(tmp_path / "b")
    assert all(a[k] != b[k] for k in a if k.startswith("images/"))


def _torso_hist(img: np.ndarray, kp: np.ndarray, bins: int = 4) -> np.ndarray:
    """Colour histogram of a band from the neck to the hips' midpoint (kp (y, x))."""
    neck, hips = kp[1], (kp[8] + kp[11]) / 2
    t = np.linspace(0.15, 0.85, 15)[:, None]
    centre = neck + t * (hips - neck)
    offsets = np.array([(0, dx) for dx in range(-2, 3)])
    pts = np.rint((centre[:, None, :] + offsets[None]).reshape(-1, 2)).astype(int)
    pts = np.clip(pts, 0, np.array(img.shape[:2]) - 1)
    q = (img[pts[:, 0], pts[:, 1]] // (256 // bins)).astype(int)
    h = np.bincount(q[:, 0] * bins * bins + q[:, 1] * bins + q[:, 2], minlength=bins ** 3)
    return h / h.sum()


def test_same_garment_in_different_poses():
    people = [render_identity(seed=0, identity=i, poses=4, size=128) for i in range(6)]
    hists = [[_torso_hist(np.asarray(img), kp) for _, img, kp, _ in p] for p in people]
    same, other = [], []
    for i in range(len(people)):
        for a in range(4):
            for b in range(a + 1, 4):
                same.append(np.abs(hists[i][a] - hists[i][b]).sum())
            other.append(np.abs(hists[i][a] - hists[(i + 1) % len(people)][a]).sum())
    assert np.mean(same) < 0.5 * np.mean(other), (np.mean(same), np.mean(other))
    # while the poses clearly differ
    for p in people:
        kps = [kp for _, _, kp, _ in p]
        for a in range(4):
            for b in range(a + 1, 4):
                both = (kps[a] >= 0).all(1) & (kps[b] >= 0).all(1)
                assert np.abs(kps[a][both] - kps[b][both]).mean() > 4


def test_keypoints_land_on_the_body():
    for i in range(4):
        for name, img, kp, mask in render_identity(seed=3, identity=i, poses=4, size=96, with_mask=True):
            vis = (kp >= 0).all(1)
            assert vis[:2].all(), name  # nose and neck are in the image in these renders
            yx = np.rint(kp[vis]).astype(int)
            assert mask[yx[:, 0], yx[:, 1]].all(), name
            assert 0.03 < mask.mean() < 0.6, name  # a figure, not an empty or filled frame
            # and the drawn body differs from the background there (the mask is not just bookkeeping)
            a = np.asarray(img).astype(int)
            assert np.abs(a[mask].mean(0) - a[~mask].mean(0)).sum() > 10 or a[mask].std() > 20


def test_views_and_occlusion_vary():
    names = [n for i in range(2) for n, *_ in render_identity(seed=0, identity=i, poses=6, size=64)]
    views = {n.split("_")[-1][:-4] for n in names}
    assert {"front", "side", "back", "three-quarter"} <= views


def test_left_right_follow_the_view():
    """Facing the camera, the person's right shoulder/hip is on the image's left; from the back, on the right."""
    for i in range(4):
        for name, _, kp, _ in render_identity(seed=1, identity=i, poses=4, size=96):
            view = name.split("_")[-1][:-4]
            if view in ("front", "back") and (kp[[2, 5, 8, 11]] >= 0).all():
                sign = 1 if view == "front" else -1
                assert sign * (kp[5, 1] - kp[2, 1]) > 0 and sign * (kp[11, 1] - kp[8, 1]) > 0, name


def test_capped_pairs(tmp_path):
    synthesize(tmp_path, identities=3, poses=4, size=64, seed=0, test_fraction=0.0, max_pairs_per_identity=5,
               workers=1)
    pairs = read_pairs(tmp_path / "pairs-train.csv")
    per_id = {}
    for a, b in pairs:
        assert a != b and a.split("_")[0] == b.split("_")[0]
        per_id.setdefault(a.split("_")[0], set()).add((a, b))
    assert len(per_id) == 3 and all(len(v) == 5 for v in per_id.values())  # 5 distinct of the 12
    assert read_pairs(tmp_path / "pairs-test.csv") == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        synthesize(tmp_path, identities=2, poses=2, size=32)
    with pytest.raises(ValueError, match="poses"):
        synthesize(tmp_path, identities=2, poses=1, size=64)


def test_cli_synth_then_check(tmp_path, capsys):
    from hptransfer.cli import main

    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--identities", "3", "--poses", "2", "--size", "64",
                 "--seed", "5", "--test-fraction", "0.34"]) == 0
    assert main(["data", "check", str(out)]) == 0
    assert "problems found: 0" in capsys.readouterr().out
    assert main(["data", "show", str(out), "--n", "4", "--out", str(tmp_path / "g.png"), "--cell", "64"]) == 0
    from PIL import Image

    with Image.open(tmp_path / "g.png") as g:
        assert g.size == (128, 128)


def test_cli_views_and_framing_reach_the_generator(tmp_path):
    """`data synth --views front,three-quarter --framing centred` (the ablation's and the garment study's
    data) writes the same files as synthesize() with those views and framing (the CLI's defaults differ)."""
    from hptransfer.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "cli"), "--identities", "2", "--poses", "2", "--size",
                 "64", "--views", "front,three-quarter", "--framing", "centred", "--workers", "1"]) == 0
    synthesize(tmp_path / "lib", identities=2, poses=2, size=64, workers=1, views=("front", "three-quarter"),
               framing="centred")
    assert _digest(tmp_path / "cli") == _digest(tmp_path / "lib")
    params = json.loads((tmp_path / "cli" / "synth.json").read_text())
    assert params["views"] == ["front", "three-quarter"] and params["framing"] == "centred"


def test_depth_order_hides_an_arm_behind_the_torso():
    """The same front-view pose with the right arm swung forward vs back: the right wrist shows
    skin when the arm is in front and is covered (torso/trousers drawn over it) when it is behind."""
    from hptransfer.data.synth import make_identity, render, sample_pose

    ident = make_identity(np.random.default_rng(0), 128)
    ident["long_sleeves"] = False  # forearm in skin colour, which no garment uses
    pose = sample_pose(np.random.default_rng(1), "front")
    pose.update(yaw=0.0, lean_fwd=0.0, lean_side=0.0, r_shoulder_abd=0.0, r_elbow=0.0, r_forearm_twist=0.0)
    seen = {}
    for flex in (40.0, -40.0):
        img, kp, _ = render(ident, dict(pose, r_shoulder_flex=flex), 128, np.random.default_rng(2))
        y, x = np.rint(kp[4]).astype(int)
        seen[flex] = tuple(np.asarray(img)[y, x]) == tuple(ident["skin"])
    assert seen == {40.0: True, -40.0: False}


def test_background_is_per_identity():
    """An identity keeps its background across poses (the reference shows the target's backdrop)."""
    from hptransfer.data.synth import render_identity

    def corners(identity):
        imgs = [np.asarray(img, np.float32) for _, img, _, _ in render_identity(3, identity, 3, 64)]
        return [np.concatenate([a[:4, :4].reshape(-1, 3), a[:4, -4:].reshape(-1, 3)]).mean(0) for a in imgs]

    same = corners(0)
    other = corners(1)
    assert max(np.abs(c - same[0]).max() for c in same[1:]) < 12  # noise only
    assert np.abs(other[0] - same[0]).max() > 12 or np.abs(corners(2)[0] - same[0]).max() > 12


def test_centred_framing_and_chosen_views():
    """framing="centred": the pelvis (hips' midpoint) on the vertical centre line at a fixed scale, so
    the neck-to-pelvis length varies only with lean and view; views restricted to the ones asked for."""
    spines, names = [], []
    for i in range(3):
        for name, _, kp, _ in render_identity(seed=2, identity=i, poses=4, size=128, views=("front",),
                                              framing="centred"):
            names.append(name)
            pelvis = (kp[8] + kp[11]) / 2
            assert abs(pelvis[1] - 64) < 2.0, name
            assert abs(pelvis[0] - 64) < 10.0, name
            spines.append(np.linalg.norm(kp[1] - pelvis))
    assert all(n.endswith("_front.jpg") for n in names)
    assert max(spines) / min(spines) < 1.2  # fixed scale (random framing varies it by up to ~2x)
    with pytest.raises(ValueError, match="framing"):
        synthesize("/nonexistent", identities=2, poses=2, size=64, framing="tight")
    with pytest.raises(ValueError, match="views"):
        synthesize("/nonexistent", identities=2, poses=2, size=64, views=("sideways",))


def test_body_masks_from_the_written_parameters(tmp_path):
    synthesize(tmp_path, identities=3, poses=2, size=64, seed=5, workers=1, views=("front",), framing="centred")
    params = json.loads((tmp_path / "synth.json").read_text())
    assert params == {"seed": 5, "identities": 3, "poses": 2, "size": 64, "views": ["front"], "framing": "centred"}
    expected = {n: m for n, _, _, m in render_identity(5, 1, 2, 64, with_mask=True, views=("front",),
                                                       framing="centred")}
    got = body_masks(tmp_path, list(expected))
    assert got.keys() == expected.keys() and all(np.array_equal(got[n], expected[n]) for n in got)
    assert all(0.03 < m.mean() < 0.6 for m in got.values())
    with pytest.raises(ValueError, match="not the generator's output"):
        body_masks(tmp_path, ["person00001_07_front.jpg"])
    with pytest.raises(ValueError, match="not names this generator writes"):
        body_masks(tmp_path, ["img_001.jpg"])
    (tmp_path / "synth.json").unlink()
    with pytest.raises(FileNotFoundError, match="synth.json"):
        body_masks(tmp_path, list(expected))


def test_pose_following_regions_are_not_swapped(tmp_path):
    """An output equal to the target except on the new-body pixels, where it shows the reference:
    the vacated error is 0 and the new-body error is the copy's; swapped regions would read the other
    way round, masks for the wrong images would make the vacated error non-zero."""
    import torch

    from hptransfer.data import PairDataset
    from hptransfer.evaluate import region_errors

    synthesize(tmp_path, identities=3, poses=3, size=64, seed=1, workers=1, views=("front",), framing="centred")
    ds = PairDataset(tmp_path, "train", 64)
    masks = {k: torch.from_numpy(m) for k, m in body_masks(tmp_path, {n for p in ds.pairs for n in p}).items()}
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)

    def reference_on_new_body(batch):
        new = torch.stack([masks[ds.pairs[i][1]] & ~masks[ds.pairs[i][0]] for i in batch["index"].tolist()])
        return torch.where(new[:, None], batch["reference"], batch["target"])

    r = region_errors(loader, ds.pairs, masks, reference_on_new_body)
    assert r["model"]["vacated_l1"] == 0.0
    assert r["copy_reference"]["new_body_l1"] > 0.05
    assert r["model"]["new_body_l1"] == pytest.approx(r["copy_reference"]["new_body_l1"])
