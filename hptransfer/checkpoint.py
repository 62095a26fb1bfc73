"""Training checkpoints: atomic directories, a ``latest`` pointer, RNG states, keep-last-K.

Layout under ``out_dir/checkpoints``::

    latest                    text: the name of the newest complete checkpoint (written atomically)
    step_00001000/
        meta.json             stage index, step in stage, global step, data position, architecture, stats
        generator.pt          single process: model + optimiser + GradScaler state
        discriminator.pt      (only at the discriminator stage)
        generator/, discriminator/   under DeepSpeed instead: DeepSpeed's own format, every rank's shard
        rng_rank{r}.pt        python / numpy / torch CPU / CUDA RNG states of rank r

A checkpoint is written into ``.tmp-step_...`` and renamed when complete, so a crash never leaves a
half-written directory behind ``latest``. Everything loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hptransfer.errors import CheckpointError

log = logging.getLogger(__name__)

LATEST = "latest"
# The layout of an export directory's config.json + model.safetensors; raise it when a change would make
# an older hptransfer misread a new export (read_export_config refuses a newer one).
FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` via a temp file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_dir_atomically(out_dir: str | Path, fill) -> Path:
    """Write a whole directory at once: ``fill(tmp)`` writes the files into a temporary sibling, which
    then replaces ``out_dir``. If anything fails, the previous ``out_dir`` stays as it was. Returns it."""
    import tempfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    old = None
    try:
        fill(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.rmdir(old)
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old is not None:  # put the previous directory back
                os.replace(old, out_dir)
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


def rng_state() -> dict:
    """All RNG states as tensors / plain lists (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [int(version), torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(global_step: int) -> str:
    return f"step_{global_step:08d}"


def begin(root: str | Path, global_step: int, is_main: bool, barrier=lambda: None) -> Path:
    """Create (rank 0) the temp directory of a new checkpoint; every rank gets its path."""
    root = Path(root)
    tmp = root / f".tmp-{checkpoint_name(global_step)}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    return tmp


def finish(root: str | Path, tmp: Path, meta: dict, keep: int, is_main: bool, barrier=lambda: None) -> Optional[Path]:
    """After every rank wrote into ``tmp``: meta.json, rename, ``latest``, prune to ``keep``."""
    barrier()
    root = Path(root)
    final = root / tmp.name[len(".tmp-"):]
    if is_main:
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / LATEST, final.name + "\n")
        prune(root, keep)
        log.info("checkpoint written: %s", final)
    barrier()
    return final


def complete(root: str | Path) -> list:
    """The complete checkpoints under ``root`` (those with meta.json), oldest first."""
    root = Path(root)
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "meta.json").is_file())


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (never the one ``latest`` names)."""
    if keep <= 0:
        return
    latest = read_latest(root)
    for p in complete(root)[:-keep]:
        if latest is None or p.resolve() != latest.resolve():
            shutil.rmtree(p, ignore_errors=True)


def read_latest(root: str | Path) -> Optional[Path]:
    """The checkpoint ``root/latest`` names, or None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def find_latest(root: str | Path) -> Optional[Path]:
    """What ``latest`` names; when it is missing or dangling (a crash between the rename and the
    pointer, a checkpoint deleted by hand), the newest complete checkpoint, with a warning."""
    root = Path(root)
    latest = read_latest(root)
    if latest is not None:
        return latest
    done = complete(root)
    pointer = root / LATEST
    if done:
        why = f"names {pointer.read_text().strip()!r}, which is not a complete checkpoint" if pointer.is_file() \
            else "is missing"
        log.warning("%s %s: using the newest complete checkpoint, %s", pointer, why, done[-1].name)
        return done[-1]
    if pointer.is_file():
        log.warning("%s names %r, which is not a complete checkpoint, and there is no other", pointer,
                    pointer.read_text().strip())
    return None


def resolve(resume: str, out_dir: str | Path) -> Optional[Path]:
    """``--resume auto`` -> the latest in out_dir (None if there is none); a path -> that checkpoint.

    A path may be a checkpoint directory or a checkpoints root holding ``latest``. Either way a
    missing or dangling ``latest`` falls back to the newest complete checkpoint (:func:`find_latest`).
    """
    root = Path(out_dir) / "checkpoints"
    if resume == "auto":
        return find_latest(root)
    p = Path(resume)
    if (p / "meta.json").is_file():
        return p
    latest = find_latest(p)
    if latest is None:
        latest = find_latest(p / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected meta.json, or a 'latest' file)")
    return latest


def read_meta(path: str | Path) -> dict:
    p = Path(path) / "meta.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: unreadable checkpoint metadata ({e})") from None


def save_rng(directory: Path, rank: int) -> None:
    atomic_torch_save(rng_state(), Path(directory) / f"rng_rank{rank}.pt")


def load_rng(directory: Path, rank: int) -> None:
    path = Path(directory) / f"rng_rank{rank}.pt"
    if not path.is_file():
        log.warning("%s missing: RNG not restored (resuming with a different process count?)", path)
        return
    set_rng_state(torch.load(path, weights_only=True))


EXPORT_FILES = ("config.json", "model.safetensors")


def export_dir(path: str | Path) -> Path:
    """``path`` when it is an export directory; a run directory's ``export/`` (said in the log), as
    ``--checkpoint runs/x`` is what a person types; else FileNotFoundError saying what is missing."""
    path = Path(path)
    missing = [n for n in EXPORT_FILES if not (path / n).is_file()]
    if not missing:
        return path
    if all((path / "export" / n).is_file() for n in EXPORT_FILES):
        log.info("%s is a training run: using its export %s", path, path / "export")
        return path / "export"
    hint = ""
    if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        hint = (f"; it looks like a training run without an export yet (training writes {path / 'export'} at "
                f"every stage end; `hptransfer export --checkpoint {path} --format safetensors --out DIR` "
                f"exports its latest checkpoint)")
    raise FileNotFoundError(f"{path}: not an hptransfer export (missing {missing[0]}){hint}")


def read_export_config(path: str | Path) -> dict:
    """The ``config.json`` of an export directory (or of a run directory's ``export/``, see
    :func:`export_dir`), with a clear error when it is not one or when its ``format_version`` is missing
    or newer than :data:`FORMAT_VERSION`."""
    path = export_dir(path)
    config = path / "config.json"
    try:
        meta = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config}: not valid JSON: {e}") from None
    if not isinstance(meta, dict) or "arch" not in meta:
        raise CheckpointError(f"{config}: no 'arch' entry; not an hptransfer export")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{config}: format_version {version!r} is not an export format this hptransfer reads "
                              f"(1 to {FORMAT_VERSION}); every hptransfer export writes it, so this file was made or "
                              f"edited by other means: export again from the run's checkpoint (hptransfer export "
                              f"--checkpoint RUN_DIR --format safetensors --out DIR)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{config}: export format {version}, written by hptransfer "
                              f"{meta.get('hptransfer_version', '?')}; this hptransfer reads formats up to "
                              f"{FORMAT_VERSION}: upgrade hptransfer to load it")
    return meta


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def publish_stage_export(root: str | Path, stage: str) -> Path:
    """Make ``root`` (a run's export/) hold the files of its subdirectory ``stage`` (e.g. "128px", just
    written) at its top level, keeping every subdirectory (each stage's export). One atomic directory
    swap; the files are hard links (copies where the file system has none), so a crash leaves the
    previous ``root`` whole and nothing large is written twice."""
    root = Path(root)

    def link_tree(src: Path, dst: Path) -> None:
        dst.mkdir()
        for f in src.iterdir():
            (link_tree if f.is_dir() else _link_or_copy)(f, dst / f.name)

    def fill(tmp: Path) -> None:
        for f in (root / stage).iterdir():  # the stage's export, at the top level
            if f.is_file():
                _link_or_copy(f, tmp / f.name)
        for d in root.iterdir():  # every stage's own export, this one included
            if d.is_dir():
                link_tree(d, tmp / d.name)

    return write_dir_atomically(root, fill)
