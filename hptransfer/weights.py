"""ImageNet weights: where the loaders find them, and ``hptransfer weights fetch|list``.

Four files are used: torchvision's VGG-16 (perceptual losses; LPIPS with ``--lpips-net vgg``),
AlexNet (LPIPS) and Inception-v3 (FID, ``--fid-network torchvision``), and the TF-ported FID
Inception of pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``, FID ``--fid-network pt_inception``). A loader looks, in order, at an explicit path (config or
command line), the file's environment variable, and the torch hub cache
``$TORCH_HOME/hub/checkpoints/<file>`` (:func:`torch.hub.get_dir`), the folder torchvision itself
downloads to. :func:`find` is that lookup, shared by :mod:`hptransfer.models.vgg` and
:mod:`hptransfer.metrics`.

``fetch`` downloads a file from its published URL (torchvision's, or pytorch-fid's GitHub release for
the FID Inception; the base overridable with ``--base-url`` or ``HPTRANSFER_WEIGHTS_URL``, e.g. a local
mirror holding every file by name) into a temp file beside the destination,
checks its size and SHA-256, and only then renames it into place; a wrong or truncated download
is deleted and reported. The full SHA-256 of VGG-16 and AlexNet are the published files' (the
file names carry their first 8 hex digits, as torchvision names files); for Inception-v3 no full
hash was found in public sources, so its file is checked the way torchvision's ``check_hash``
does: the digest must start with the hex prefix in the file name. The FID Inception's full SHA-256 and
size are the ones other projects pin for pytorch-fid's release file (its name carries the same prefix).
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hptransfer.errors import InputError, WeightsError, WeightsUnavailable, disk_error

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://download.pytorch.org/models/"
BASE_URL_ENV = "HPTRANSFER_WEIGHTS_URL"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Weight:
    filename: str
    env: str  # environment variable a user may point at the file instead
    sha256: Optional[str]  # full digest; None: only the prefix in the file name is known
    size: Optional[int]  # bytes, when known
    used_by: str
    base_url: Optional[str] = None  # where it is published, when not torchvision's DEFAULT_BASE_URL

    @property
    def hash_prefix(self) -> str:
        """The hex digits torchvision puts in its file names (``name-<prefix>.pth``)."""
        m = re.search(r"-([a-f0-9]{6,})\.", self.filename)
        return m.group(1) if m else ""


WEIGHTS = {
    "vgg16": Weight("vgg16-397923af.pth", "HPTRANSFER_VGG16",
                    "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0", 553433881,
                    "perceptual losses (training), LPIPS --lpips-net vgg"),
    "alexnet": Weight("alexnet-owt-7be5be79.pth", "HPTRANSFER_ALEXNET",
                      "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02", 244408911,
                      "LPIPS (eval, default --lpips-net alex)"),
    "inception": Weight("inception_v3_google-0cc3c7bd.pth", "HPTRANSFER_INCEPTION", None, None,
                        "FID --fid-network torchvision (eval)"),
    "fid_inception": Weight("pt_inception-2015-12-05-6726825d.pth", "HPTRANSFER_FID_INCEPTION",
                            "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", 95628359,
                            "FID --fid-network pt_inception (eval)",
                            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"),
}


def default_dir() -> Path:
    """The torch hub cache folder where torchvision and our loaders look: $TORCH_HOME/hub/checkpoints."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _entry(name: str) -> Weight:
    if name not in WEIGHTS:
        raise InputError(f"unknown weights {name!r}; known: {', '.join(WEIGHTS)}")
    return WEIGHTS[name]


# ---------------------------------------------------------------- lookup

def candidates(name: str, explicit=None) -> list[tuple[str, Optional[Path]]]:
    """(where, path) in lookup order; path None for an unset environment variable."""
    w = _entry(name)
    places = []
    if explicit:
        places.append(("given path", Path(explicit)))
    env = os.environ.get(w.env)
    places.append((f"${w.env}", Path(env) if env else None))
    places.append(("torch hub cache", default_dir() / w.filename))
    return places


def find(name: str, explicit=None) -> Path:
    """The weights file of ``name`` (a :data:`WEIGHTS` key). Raises :class:`WeightsUnavailable` with a
    one-line message naming every place looked; its ``.short`` is a table-sized version."""
    w = _entry(name)
    looked = []
    for where, path in candidates(name, explicit):
        if path is not None and path.is_file():
            return path
        looked.append(f"{where} {path}" if path is not None else f"{where} not set")
    e = WeightsUnavailable(f"{name} ImageNet weights ({w.filename}) not found (looked at: {'; '.join(looked)}); "
                           f"run `hptransfer weights fetch {name}`, or put torchvision's {w.filename} in "
                           f"{default_dir()}, or set {w.env}=/path/to/{w.filename}")
    e.short = f"no {name} weights (hptransfer weights fetch {name})"
    raise e


def ensure(name: str) -> Path:
    """:func:`find`, downloading into the hub cache when the file is nowhere (``loss.vgg_weights: auto``)."""
    try:
        return find(name)
    except WeightsUnavailable:
        log.info("%s weights not found: downloading them once into %s", name, default_dir())
        return fetch(name)


def load_state_dict(path: Path) -> dict:
    """A state dict of tensors from a ``.pth`` (torch.load, weights only: no code runs) or ``.safetensors``
    file; a file that is neither raises :class:`WeightsError` naming it."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle, zip and safetensors errors have no common base class
        raise WeightsError(f"{path}: not a weights file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
    return sd


# ---------------------------------------------------------------- download and verify

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def check_digest(w: Weight, digest: str) -> Optional[str]:
    """Why ``digest`` is not ``w``'s file, or None when it is."""
    if w.sha256:
        return None if digest == w.sha256 else f"SHA-256 {digest} differs from the published {w.sha256}"
    prefix = w.hash_prefix
    if not prefix:
        return f"no known hash for {w.filename}"
    return None if digest.startswith(prefix) else f"SHA-256 {digest} does not start with {prefix} (file name's hash)"


def verify(name: str, path: Path) -> Optional[str]:
    """Why the file at ``path`` is not ``name``'s published file, or None when it verifies."""
    w = _entry(name)
    size = path.stat().st_size
    if w.size is not None and size != w.size:
        return f"{size} bytes, expected {w.size}"
    return check_digest(w, file_sha256(path))


def url_of(name: str, base_url: Optional[str] = None) -> str:
    w = _entry(name)
    base = base_url or os.environ.get(BASE_URL_ENV) or w.base_url or DEFAULT_BASE_URL
    return base.rstrip("/") + "/" + w.filename


def fetch(name: str, dest_dir=None, base_url: Optional[str] = None, progress: bool = False) -> Path:
    """Download ``name`` into ``dest_dir`` (default: the hub cache) unless a verified copy is there.
    The bytes go to a temp file in ``dest_dir``; size and SHA-256 are checked before the rename, so
    the destination is either absent or complete and verified. Returns the file's path."""
    w = _entry(name)
    dest_dir = Path(dest_dir) if dest_dir is not None else default_dir()
    dest = dest_dir / w.filename
    if dest.is_file():
        why = verify(name, dest)
        if why is None:
            log.info("%s: already there and verified", dest)
            return dest
        log.warning("%s: present but not the published file (%s); downloading it again", dest, why)
    url = url_of(name, base_url)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{w.filename}.", suffix=".part")
    except OSError as e:
        raise disk_error(dest_dir, e) or e
    try:
        digest, got, expected = _download(url, fd, tmp, w, progress, offline_hint(name, dest))
        if expected is not None and got != expected:
            raise WeightsError(f"{url}: download truncated ({got} of {expected} bytes); nothing was kept", path=dest)
        if w.size is not None and got != w.size:
            raise WeightsError(f"{url}: {got} bytes, the published file has {w.size}; nothing was kept", path=dest)
        why = check_digest(w, digest)
        if why:
            raise WeightsError(f"{url}: {why}; the download was deleted", path=dest)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("%s: downloaded and verified (%s)", dest, "SHA-256" if w.sha256 else f"hash prefix {w.hash_prefix}")
    return dest


def offline_hint(name: str, dest: Path) -> str:
    """What to do when ``name`` cannot be downloaded here: a mirror, or the file put in place by hand."""
    w = _entry(name)
    return (f"without network access: download {url_of(name)} on another machine and copy it to {dest} (or set "
            f"{w.env}=/path/to/{w.filename}), or fetch from a mirror with --base-url URL (or ${BASE_URL_ENV})")


def _download(url: str, fd: int, tmp: str, w: Weight, progress: bool, hint: str) -> tuple[str, int, Optional[int]]:
    """Stream ``url`` into the open file ``fd`` (``tmp``; closed here). Returns (sha256, bytes, Content-Length);
    a failed download raises :class:`WeightsError` ending with ``hint``."""
    h = hashlib.sha256()
    got = 0
    with os.fdopen(fd, "wb") as f:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                length = resp.headers.get("Content-Length")
                expected = int(length) if length and length.isdigit() else None
                bar = None
                if progress:
                    from tqdm import tqdm
                    bar = tqdm(total=expected, unit="B", unit_scale=True, desc=w.filename, leave=False)
                try:
                    while True:
                        try:
                            block = resp.read(CHUNK)
                        except http.client.IncompleteRead as e:  # the server closed early
                            block = e.partial
                            h.update(block)
                            f.write(block)
                            got += len(block)
                            break
                        if not block:
                            break
                        h.update(block)
                        f.write(block)
                        got += len(block)
                        if bar is not None:
                            bar.update(len(block))
                finally:
                    if bar is not None:
                        bar.close()
            f.flush()
            os.fsync(f.fileno())
        except urllib.error.HTTPError as e:
            raise WeightsError(f"{url}: HTTP {e.code} {e.reason}; {hint}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            bad_disk = disk_error(tmp, e) if isinstance(e, OSError) else None
            if bad_disk is not None:
                raise bad_disk from None
            reason = getattr(e, "reason", None) or e
            raise WeightsError(f"{url}: download failed ({reason}); {hint}") from None
    return h.hexdigest(), got, expected


# ---------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = sub.add_parser("fetch", help="download, verify and install weights (default: all)",
                       description="Download the published files, verify size and SHA-256, move them into place.")
    f.add_argument("names", nargs="*", metavar="NAME", help=f"some of {', '.join(WEIGHTS)} (default: all)")
    f.add_argument("--dir", default=None, help="destination folder (default: the torch hub cache, where the "
                   "loaders look; elsewhere, point the environment variable at the file)")
    f.add_argument("--base-url", default=None, help=f"download every file from this base URL (a mirror) instead of "
                   f"where it is published ({DEFAULT_BASE_URL}, pytorch-fid's release; also ${BASE_URL_ENV})")
    ls = sub.add_parser("list", help="which weights are present and verified")
    ls.add_argument("--dir", default=None, help="folder to list (default: the torch hub cache)")


def run(args) -> int:
    if args.action == "fetch":
        names = args.names or list(WEIGHTS)
        for n in names:
            _entry(n)  # an unknown name fails before any download
        failed = []
        for n in names:
            try:
                path = fetch(n, args.dir, args.base_url, progress=sys.stderr.isatty())
            except WeightsError as e:  # report and go on with the others
                print(f"error: {e}", file=sys.stderr)
                failed.append(n)
                continue
            print(f"{n:10s} {path}  verified")
            if args.dir is not None and Path(args.dir).resolve() != default_dir().resolve():
                print(f"{'':10s} (not the hub cache: set {WEIGHTS[n].env}={path} for the loaders to find it)")
        return 2 if failed else 0
    folder = Path(args.dir) if args.dir else None
    print(f"{'name':10s} {'status':10s} file (used by)")
    for n, w in WEIGHTS.items():
        if folder is None:
            try:
                path = find(n)
            except WeightsUnavailable:
                path = default_dir() / w.filename
        else:
            path = folder / w.filename
        if not path.is_file():
            status = "missing"
        else:
            why = verify(n, path)
            status = "verified" if why is None else "WRONG"
            if why:
                log.warning("%s: %s", path, why)
        print(f"{n:10s} {status:10s} {path} ({w.used_by})")
    return 0
