"""Parsing maps: the synthesizer's exact LIP labels and try-on renderings, and the readers for the
LIP, CIHP and ATR numberings (bad maps are errors naming the file)."""
import numpy as np
import pytest
from PIL import Image

from hptransfer.data import synth
from hptransfer.data.parsing import (NUMBERINGS, ParsingError, garment_masks, load_parser, read_parsing, run_parser,
                                     to_lip)
from hptransfer.errors import UserError


def _save(path, labels, mode="L"):
    im = Image.fromarray(np.asarray(labels, np.uint8), mode="L")
    if mode == "P":
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)
    return path


def _person(numbering):
    """A 20x16 map: hair, face, upper garment, arms, pants, in ``numbering``'s class numbers."""
    ids = {n: i for i, n in enumerate(NUMBERINGS[numbering])}
    lab = np.zeros((20, 16), np.uint8)
    lab[0:3, 6:10] = ids["hair"]
    lab[3:6, 6:10] = ids["face"]
    lab[6:12, 5:11] = ids["upper-clothes"]
    lab[6:12, 3:5] = ids["right-arm"]
    lab[6:12, 11:13] = ids["left-arm"]
    lab[12:20, 5:11] = ids["pants"]
    return lab


@pytest.mark.parametrize("numbering", ["lip", "cihp", "atr"])
def test_each_numbering_reads_its_garment_and_region(tmp_path, numbering):
    path = _save(tmp_path / "a.png", _person(numbering))
    labels = read_parsing(path, numbering, image_size=(20, 16))
    upper, region = garment_masks(labels, numbering, str(path))
    assert upper.sum() == 36 and upper[6:12, 5:11].all()
    assert region.sum() == 36 + 12 + 12  # garment and both arms
    assert (to_lip(labels, numbering) == _person("lip")).all()


def test_palette_png_reads_indices(tmp_path):
    path = _save(tmp_path / "p.png", _person("lip"), mode="P")
    assert (read_parsing(path, "lip") == _person("lip")).all()


def test_wrong_numbering_is_an_error_naming_the_file(tmp_path):
    lab = _person("lip")
    lab[18:20, 5:8] = 18  # LIP left-shoe: beyond ATR's 18 classes (0..17)
    path = _save(tmp_path / "lip_map.png", lab)
    with pytest.raises(ParsingError, match=r"lip_map\.png.*\[18\].*ATR"):
        read_parsing(path, "atr")
    # read as ATR, LIP's upper-clothes (5) is a skirt: no upper garment, which names the file
    ok = _person("lip")
    path2 = _save(tmp_path / "lip_as_atr.png", ok)
    with pytest.raises(ParsingError, match=r"lip_as_atr\.png: no upper garment"):
        garment_masks(read_parsing(path2, "atr"), "atr", str(path2))


def test_bad_maps_are_clear_errors(tmp_path):
    colour = np.zeros((20, 16, 3), np.uint8)
    colour[5:10, 5:10] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "vis.png")
    with pytest.raises(ParsingError, match=r"vis\.png: a colour image"):
        read_parsing(tmp_path / "vis.png", "lip")
    path = _save(tmp_path / "small.png", _person("lip"))
    with pytest.raises(ParsingError, match=r"small\.png: parsing map is 20x16.*image is 40x32"):
        read_parsing(path, "lip", image_size=(40, 32))
    bg = _save(tmp_path / "empty.png", np.zeros((20, 16)))
    with pytest.raises(ParsingError, match=r"empty\.png: the parsing map is all background"):
        garment_masks(read_parsing(bg, "lip"), "lip", str(bg))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ParsingError, match=r"junk\.png: unreadable"):
        read_parsing(tmp_path / "junk.png", "lip")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_parsing(tmp_path / "nope.png", "lip")
    with pytest.raises(ParsingError, match="unknown parsing numbering"):
        read_parsing(path, "pascal")
    assert issubclass(ParsingError, UserError)  # one line at the CLI, exit 2


class _ThresholdParser:
    """A toy plugged parser: dark pixels are upper clothes (LIP)."""
    numbering = "lip"

    def __init__(self, weights=None):
        self.weights = weights

    def parse(self, image):
        return np.where(image.mean(-1) < 100, 5, 0)


def test_plugged_parser(tmp_path):
    w = tmp_path / "w.bin"
    w.write_bytes(b"x")
    parser = load_parser(f"{__name__}:_ThresholdParser", str(w))
    assert parser.weights == str(w)
    img = np.full((8, 8, 3), 255, np.uint8)
    img[2:5, 2:5] = 0
    labels = run_parser(parser, img, "img.png")
    assert labels.sum() == 9 * 5
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_parser(f"{__name__}:_ThresholdParser", str(tmp_path / "absent.pth"))
    with pytest.raises(UserError, match="module:Class"):
        load_parser("no_colon_here")


def test_synth_writes_exact_lip_maps(tmp_path):
    synth.synthesize(tmp_path, identities=2, poses=2, size=64, workers=1)
    images = sorted((tmp_path / "images").glob("*.jpg"))
    maps = sorted((tmp_path / "parsing").glob("*.png"))
    assert [p.stem for p in images] == [p.stem for p in maps]
    expected = {n: m for i in range(2) for n, _, _, m, _ in
                synth.render_identity(0, i, 2, 64, with_mask=True, with_labels=True)}
    drawn = {0, 2, 5, 9, 13, 14, 15, 16, 17, 18, 19}
    for img, mp in zip(images, maps):
        labels = read_parsing(mp, "lip", image_size=(64, 64))
        assert set(np.unique(labels)) <= drawn and 5 in labels
        body = expected[img.name]
        # the label map covers the body mask; beyond it only the parts' outlines
        assert (labels[body] > 0).all() and ((labels > 0) & ~body).mean() < 0.05


def test_person_wearing_anothers_garment_changes_only_the_garment():
    size = 96
    own = synth.render_identity(1, 0, 3, size, with_labels=True)
    worn = synth.render_identity(1, 0, 3, size, with_labels=True, garment_from=1)
    for (n, a, kpa, _, la), (m, b, kpb, _, lb) in zip(own, worn):
        assert n == m and np.array_equal(kpa, kpb)
        garmentish = np.isin(la, (5, 14, 15)) | np.isin(lb, (5, 14, 15))  # clothes and arms (sleeve length)
        a, b = np.asarray(a), np.asarray(b)
        assert np.array_equal(a[~garmentish], b[~garmentish])  # face, hair, trousers, background unchanged
        assert not np.array_equal(a[lb == 5], b[lb == 5])
        assert ((lb == 5) | np.isin(lb, (14, 15))).sum() == ((la == 5) | np.isin(la, (14, 15))).sum()
    # sleeve length follows the donor: in a long-sleeved garment only the hands are bare arm
    sleeves = {i: synth.make_identity(np.random.default_rng([1, i]), size)["long_sleeves"] for i in range(8)}
    long_i = next(i for i, v in sleeves.items() if v)
    short_i = next(i for i, v in sleeves.items() if not v)
    bare = {}
    for donor_i in (long_i, short_i):
        img, kp, labels = synth.render_frontal(1, 0, size, garment_from=donor_i)
        bare[donor_i] = np.isin(labels, (14, 15)).sum()
    assert 0 < bare[long_i] < 0.6 * bare[short_i]
    assert np.abs(synth.frontal_keypoints(size) - kp).max() < 3  # builtin frontal pose ~ a person's own
