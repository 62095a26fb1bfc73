"""hptransfer weights fetch|list against a local HTTP server (127.0.0.1, no network): a good file, a
wrong-hash file and a truncated download; the lookup shared by VGG-16, LPIPS and FID."""
import hashlib
import http.server
import threading

import pytest
import torch

from hptransfer import weights as W
from hptransfer.cli import main
from hptransfer.errors import WeightsError, WeightsUnavailable

GOOD = bytes(range(256)) * 40  # 10 240 bytes
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        if name.startswith("good") or name.startswith("prefix"):
            body, length = GOOD, len(GOOD)
        elif name.startswith("wrong"):
            body, length = GOOD[:-1] + b"x", len(GOOD)  # same size, one byte differs
        elif name.startswith("short"):
            body, length = GOOD[:1000], len(GOOD)  # announces the full size, sends 1000 bytes, closes
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/models/"
    httpd.shutdown()
    httpd.server_close()
    t.join()


@pytest.fixture
def registry(monkeypatch, tmp_path):
    """Small entries in place of the real ones; the hub cache under tmp_path."""
    entries = {
        "good": W.Weight("good-0123abcd.pth", "HPT_TEST_GOOD", GOOD_SHA, len(GOOD), "test"),
        "wrong": W.Weight("wrong-0123abcd.pth", "HPT_TEST_WRONG", GOOD_SHA, len(GOOD), "test"),
        "short": W.Weight("short-0123abcd.pth", "HPT_TEST_SHORT", GOOD_SHA, None, "test"),
        # no full hash known: checked like torchvision's check_hash, by the file name's prefix
        "prefix": W.Weight(f"prefix-{GOOD_SHA[:8]}.pth", "HPT_TEST_PREFIX", None, None, "test"),
    }
    monkeypatch.setattr(W, "WEIGHTS", entries)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return entries


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_published_hashes_match_their_file_names():
    """The full SHA-256 values start with the 8 hex digits torchvision put in each file name."""
    for name, w in W.WEIGHTS.items():
        assert w.hash_prefix, name
        if w.sha256:
            assert w.sha256.startswith(w.hash_prefix) and len(w.sha256) == 64, name


def test_fetch_verifies_then_moves_into_the_hub_cache(server, registry, tmp_path, capsys):
    assert main(["weights", "fetch", "good", "prefix", "--base-url", server]) == 0
    hub = tmp_path / "hub" / "checkpoints"
    assert (hub / "good-0123abcd.pth").read_bytes() == GOOD
    assert (hub / registry["prefix"].filename).read_bytes() == GOOD
    assert _leftovers(hub) == sorted(["good-0123abcd.pth", registry["prefix"].filename])  # no temp files
    assert W.find("good") == hub / "good-0123abcd.pth"  # where the loaders look
    # list: present and verified
    main(["weights", "list"])
    out = capsys.readouterr().out
    assert "good" in out and "verified" in out and "missing" in out  # wrong/short are not there


@pytest.mark.parametrize("name, why", [("wrong", "SHA-256"), ("short", "truncated")])
def test_bad_download_is_deleted_and_reported(server, registry, tmp_path, capsys, name, why):
    hub = tmp_path / "hub" / "checkpoints"
    with pytest.raises(WeightsError, match=why):
        W.fetch(name, base_url=server)
    assert _leftovers(hub) == []  # neither the file nor a temp file
    # through the command: the others still download, the failure is one line, exit 2
    assert main(["weights", "fetch", name, "good", "--base-url", server]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and why in err and registry[name].filename in err
    assert _leftovers(hub) == ["good-0123abcd.pth"]


def test_base_url_from_the_environment_and_dir(server, registry, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(W.BASE_URL_ENV, server)
    d = tmp_path / "elsewhere"
    assert main(["weights", "fetch", "good", "--dir", str(d)]) == 0
    assert (d / "good-0123abcd.pth").read_bytes() == GOOD
    assert "HPT_TEST_GOOD=" in capsys.readouterr().out  # how the loaders find a file outside the hub cache


def test_a_corrupt_file_in_place_is_replaced(server, registry, tmp_path):
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "good-0123abcd.pth").write_bytes(b"half a file")
    assert W.verify("good", hub / "good-0123abcd.pth") is not None
    W.fetch("good", base_url=server)
    assert W.verify("good", hub / "good-0123abcd.pth") is None


def test_unreachable_server_and_unknown_name(registry, capsys):
    with pytest.raises(WeightsError, match="download failed|HTTP 404"):
        W.fetch("good", base_url="http://127.0.0.1:9/")  # the discard port: nothing listens
    assert main(["weights", "fetch", "nosuch"]) == 2
    assert "unknown weights 'nosuch'" in capsys.readouterr().err


def test_missing_weights_one_line_and_short_reason(registry, monkeypatch, tmp_path):
    monkeypatch.delenv("HPT_TEST_GOOD", raising=False)
    with pytest.raises(WeightsUnavailable) as e:
        W.find("good")
    assert "\n" not in str(e.value) and "hptransfer weights fetch good" in str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "good-0123abcd.pth") in str(e.value)
    assert len(e.value.short) < 60


def test_vgg_weights_auto_fetches_on_first_use(server, monkeypatch, tmp_path):
    """loss.vgg_weights: auto -> VGG16Features downloads (here: a small VGG-layout file) once."""
    from hptransfer.models import VGG16Features

    torch.manual_seed(0)
    src = VGG16Features("random", layers=["relu1_2"])
    path = tmp_path / "src.pth"
    torch.save({f"features.{k}": v for k, v in src.features.state_dict().items()}, path)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()

    class H(_Handler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        monkeypatch.setattr(W, "WEIGHTS", {"vgg16": W.Weight("vgg16-397923af.pth", "HPTRANSFER_VGG16", sha,
                                                             len(data), "test")})
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
        monkeypatch.delenv("HPTRANSFER_VGG16", raising=False)
        monkeypatch.setenv(W.BASE_URL_ENV, f"http://127.0.0.1:{httpd.server_address[1]}/")
        with pytest.raises(WeightsUnavailable):
            VGG16Features(layers=["relu1_2"])  # None: search only, never download
        v = VGG16Features("auto", layers=["relu1_2"])
        assert v.source == str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth")
        assert torch.equal(v.features[0].weight, src.features[0].weight)
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join()


def test_a_file_that_is_not_weights_is_a_user_error(tmp_path):
    from hptransfer.models import VGG16Features

    bad = tmp_path / "vgg.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="vgg.pth: not a weights file"):
        VGG16Features(str(bad))


def test_fid_inception_is_fetched_from_pytorch_fid_and_verified(server, monkeypatch, tmp_path):
    """The FID Inception's entry: pytorch-fid's release URL, full SHA-256 and size; the fetch path with a
    local file in its place (its own hash), then loaded by the FID network from the hub cache."""
    from hptransfer import metrics
    from hptransfer.models.fid_inception import FIDInceptionV3

    real = W.WEIGHTS["fid_inception"]
    assert W.url_of("fid_inception") == ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                                         "pt_inception-2015-12-05-6726825d.pth")
    assert real.sha256.startswith("6726825d") and real.size == 95628359
    monkeypatch.delenv(W.BASE_URL_ENV, raising=False)
    assert W.url_of("fid_inception", "http://mirror/x/") == "http://mirror/x/pt_inception-2015-12-05-6726825d.pth"
    # a stand-in file (random weights in the network's layout), served under the real name
    torch.manual_seed(0)
    src = tmp_path / "src.pth"
    torch.save(FIDInceptionV3().state_dict(), src)
    blob = src.read_bytes()

    class _Serve(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = blob if self.path.endswith(real.filename) else blob[:-1] + b"x"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Serve)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/fid/"
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
        monkeypatch.delenv("HPTRANSFER_FID_INCEPTION", raising=False)
        # the published hash refuses the stand-in: nothing is kept
        with pytest.raises(WeightsError, match="differs from the published|bytes"):
            W.fetch("fid_inception", base_url=url)
        assert not (tmp_path / "hub" / "checkpoints" / real.filename).exists()
        stand_in = W.Weight(real.filename, real.env, hashlib.sha256(blob).hexdigest(), len(blob), real.used_by,
                            real.base_url)
        monkeypatch.setitem(W.WEIGHTS, "fid_inception", stand_in)
        path = W.fetch("fid_inception", base_url=url)
        assert path == tmp_path / "hub" / "checkpoints" / real.filename and W.verify("fid_inception", path) is None
        feats = metrics.InceptionFeatures("pt_inception")(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
        assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    finally:
        httpd.shutdown()
        httpd.server_close()
