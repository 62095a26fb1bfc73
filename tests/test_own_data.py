"""The "your own data" path of docs/own-data.md, end to end at toy size: loose photos (synthetic renders
saved as JPEGs, one folder per person, wider than tall) and a keypoint CSV -> `data photos` -> `data split`
-> `data check` -> `train --config configs/own_data_cpu.yaml` -> samples, export -> `infer` and `eval`.
The MediaPipe variant (no keypoint CSV) is in tests/test_mediapipe.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from hptransfer.cli import main
from hptransfer.data import read_annotations, read_pairs, write_annotations

ROOT = Path(__file__).resolve().parents[1]
PEOPLE = ("alice", "bob", "carol")
SIZE = 96  # rendered square, pasted into a 96 x 128 (H x W) "photo"


def write_photos(folder: Path, people=PEOPLE, poses: int = 3, size: int = SIZE, seed: int = 0) -> dict:
    """Loose JPEGs ``folder/<person>/<k>.jpg`` (a render pasted off-centre on a wider canvas) and their
    true keypoints {name: (18, 2) (y, x)} in the photo's pixels."""
    from hptransfer.data import synth

    rng = np.random.default_rng(seed)
    truth = {}
    for person in people:
        ident = synth.make_identity(rng, size)
        for k in range(poses):
            img, kp, _ = synth.render(ident, synth.sample_pose(rng, "front"), size, rng, framing="centred")
            photo = Image.new("RGB", (size * 4 // 3, size), (230, 230, 225))
            photo.paste(img, (size // 6, 0))
            name = f"{person}/{k}.jpg"
            (folder / person).mkdir(parents=True, exist_ok=True)
            photo.save(folder / name, quality=92)
            truth[name] = np.where(kp >= 0, kp + np.array([0, size // 6], np.float32), -1)
    return truth


def test_own_photos_to_a_trained_model_and_its_samples(tmp_path, capsys):
    photos, data, run = tmp_path / "photos", tmp_path / "data" / "mine", tmp_path / "runs" / "mine"
    truth = write_photos(photos)
    write_annotations(tmp_path / "keypoints.csv", truth)

    assert main(["data", "photos", "--images", str(photos), "--keypoints", str(tmp_path / "keypoints.csv"),
                 "--out", str(data), "--size", "64"]) == 0
    assert "9 images of 3 persons" in capsys.readouterr().out
    ann = read_annotations(data / "annotations.csv", image_dir=data / "images")
    assert sorted(ann) == sorted(truth) and len(read_pairs(data / "pairs.csv")) == 3 * 3 * 2
    for name, kp in ann.items():  # person framing: the keypoints' longer extent fills ~80% of the 64-px square
        vis = kp[(kp >= 0).all(axis=1)]
        assert Image.open(data / "images" / name).size == (64, 64)
        assert 0.72 < (vis.max(axis=0) - vis.min(axis=0)).max() / 64 < 0.84, name

    assert main(["data", "split", str(data), "--by", "person", "--test", "1"]) == 0
    assert main(["data", "check", str(data)]) == 0
    capsys.readouterr()
    test_names = sorted(read_annotations(data / "annotations-test.csv"))
    assert len({n.split("/")[0] for n in test_names}) == 1  # one person held out, all of their photos

    assert main(["train", "--config", str(ROOT / "configs" / "own_data_cpu.yaml"), f"data.root={data}",
                 "--out", str(run), "loss.vgg_weights=random", "model.width=0.03125", "train.tensorboard=false",
                 "train.impl=reference", "stages=[{resolution: 64, iterations: 2, batch_size: 2}]"]) == 0
    samples = sorted((run / "samples").glob("*.png"))
    assert samples and Image.open(samples[-1]).height > 64 * 3  # a labelled grid of the test pairs
    assert (run / "export" / "model.safetensors").is_file()

    out = tmp_path / "out.png"
    assert main(["infer", "--checkpoint", str(run), "--reference", str(photos / "alice" / "0.jpg"),
                 "--pose", f"{data / 'annotations-test.csv'}:{test_names[0]}", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert Image.open(out).size == (64, 64)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--metrics", "ssim", "--protocol",
                 "gaussian", "--json", "--device", "cpu"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["metrics"]["ssim_gaussian"]["n"] == 3 * 2  # the held-out person's 3 photos: 6 ordered pairs
