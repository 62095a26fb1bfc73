"""DALI pipeline yielding exactly the batches of ``PairDataset`` / ``ShardPairDataset`` + ``make_loader``.

The host side (a parallel ``fn.external_source`` callback in DALI's Python worker processes) does
the cheap work: the per-rank, per-epoch sample order (the same ``DistributedSampler`` order as the
torch loader), reading the encoded bytes of both images of each pair (a folder's files, or a shard
member by offset), checking them, the keypoint geometry and the flip decision, all taken from the
dataset itself so the two loaders cannot drift. The callback is a pure function of the batch number
(stateless), so ``py_num_workers`` processes prepare several batches at once and a failed batch can
be replayed in the main process to name its file. DALI does the expensive work: decoding
(``device="mixed"`` = nvJPEG on a GPU, ``"cpu"`` in CPU-only mode with ``device_id=None``), for a
folder the resize and the pad (shard members are stored at R x R already) and the mirror, and hands
uint8 NCHW to torch, which maps it to [-1, 1] with the torch loader's own arithmetic. Use ``make_loader_for_config`` from the trainer (``data.loader``:
auto = DALI on CUDA, torch on CPU), or ``make_dali_loader`` / ``make_dali_loader_from_dataset``.

Differences from the torch loader, by design:
- Images come back on the GPU when ``device="gpu"`` (keypoints and index stay on the CPU, as the
  torch loader's do); the trainer's ``.to(device)`` is then a no-op.
- From a folder, pixels differ by rounding only. ``PairDataset`` resizes with PIL ``BILINEAR`` and
  ``reducing_gap=None``; DALI's ``INTERP_LINEAR`` with ``antialias=True`` is the same triangle
  filter, widened by the scale factor when shrinking. PIL uses fixed-point weights and an 8-bit
  intermediate between its horizontal and vertical passes; DALI uses float weights and rounds
  once. On the CPU both decode with libjpeg-turbo: measured max 2 uint8 units, mean ~0.1
  (``tests/test_dali.py`` bounds 3 and 0.35). nvJPEG on the GPU may round IDCT / chroma
  upsampling differently (the cuda test allows 12 and 1.5 units). From shards there is no resize:
  PNG members decode to the torch loader's pixels exactly, JPEG members within decoder rounding.
- A JPEG with a broken entropy-coded body (valid markers, garbage data) decodes with a libjpeg
  warning in both loaders (PIL does the same); only structural damage is an error. Shard members
  carry a CRC-32, so any damage to them is an error naming shard and member.
- Keypoints, order, flips, index and skip_bad replacements are identical (the same host code).
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


class DaliUnavailable(RuntimeError):
    """DALI is not installed or cannot run here."""


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA runtime under it
        return False
    return True


def resolve_loader(kind: str, device: torch.device | str) -> str:
    """``data.loader`` (auto | torch | dali) -> "torch" | "dali". auto = DALI on CUDA when installed."""
    dev = torch.device(device)
    if kind == "torch":
        return "torch"
    if kind == "dali":
        if not dali_available():
            raise DaliUnavailable("data.loader=dali but nvidia.dali cannot be imported; "
                                  "pip install nvidia-dali-cuda130 or set data.loader=torch")
        return "dali"
    if kind != "auto":
        raise ValueError(f"data.loader must be auto, torch or dali, got {kind!r}")
    return "dali" if dev.type == "cuda" and dali_available() else "torch"


# ----------------------------------------------------------------------------- sample order
def epoch_order(dataset, *, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool = True) -> list[int]:
    """This rank's sample indices for an epoch, exactly ``make_loader``'s: a ``DistributedSampler``
    (``drop_last=False``: randperm seeded with seed + epoch, the last shard padded by repetition,
    rank r takes every world_size-th index). The sampler itself is used so the orders cannot drift."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return [int(i) for i in sampler]


# ----------------------------------------------------------------------------- image checks
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def read_image_bytes(path: Path) -> np.ndarray:
    """Encoded bytes of ``path`` as uint8 (n,), after cheap header/trailer checks.

    Raises ``FileNotFoundError`` (missing) or ``DataFormatError`` (unreadable, not JPEG/PNG,
    truncated), naming the file, as the torch loader does. DALI's decoders may fill a truncated
    JPEG with grey and only warn, so a missing end-of-image marker is caught here.
    """
    from hptransfer.data.formats import DataFormatError

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} is missing") from None
    except OSError as e:
        raise DataFormatError(f"image file {path} is unreadable: {e.strerror or e}") from None
    if data[:2] == _JPEG_SOI:
        # Padding after the end-of-image marker is legal and common; strip it before looking.
        if not data.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI):
            raise DataFormatError(f"image file {path} is unreadable: truncated JPEG (no end-of-image marker)")
    elif data[:8] == _PNG_SIG:
        if b"IEND" not in data[-16:]:
            raise DataFormatError(f"image file {path} is unreadable: truncated PNG (no IEND chunk)")
    elif not data:
        raise DataFormatError(f"image file {path} is unreadable: empty file")
    else:
        raise DataFormatError(f"image file {path} is unreadable: not a JPEG or PNG (starts {data[:8]!r})")
    return np.frombuffer(data, dtype=np.uint8)


def _image_size(data: np.ndarray, path: Path) -> tuple[int, int]:
    """(H, W) from the header only (PIL's lazy open decodes nothing)."""
    import io

    from PIL import Image

    from hptransfer.data.formats import DataFormatError

    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            return im.height, im.width
    except (OSError, ValueError, SyntaxError) as e:
        raise DataFormatError(f"image file {path} is unreadable: {e}") from None


# ----------------------------------------------------------------------------- host-side sources
class _BatchSource:
    """A stateless ``fn.external_source`` callback (batch mode, ``parallel=True``): batch k of the
    loader is ``order[(start + k) * B:(start + k + 1) * B]``, computed from ``info.iteration`` alone,
    so DALI's Python workers can make several batches at once; StopIteration past the last full
    batch (drop_last). Everything host-side comes from the dataset itself (pair list, keypoints,
    flip decision, ``skip_bad`` replacements), so the two loaders cannot drift. Each sample also
    carries ``skipped`` (pairs passed over under ``skip_bad``), which the loader adds up."""

    resizes = False  # True: outputs carry each image's resize and pad geometry (the folder's sources)

    def __init__(self, dataset, order: list[int], batch_size: int, start_batch: int):
        self.ds, self.order, self.batch_size, self.start_batch = dataset, order, batch_size, start_batch

    def indices(self, iteration: int) -> Optional[list[int]]:
        """The sample indices of the loader's batch ``iteration``, or None past the end."""
        lo = (self.start_batch + iteration) * self.batch_size
        if lo + self.batch_size > len(self.order):
            return None
        return self.order[lo:lo + self.batch_size]

    def __call__(self, info):
        indices = self.indices(getattr(info, "iteration", info))
        if indices is None:
            raise StopIteration
        samples = []
        for index in indices:
            skipped, ref, tgt = self.ds.readable_pair(index, self._image)
            flip = self.ds._flip_for(index)  # the torch loader's own decision
            kp_ref, kp_tgt = ref[-1], tgt[-1]
            if flip:
                from hptransfer.pose import flip_keypoints

                R = self.ds.resolution
                kp_ref, kp_tgt = flip_keypoints(kp_ref, R), flip_keypoints(kp_tgt, R)
            samples.append((ref, tgt, flip, np.ascontiguousarray(kp_ref, np.float32),
                            np.ascontiguousarray(kp_tgt, np.float32), index, skipped))
        f32, i32 = np.float32, np.int32
        outs = [[s[0][0] for s in samples], [s[1][0] for s in samples]]
        if self.resizes:
            outs += [[np.array(s[k][1], f32) for s in samples] for k in (0, 1)]
            outs += [[np.array(s[k][2], i32) for s in samples] for k in (0, 1)]
        outs += [[np.array(int(s[2]), i32) for s in samples], [s[3] for s in samples], [s[4] for s in samples],
                 [np.array([s[5]], np.int64) for s in samples], [np.array(s[6], i32) for s in samples]]
        return tuple(outs)

    def images(self, iteration: int) -> list:
        """[(label, encoded bytes or an exception)] of the images batch ``iteration`` asks for (to find
        the one DALI's decoder refused)."""
        out = []
        for index in self.indices(iteration) or []:
            for image in self.ds._pair(index):
                try:
                    out.append((self.ds._describe(image), self._image(image)[0].tobytes()))
                except (OSError, ValueError) as e:
                    out.append((self.ds._describe(image), e))
        return out


class _FolderSource(_BatchSource):
    """The folder format: each image's file bytes (checked) and its resize / pad geometry."""

    resizes = True

    def _image(self, name: str):
        from hptransfer.data.dataset import fit_geometry, fit_keypoints

        path = self.ds.image_dir / name
        data = read_image_bytes(path)
        H, W = _image_size(data, path)
        R = self.ds.resolution
        nh, nw, oy, ox = fit_geometry(H, W, R, self.ds.fit)
        return data, (nh, nw), (-oy, -ox), fit_keypoints(self.ds.annotations[name], H, W, R, self.ds.fit)


class _ShardSource(_BatchSource):
    """The shard format: each image's member bytes at the stage's resolution (already R x R), read by
    offset with length and CRC-32 checked, and its keypoints at R."""

    def _image(self, row: int):
        return np.frombuffer(self.ds.encoded(row), np.uint8), self.ds.keypoints(row)


# ----------------------------------------------------------------------------- the pipeline
_INTERP = {"nearest": "INTERP_NN", "bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC",
           "lanczos": "INTERP_LANCZOS3"}
PREFETCH = 2  # batches in flight: the pipeline's queue depth and the parallel source's


def _build_pipeline(source: _BatchSource, *, batch_size: int, resolution: int, device: str, num_threads: int,
                    py_workers: int, interp: str, fill: int, seed: int):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device == "gpu"
    R = resolution
    interp_type = getattr(types, _INTERP[interp])
    # device_id=None: DALI's CPU-only mode (no CUDA context); on a GPU the rank's current device.
    device_id = torch.cuda.current_device() if gpu else None
    # Python workers read the encoded bytes; fork is unsafe once CUDA is initialised, spawn pickles
    # the source (a ShardSet reopens its files and maps in the worker).
    start = "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork"
    u8, f32, i32, i64 = types.UINT8, types.FLOAT, types.INT32, types.INT64
    dtypes = [u8, u8] + ([f32, f32, i32, i32] if source.resizes else []) + [i32, f32, f32, i64, i32]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=PREFETCH, exec_dynamic=True, py_num_workers=py_workers,
                  py_start_method=start)
    def pipe():
        outs = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, batch_info=True,
                                  parallel=True, prefetch_queue_depth=PREFETCH, dtype=dtypes)
        ref, tgt = outs[0], outs[1]
        geometry = outs[2:6] if source.resizes else None
        flip, kp_ref, kp_tgt, index, skipped = outs[-5:]
        shape = types.Constant(np.array([R, R], np.int32), device="cpu")
        images = []
        for k, enc in enumerate((ref, tgt)):
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
            if geometry is not None:
                # size = (h, w) per sample, from the host geometry; antialias = PIL's filter support scaling.
                img = fn.resize(img, size=geometry[k], interp_type=interp_type, antialias=True)
                # Pad (a slice that leaves the image fills) at the same offset and fill as PairDataset.
                img = fn.slice(img, geometry[2 + k], shape, axes=[0, 1], out_of_bounds_policy="pad",
                               fill_values=fill)
            # uint8 CHW out (a quarter of float's bytes); [-1, 1] is made by _images with the torch
            # loader's own arithmetic, so equal pixels give bit-equal tensors.
            img = fn.crop_mirror_normalize(img, mirror=flip, output_layout="CHW", dtype=types.UINT8)
            images.append(img)
        return images[0], images[1], kp_ref, kp_tgt, index, skipped

    p = pipe()
    p.build()
    return p


class DaliLoader:
    """Iterable of batch dicts, one epoch of one rank (like the ``DataLoader`` of ``make_loader``).

    Yields {"reference": (B,3,R,R) float32 [-1,1], "target": (B,3,R,R) float32, "kp_reference":
    (B,18,2) float32 (y,x) at R, "kp_target": (B,18,2) float32, "index": (B,) int64}. Images are on
    the current CUDA device for ``device="gpu"``, on the CPU otherwise; the rest is on the CPU.
    Each ``iter()`` builds a fresh pipeline and replays the same epoch (DataLoader semantics).
    ``workers``: DALI's Python workers reading the encoded bytes (``py_num_workers``).
    """

    def __init__(self, dataset, order: list[int], batch_size: int, *, skip_batches: int = 0, device: str = "cpu",
                 num_threads: int = 2, workers: int = 1, seed: int = 0):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise DaliUnavailable("DALI device='gpu' needs CUDA; use device='cpu' (DALI CPU-only mode)")
        self.dataset, self.order, self.batch_size = dataset, order, batch_size
        self.skip_batches, self.device, self.num_threads, self.seed = skip_batches, device, num_threads, seed
        self.workers = max(1, workers)
        self.skipped = 0  # pairs replaced under skip_bad during the last iteration

    def __len__(self) -> int:
        return max(0, len(self.order) // self.batch_size - self.skip_batches)

    def _source(self) -> _BatchSource:
        from hptransfer.data.shards import ShardPairDataset

        kind = _ShardSource if isinstance(self.dataset, ShardPairDataset) else _FolderSource
        return kind(self.dataset, self.order, self.batch_size, self.skip_batches)

    def __iter__(self) -> Iterator[dict]:
        from hptransfer.data.dataset import PAD_VALUE

        if len(self) == 0:
            return
        source = self._source()
        pipe = _build_pipeline(source, batch_size=self.batch_size, resolution=self.dataset.resolution,
                               device=self.device, num_threads=self.num_threads, py_workers=self.workers,
                               interp="bilinear", fill=PAD_VALUE, seed=self.seed)
        it = 0
        self.skipped = 0
        try:
            while True:
                try:
                    outs = pipe.run()
                except StopIteration:
                    return
                except Exception as e:  # noqa: BLE001 - a worker's or the decoder's error, explained below
                    raise _explain(e, source, it) from e
                it += 1
                self.skipped += int(np.array(outs[5].as_tensor()).sum())
                yield {"reference": _images(outs[0]), "target": _images(outs[1]), "kp_reference": _tensor(outs[2]),
                       "kp_target": _tensor(outs[3]), "index": _tensor(outs[4]).reshape(-1)}
        finally:
            del pipe


def _tensor(tl) -> torch.Tensor:
    """A DALI TensorList (uniform shapes) -> an owned torch tensor on the list's device."""
    t = tl.as_tensor()
    if hasattr(tl, "as_cpu") and type(tl).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype],
                          device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(t))  # np.array copies: DALI reuses its buffers


def _images(tl) -> torch.Tensor:
    """uint8 (B, 3, R, R) -> float32 in [-1, 1], as :func:`hptransfer.data.dataset.to_tensor` computes it."""
    return _tensor(tl).float().div_(127.5).sub_(1.0)


def _explain(err: Exception, source: _BatchSource, iteration: int) -> Exception:
    """The error behind a failed batch, naming the file or shard member. The source is a pure function
    of the iteration, so a worker's failure is reproduced here with its own type and message; a
    decoder failure (DALI's messages name no file) is found by decoding the in-flight images with PIL."""
    from PIL import Image

    from hptransfer.data.formats import DataFormatError

    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    first = next((ln for ln in lines if ln.startswith(("Failed", "Error in"))), lines[0] if lines else repr(err))
    in_flight = range(iteration, iteration + PREFETCH + 2)
    for it in in_flight:
        try:
            source(it)
        except StopIteration:
            break
        except (DataFormatError, FileNotFoundError) as e:
            return e
    labels = []
    for it in in_flight:
        for label, data in source.images(it):
            labels.append(label)
            if isinstance(data, Exception):
                return data
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001 - any PIL failure is the answer
                return DataFormatError(f"{_image_label(label, source)} is unreadable: {e} (DALI: {first})")
    return RuntimeError(f"DALI pipeline failed (images in flight: {labels}): {err}")


def _image_label(label: str, source: _BatchSource) -> str:
    return f"image file {source.ds.image_dir / label}" if source.resizes else label


# ----------------------------------------------------------------------------- factories
def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def make_dali_loader_from_dataset(dataset, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                                  shuffle: bool = True, epoch: int = 0, skip_batches: int = 0, device: str = "cpu",
                                  num_threads: Optional[int] = None, workers: Optional[int] = None) -> DaliLoader:
    """``make_loader``'s twin over an existing ``PairDataset`` or ``ShardPairDataset`` (same order,
    flips, skips; drop_last).

    Calls ``dataset.set_epoch(epoch)`` like ``make_loader``. ``device``: "gpu" (nvJPEG decode,
    images on the current CUDA device) or "cpu" (DALI CPU-only mode, ``device_id=None``).
    ``num_threads``: DALI's decode threads; ``workers``: its Python workers reading the bytes
    (both default to up to 4, the cores there are).
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch, seed=seed)  # flips seeded by the run seed, as make_loader does
    order = epoch_order(dataset, seed=seed, epoch=epoch, rank=rank, world_size=world_size, shuffle=shuffle)
    return DaliLoader(dataset, order, batch_size, skip_batches=skip_batches, device=device,
                      num_threads=num_threads or _default_threads(), workers=workers or _default_threads(), seed=seed)


def make_dali_loader(dataset_root, split: str, resolution: int, batch_size: int, *, seed: int, rank: int = 0,
                     world_size: int = 1, epoch: int = 0, skip_batches: int = 0, flip: bool = False,
                     fit: str = "pad", device: str = "cpu", skip_bad: bool = False,
                     num_threads: Optional[int] = None, workers: Optional[int] = None) -> DaliLoader:
    """A DALI loader of ``split`` at ``resolution`` from a folder or a shard folder (detected); rebuild
    it when the stage grows.

    Same batches as ``make_loader(open_pair_dataset(root, split, resolution, flip, fit, skip_bad,
    seed=seed), batch_size, seed=seed, ...)``: flips are seeded by (seed, epoch, index).
    """
    from hptransfer.data.shards import open_pair_dataset

    ds = open_pair_dataset(dataset_root, split, resolution, flip=flip, fit=fit, skip_bad=skip_bad, seed=seed)
    return make_dali_loader_from_dataset(ds, batch_size, seed=seed, rank=rank, world_size=world_size,
                                         epoch=epoch, skip_batches=skip_batches, device=device,
                                         num_threads=num_threads, workers=workers)


def make_loader_for_config(data_cfg, dataset, batch_size: int, *, device, seed: int, rank: int = 0,
                           world_size: int = 1, epoch: int = 0, skip_batches: int = 0):
    """The trainer's loader for ``data.loader`` (auto = DALI on CUDA when installed, torch otherwise).

    ``dataset`` is the trainer's ``PairDataset`` or ``ShardPairDataset``; returns ``make_loader(...)``
    or a ``DaliLoader`` yielding the same batch dicts (drop_last, shuffled, sharded like
    DistributedSampler). ``data.workers`` is the torch loader's worker count, and DALI's decode
    threads and Python readers.
    """
    kind = resolve_loader(data_cfg.loader, device)
    if kind == "dali":
        dev = "gpu" if torch.device(device).type == "cuda" else "cpu"
        return make_dali_loader_from_dataset(dataset, batch_size, seed=seed, rank=rank, world_size=world_size,
                                             epoch=epoch, skip_batches=skip_batches, device=dev,
                                             num_threads=max(1, data_cfg.workers), workers=max(1, data_cfg.workers))
    from hptransfer.data.dataset import make_loader

    return make_loader(dataset, batch_size, workers=data_cfg.workers, seed=seed, rank=rank, world_size=world_size,
                       shuffle=True, drop_last=True, epoch=epoch, skip_batches=skip_batches)
