"""The FFCV backend's labeled stream: crops cut from the labeled store, no second Loader.

`beton_store` decodes the labeled images out of ``train.beton`` once, with FFCV's own
``imdecode`` (bound by name as in `pipelines.ffcv_ops`, in a parallel numba kernel), into a
`pipelines.labeled_store.LabeledStore`. `StoreCrops` then presents the store to the
multi-crop kernel as FFCV would present a raw-pixel ``.beton`` (image metadata with mode raw,
data pointers into the store's memory map, allocation sizes) and runs it per labeled batch
in a background thread, two batches ahead. The kernel is the one the unlabeled loader runs,
called through `MultiCropDecoder`'s generated code with the same key (seed, epoch, rank,
LABELED) and the batch's sample indices, so the crops are the ones the former labeled Loader
cut from the same pixels: fresh for a repeated image, a pure function of (seed, epoch, rank).

The kernel then runs from two threads at once (FFCV's loader thread and this one), which
numba's ``tbb`` and ``omp`` threading layers allow (measured here: ``tbb``) and ``workqueue``
does not (it aborts the process): `StoreCrops` checks the layer and says so instead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numba
import numpy as np
import torch
from numba import njit, prange

from pipelines.errors import PipelineError
from pipelines.ffcv_ops import JPG_MODE, MultiCropDecoder, _imdecode, find_size
from pipelines.labeled_store import LabeledStore, open_store

RAW_MODE = 1  # ffcv.fields.rgb_image.IMAGE_MODES["raw"]
CHUNK = 256  # images decoded per kernel call while building the store
AHEAD = 2  # labeled batches prepared ahead of the one in use


@njit(cache=True, parallel=True, nogil=True)
def _decode_kernel(samples, out, out_offset, status, metadata, mmap, ptrs, sizes):
    """Decodes (or copies, for raw samples) each image of `samples` whole into `out`.

    Args:
        samples: dataset sample indices, ``[n]``.
        out: flat output, ``[sum(H*W*3)]`` uint8; image k starts at out_offset[k].
        out_offset: ``[n]`` int64.
        status: per image, imdecode's return value (0: decoded), ``[n]`` int32.
        metadata, mmap, ptrs, sizes: the image field's metadata and the file's storage.
    """
    for k in prange(len(samples)):
        field = metadata[samples[k]]
        address = np.uint64(field["data_ptr"])
        size = find_size(ptrs, sizes, address)
        data = mmap[address : address + size]
        height, width = np.int64(field["height"]), np.int64(field["width"])
        dst = out[out_offset[k] : out_offset[k] + height * width * 3]
        if field["mode"] == JPG_MODE:
            status[k] = _imdecode(
                data.ctypes.data, np.uint64(size), np.uint32(height), np.uint32(width),
                dst.ctypes.data, np.uint32(height), np.uint32(width),
                np.uint32(0), np.uint32(0), np.uint32(1), np.uint32(1), np.uint8(0), np.uint8(0),
            )  # fmt: skip
        else:
            dst[:] = data[: height * width * 3]
            status[k] = 0


@njit(cache=True, parallel=True)
def _probe(x):
    """A trivial parallel kernel: starts numba's threading layer."""
    for i in prange(len(x)):
        x[i] = i


def check_threading_layer() -> None:
    """Raises `PipelineError` unless numba may run parallel kernels from two threads at once."""
    _probe(np.zeros(2, dtype=np.int64))
    if numba.threading_layer() == "workqueue":
        raise PipelineError(
            "numba's threading layer is workqueue, which cannot run the labeled stream's "
            "kernel beside the FFCV loader's (it aborts); install tbb (`pip install tbb`) or "
            "OpenMP and set NUMBA_THREADING_LAYER=tbb or omp"
        )


def _beton_chunks(
    beton: Path, reader, samples: np.ndarray, files: Sequence[str]
) -> Iterator[list[np.ndarray]]:
    """The images of `samples` decoded from the ``.beton``, ``CHUNK`` at a time; `files`
    (the split's file names) name a sample whose JPEG does not decode."""
    metadata = reader.metadata[f"f{list(reader.handlers).index('image')}"]  # [N]
    mmap = np.memmap(beton, dtype=np.uint8, mode="r")
    order = np.argsort(reader.alloc_table["ptr"])
    ptrs = np.ascontiguousarray(reader.alloc_table["ptr"][order])  # [A] sorted
    sizes = np.ascontiguousarray(reader.alloc_table["size"][order])  # [A]
    for start in range(0, len(samples), CHUNK):
        ix = np.ascontiguousarray(samples[start : start + CHUNK], dtype=np.uint64)  # [n]
        h = metadata["height"][ix].astype(np.int64)  # [n]
        w = metadata["width"][ix].astype(np.int64)  # [n]
        nbytes = h * w * 3  # [n]
        offset = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).astype(np.int64)  # [n]
        out = np.empty(int(nbytes.sum()), dtype=np.uint8)  # [sum(H*W*3)]
        status = np.zeros(len(ix), dtype=np.int32)  # [n]
        _decode_kernel(ix, out, offset, status, metadata, mmap, ptrs, sizes)
        if status.any():
            bad = int(ix[np.flatnonzero(status)[0]])
            raise PipelineError(
                f"{beton}: sample {bad} ({files[bad]}): its JPEG does not decode (the file was "
                "damaged after conversion); reconvert the dataset"
            )
        yield [
            out[o : o + n].reshape(hh, ww, 3)
            for o, n, hh, ww in zip(offset, nbytes, h, w, strict=True)
        ]  # n x [H, W, 3]


def beton_store(
    beton: Path,
    reader,
    data_dir: Path,
    cache_dir: str,
    fingerprint: str,
    samples: np.ndarray,
    files: Sequence[str],
) -> LabeledStore:
    """The labeled store of `samples` decoded from `beton` (built once, then reused)."""
    return open_store(
        data_dir, cache_dir, "ffcv", [beton.stat().st_size], fingerprint, samples,
        lambda: _beton_chunks(beton, reader, samples, files),
    )  # fmt: skip


def check_decodes(beton: Path, reader, samples: np.ndarray, files: Sequence[str]) -> None:
    """Decodes `samples` of `beton` once, keeping nothing: raises `PipelineError` naming the
    first whose JPEG does not decode (FFCV's own decoders would hand on garbage pixels)."""
    for _ in _beton_chunks(beton, reader, np.unique(samples), files):
        pass


class StoreCrops:
    """Labeled batches of multi-crop rows cut from a store by FFCV's multi-crop kernel.

    Args:
        store: the labeled store.
        metadata_dtype: the ``.beton``'s metadata record type (``Reader.metadata_type``).
        image_field: the image field's position in it.
        num_samples: samples in the train split.
        views: one (size, (scale_lo, scale_hi)) per view, as `MultiCropDecoder`.
        threads: numba threads of the kernel.
        cut: ``"host"`` (the views cut here) or ``"device"`` (the images and boxes handed on),
            as `MultiCropDecoder`.
    """

    def __init__(
        self,
        store: LabeledStore,
        metadata_dtype: np.dtype,
        image_field: int,
        num_samples: int,
        views: Sequence[tuple[int, tuple[float, float]]],
        threads: int,
        cut: str = "host",
    ) -> None:
        check_threading_layer()
        self.store, self.views = store, list(views)
        self.threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))

        # The store as FFCV's kernel sees a raw-pixel .beton: one metadata record per sample
        # (the .beton's own record type, so the kernel is typed as for an FFCV loader),
        # pointers into the store's map, and the allocation table (pointer, size) sorted.
        records = np.zeros(num_samples, dtype=metadata_dtype)  # [N]
        image = records[f"f{image_field}"]  # [N]
        image["mode"][store.samples] = RAW_MODE
        image["height"][store.samples] = store.height
        image["width"][store.samples] = store.width
        image["data_ptr"][store.samples] = store.offset
        records.setflags(write=False)
        self.metadata = records[f"f{image_field}"]  # [N], read-only, as FFCV passes it
        self.ptrs = np.ascontiguousarray(store.offset, dtype=np.uint64)  # [L], sorted
        self.sizes = np.ascontiguousarray(store.height * store.width * 3, dtype=np.uint64)  # [L]
        self.max_pixels = int((store.height * store.width).max())

        # The decoder's kernel, called with the argument types of the FFCV loader's
        # generated code, so both streams share one compiled kernel.
        self.decoder = MultiCropDecoder(self.views, cut=cut)
        self.decoder.plan(int(store.height.max()), int(store.width.max()))
        self._kept: tuple[np.ndarray, np.ndarray] | None = None  # scratch and ring

    def epoch(self, batches: np.ndarray, key: int) -> _Prefetch:
        """Rows ``[C*K, T]`` uint8 for each batch of sample indices ``[steps, C*K]``, cut
        with crop key `key`; a background thread starts now and keeps ``AHEAD`` batches ready.

        A yielded tensor is valid until the next one is asked for; `close` stops the thread.
        The key is the decoder's, as for an FFCV loader: close one epoch before the next.
        """
        batches = np.asarray(batches)
        self.store.positions(np.unique(batches))  # every sample must be in the store
        self.decoder.set_key(key)
        b = batches.shape[1] if batches.size else 0
        scratch, ring = self._buffers(b)
        state = (self.store.pixels, self.ptrs, self.sizes)
        decode, metadata = self.decoder.decode_batch, self.metadata

        def cut(ix: np.ndarray, out: np.ndarray) -> None:
            decode(np.ascontiguousarray(ix, dtype=np.uint64), out, scratch, metadata, state)

        return _Prefetch(batches, ring, cut, self.threads)

    def _buffers(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """The decode scratch ``[B, H*W*3]`` and the ring ``[R, B, T]``, made once and reused
        by every epoch (the previous epoch is closed first): fresh ones cost page faults at
        each epoch's start (16 MB at the ImageNet preset's 20 images)."""
        if self._kept is None or self._kept[0].shape[0] != b:
            scratch = np.empty((b, self.max_pixels * 3), dtype=np.uint8)  # [B, H*W*3]
            ring = np.empty((AHEAD + 2, b, self.decoder.row_bytes), dtype=np.uint8)  # [R, B, T]
            self._kept = scratch, ring
        return self._kept


class _Prefetch:
    """Runs ``cut(batch, ring slot)`` over the batches in a thread, ``AHEAD`` batches ahead,
    and yields the filled slots in order as tensors (an error in the thread is raised here).

    The ring has AHEAD + 2 slots: the one in use, AHEAD ready, one being filled.
    """

    def __init__(self, batches: np.ndarray, ring: np.ndarray, cut, threads: int) -> None:
        self.batches, self.ring, self.cut, self.threads = batches, ring, cut, threads
        self.ready: queue.Queue = queue.Queue(maxsize=AHEAD)
        self.stop = threading.Event()
        self.taken = 0
        self.worker = threading.Thread(target=self._produce, name="labeled-crops", daemon=True)
        self.worker.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self) -> None:
        try:
            numba.set_num_threads(self.threads)
            for step, ix in enumerate(self.batches):
                if self.stop.is_set():
                    return
                self.cut(ix, self.ring[step % len(self.ring)])
                if not self._put(step):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def __iter__(self) -> _Prefetch:
        return self

    def __next__(self) -> torch.Tensor:
        if self.taken == len(self.batches):
            raise StopIteration
        item = self.ready.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        self.taken += 1
        return torch.from_numpy(self.ring[item % len(self.ring)])  # [B, T]

    def close(self) -> None:
        """Stops the thread (waits for the batch it is cutting)."""
        self.stop.set()
        if self.worker.is_alive() and self.worker is not threading.current_thread():
            self.worker.join()

    def __del__(self) -> None:
        self.stop.set()
