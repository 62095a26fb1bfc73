"""DALI pipeline yielding exactly the batches of ``PairDataset`` + ``make_loader``.

The host side (a ``fn.external_source`` callback) does the cheap work: the per-rank, per-epoch
sample order (the same ``DistributedSampler`` order as the torch loader), reading the encoded
bytes of both images of each pair, checking them, the keypoint geometry and the flip decision,
all taken from the ``PairDataset`` itself so the two loaders cannot drift. DALI does the
expensive work: decoding (``device="mixed"`` = nvJPEG on a GPU, ``"cpu"`` in CPU-only mode with
``device_id=None``), the resize, the pad, the mirror and the normalisation to [-1, 1] NCHW.

The source runs in batch mode in the main process (``parallel=False``): per image it reads the
file, checks its markers and parses the header (tens of microseconds), so worker processes that
would have to pickle the dataset are not worth it; the decode and resize run on DALI's threads
(CPU) or the GPU. Use ``make_loader_for_config`` from the trainer (``data.loader``: auto = DALI on
CUDA, torch on CPU), or ``make_dali_loader`` / ``make_dali_loader_from_dataset`` directly.

Differences from the torch loader, by design:
- Images come back on the GPU when ``device="gpu"`` (keypoints and index stay on the CPU, as the
  torch loader's do); the trainer's ``.to(device)`` is then a no-op.
- Pixels differ by rounding only. ``PairDataset`` resizes with PIL ``BILINEAR`` and
  ``reducing_gap=None``; DALI's ``INTERP_LINEAR`` with ``antialias=True`` is the same triangle
  filter, widened by the scale factor when shrinking. PIL uses fixed-point weights and an 8-bit
  intermediate between its horizontal and vertical passes; DALI uses float weights and rounds
  once. On the CPU both decode with libjpeg-turbo: measured max 2 uint8 units, mean ~0.1
  (``tests/test_dali.py`` bounds 3 and 0.35). nvJPEG on the GPU may round IDCT / chroma
  upsampling differently (the cuda test allows 12 and 1.5 units).
- A JPEG with a broken entropy-coded body (valid markers, garbage data) decodes with a libjpeg
  warning in both loaders (PIL does the same); only structural damage is an error.
- Keypoints, order, flips, index and skip_bad replacements are identical (the same host code).
"""
from __future__ import annotations

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


# ----------------------------------------------------------------------------- host-side source
class _PairSource:
    """``fn.external_source`` callback (batch mode): one full batch per call, StopIteration at the end.

    Everything host-side comes from the ``PairDataset``: pair list, image folder, annotations,
    ``fit_geometry`` / ``fit_keypoints`` and the flip decision (seeded by (seed, epoch, index)).
    Outputs per sample: ref bytes, tgt bytes, ref resize (h, w) float32, tgt resize (h, w), ref
    slice anchor (-off_y, -off_x) int32, tgt anchor, flip int32, kp_ref (18, 2) float32 at R,
    kp_tgt (18, 2), index int64 (1,). Under ``skip_bad`` a pair with a bad image is replaced by the
    next pair (index + 1, ...) keeping the requested index and its flip, as ``PairDataset`` does.
    """

    def __init__(self, dataset, order: list[int], batch_size: int, start_batch: int):
        self.ds, self.order, self.batch_size = dataset, order, batch_size
        self.cursor = start_batch * batch_size
        self.files: dict[int, list[Path]] = {}  # iteration -> files of that batch, to name a decode failure
        self.skipped = 0

    def _image(self, name: str):
        from hptransfer.data.dataset import fit_geometry, fit_keypoints

        path = self.ds.image_dir / name
        data = read_image_bytes(path)
        H, W = _image_size(data, path)
        R = self.ds.resolution
        nh, nw, oy, ox = fit_geometry(H, W, R, self.ds.fit)
        kp = fit_keypoints(self.ds.annotations[name], H, W, R, self.ds.fit)
        return data, (nh, nw), (-oy, -ox), kp, path

    def _sample(self, index: int):
        from hptransfer.data.formats import DataFormatError

        n = len(self.ds.pairs)
        for attempt in range(n):
            a, b = self.ds.pairs[(index + attempt) % n]
            try:
                ref, tgt = self._image(a), self._image(b)
                break
            except (DataFormatError, FileNotFoundError) as e:
                if not self.ds.skip_bad:
                    raise
                self.skipped += 1
                log.warning("skipping pair %d (%s -> %s): %s", (index + attempt) % n, a, b, e)
        else:
            raise DataFormatError(f"{self.ds.root}: no readable pair in split {self.ds.split!r}")
        flip = self.ds._flip_for(index)  # the torch loader's own decision
        kp_ref, kp_tgt = ref[3], tgt[3]
        if flip:
            from hptransfer.pose import flip_keypoints

            R = self.ds.resolution
            kp_ref, kp_tgt = flip_keypoints(kp_ref, R), flip_keypoints(kp_tgt, R)
        return ref, tgt, flip, np.ascontiguousarray(kp_ref, np.float32), np.ascontiguousarray(kp_tgt, np.float32)

    def __call__(self, info):
        if self.cursor + self.batch_size > len(self.order):
            raise StopIteration  # drop_last: a partial batch is never yielded
        indices = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        samples = [self._sample(i) for i in indices]
        self.files[info.iteration] = [p for s in samples for p in (s[0][4], s[1][4])]
        self.files.pop(info.iteration - 8, None)
        f32, i32 = np.float32, np.int32
        return ([s[0][0] for s in samples], [s[1][0] for s in samples],
                [np.array(s[0][1], f32) for s in samples], [np.array(s[1][1], f32) for s in samples],
                [np.array(s[0][2], i32) for s in samples], [np.array(s[1][2], i32) for s in samples],
                [np.array(int(s[2]), i32) for s in samples], [s[3] for s in samples], [s[4] for s in samples],
                [np.array([i], np.int64) for i in indices])


# ----------------------------------------------------------------------------- the pipeline
_INTERP = {"nearest": "INTERP_NN", "bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC",
           "lanczos": "INTERP_LANCZOS3"}


def _build_pipeline(source: _PairSource, *, batch_size: int, resolution: int, device: str, num_threads: int,
                    interp: str, fill: int, seed: int, prefetch: int = 2):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device == "gpu"
    R = resolution
    interp_type = getattr(types, _INTERP[interp])

    # device_id=None: DALI's CPU-only mode (no CUDA context); on a GPU the rank's current device.
    device_id = torch.cuda.current_device() if gpu else None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch, exec_dynamic=True)
    def pipe():
        (ref, tgt, size_ref, size_tgt, anchor_ref, anchor_tgt, flip, kp_ref, kp_tgt, index) = fn.external_source(
            source=source, num_outputs=10, batch=True, batch_info=True, parallel=False,
            dtype=[types.UINT8, types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.INT32, types.INT32,
                   types.FLOAT, types.FLOAT, types.INT64])
        shape = types.Constant(np.array([R, R], np.int32), device="cpu")
        outs = []
        for enc, size, anchor in ((ref, size_ref, anchor_ref), (tgt, size_tgt, anchor_tgt)):
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
            # size = (h, w) per sample, from the host geometry; antialias = PIL's filter support scaling.
            img = fn.resize(img, size=size, interp_type=interp_type, antialias=True)
            # Pad (a slice that leaves the image fills) at the same offset and fill as PairDataset.
            img = fn.slice(img, anchor, shape, axes=[0, 1], out_of_bounds_policy="pad", fill_values=fill)
            img = fn.crop_mirror_normalize(img, mirror=flip, mean=[127.5] * 3, std=[127.5] * 3,
                                           output_layout="CHW", dtype=types.FLOAT)
            outs.append(img)
        return outs[0], outs[1], kp_ref, kp_tgt, index

    p = pipe()
    p.build()
    return p


class DaliLoader:
    """Iterable of batch dicts, one epoch of one rank (like the ``DataLoader`` of ``make_loader``).

    Yields {"reference": (B,3,R,R) float32 [-1,1], "target": (B,3,R,R) float32, "kp_reference":
    (B,18,2) float32 (y,x) at R, "kp_target": (B,18,2) float32, "index": (B,) int64}. Images are on
    the current CUDA device for ``device="gpu"``, on the CPU otherwise; the rest is on the CPU.
    Each ``iter()`` builds a fresh pipeline and replays the same epoch (DataLoader semantics).
    """

    def __init__(self, dataset, order: list[int], batch_size: int, *, skip_batches: int = 0, device: str = "cpu",
                 num_threads: int = 2, seed: int = 0):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise DaliUnavailable("DALI device='gpu' needs CUDA; use device='cpu' (DALI CPU-only mode)")
        self.dataset, self.order, self.batch_size = dataset, order, batch_size
        self.skip_batches, self.device, self.num_threads, self.seed = skip_batches, device, num_threads, seed
        self.skipped = 0  # pairs replaced under skip_bad during the last iteration

    def __len__(self) -> int:
        return max(0, len(self.order) // self.batch_size - self.skip_batches)

    def __iter__(self) -> Iterator[dict]:
        from hptransfer.data.dataset import PAD_VALUE

        if len(self) == 0:
            return
        source = _PairSource(self.dataset, self.order, self.batch_size, self.skip_batches)
        pipe = _build_pipeline(source, batch_size=self.batch_size, resolution=self.dataset.resolution,
                               device=self.device, num_threads=self.num_threads, interp="bilinear",
                               fill=PAD_VALUE, seed=self.seed)
        it = 0
        try:
            while True:
                try:
                    outs = pipe.run()
                except StopIteration:
                    return
                except RuntimeError as e:
                    raise _name_the_file(e, source) from e
                it += 1
                self.skipped = source.skipped
                yield {"reference": _tensor(outs[0]), "target": _tensor(outs[1]), "kp_reference": _tensor(outs[2]),
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


def _name_the_file(err: Exception, source: _PairSource) -> Exception:
    """DALI's decode errors name no file: find the culprit among the batches in flight with PIL."""
    from PIL import Image

    from hptransfer.data.formats import DataFormatError

    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    first = next((ln for ln in lines if ln.startswith(("Failed", "Error in"))), lines[0] if lines else repr(err))
    for it in sorted(source.files):
        for path in source.files[it]:
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001 - any PIL failure is the answer
                return DataFormatError(f"image file {path} is unreadable: {e} (DALI: {first})")
    in_flight = [str(p) for v in source.files.values() for p in v]
    return RuntimeError(f"DALI pipeline failed (files in flight: {in_flight}): {err}")


# ----------------------------------------------------------------------------- factories
def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def make_dali_loader_from_dataset(dataset, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                                  shuffle: bool = True, epoch: int = 0, skip_batches: int = 0, device: str = "cpu",
                                  num_threads: Optional[int] = None) -> DaliLoader:
    """``make_loader``'s twin over an existing ``PairDataset`` (same order, flips, skips; drop_last).

    Calls ``dataset.set_epoch(epoch)`` like ``make_loader``. ``device``: "gpu" (nvJPEG decode,
    images on the current CUDA device) or "cpu" (DALI CPU-only mode, ``device_id=None``).
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch, seed=seed)  # flips seeded by the run seed, as make_loader does
    order = epoch_order(dataset, seed=seed, epoch=epoch, rank=rank, world_size=world_size, shuffle=shuffle)
    return DaliLoader(dataset, order, batch_size, skip_batches=skip_batches, device=device,
                      num_threads=num_threads or _default_threads(), seed=seed)


def make_dali_loader(dataset_root, split: str, resolution: int, batch_size: int, *, seed: int, rank: int = 0,
                     world_size: int = 1, epoch: int = 0, skip_batches: int = 0, flip: bool = False,
                     fit: str = "pad", device: str = "cpu", skip_bad: bool = False,
                     num_threads: Optional[int] = None) -> DaliLoader:
    """A DALI loader of ``split`` at ``resolution``; rebuild it when the stage grows.

    Same batches as ``make_loader(PairDataset(root, split, resolution, flip, fit, skip_bad,
    seed=seed), batch_size, seed=seed, ...)``: flips are seeded by (seed, epoch, index).
    """
    from hptransfer.data.dataset import PairDataset

    ds = PairDataset(dataset_root, split, resolution, flip=flip, fit=fit, skip_bad=skip_bad, seed=seed)
    return make_dali_loader_from_dataset(ds, batch_size, seed=seed, rank=rank, world_size=world_size,
                                         epoch=epoch, skip_batches=skip_batches, device=device,
                                         num_threads=num_threads)


def make_loader_for_config(data_cfg, dataset, batch_size: int, *, device, seed: int, rank: int = 0,
                           world_size: int = 1, epoch: int = 0, skip_batches: int = 0):
    """The trainer's loader for ``data.loader`` (auto = DALI on CUDA when installed, torch otherwise).

    ``dataset`` is the trainer's ``PairDataset``; returns ``make_loader(...)`` or a ``DaliLoader``
    yielding the same batch dicts (drop_last, shuffled, sharded like DistributedSampler).
    """
    kind = resolve_loader(data_cfg.loader, device)
    if kind == "dali":
        dev = "gpu" if torch.device(device).type == "cuda" else "cpu"
        return make_dali_loader_from_dataset(dataset, batch_size, seed=seed, rank=rank, world_size=world_size,
                                             epoch=epoch, skip_batches=skip_batches, device=dev,
                                             num_threads=max(1, data_cfg.workers))
    from hptransfer.data.dataset import make_loader

    return make_loader(dataset, batch_size, workers=data_cfg.workers, seed=seed, rank=rank, world_size=world_size,
                       shuffle=True, drop_last=True, epoch=epoch, skip_batches=skip_batches)
