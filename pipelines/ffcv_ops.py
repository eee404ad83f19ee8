"""FFCV pieces for multi-crop SSL: a decode-once multi-crop decoder and a fixed traversal order.

`MultiCropDecoder` decodes each stored image once into a scratch buffer and cuts every view
(random-resized crop + resize) from that decode into one flat uint8 row per image: the views
in order, each ``[S_v, S_v, 3]`` (HWC), then 8 bytes holding the sample index (int64), so that
one decoder serves the whole batch and no other field needs a compiled decoder. The caller
splits the row with torch views.

Its heavy loop (`_multicrop_kernel`) is a numba function compiled with ``cache=True``: it calls
FFCV's C library by symbol name (``imdecode``, ``resize``) rather than through FFCV's ctypes
wrappers, so numba can cache it on disk and a second process starts in well under a second.
Crop randomness comes from a counter-based hash of (key, the batch's sample indices, slot in
the batch, view, draw), not from numba's thread-local generator, so crops are the same whichever
worker thread decodes a sample, and a sample that comes twice (a labeled class with fewer images
than K, a small labeled split seen several times an epoch) gets fresh crops each time;
the key is read at run time from a small array owned by the decoder (`set_key`), so a new epoch
needs no recompilation.

Limitation: binding `imdecode`/`resize` by name depends on FFCV 1.0.2's private C interface
(`ffcv._libffcv`: argument lists as in `ffcv/libffcv.py`); another FFCV release may break it.
Limitation: the kernel reads storage through FFCV's OS-cache memory manager state
(mmap, pointers, sizes), so loaders using this decoder must pass ``os_cache=True``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import llvmlite.binding as llvm
import numba
import numba.typed
import numpy as np
import torch


def _import_ffcv_fields() -> None:
    """Imports ffcv.fields without JIT-compiling a numba typed dict (5-15 s per process).

    ffcv/fields/rgb_image.py builds its two-entry IMAGE_MODES table as a ``numba.typed.Dict``
    at import, which compiles numba's dict machinery; FFCV only ever reads that table from
    Python, so a plain dict serves. Nothing changes if ffcv.fields is already imported.
    """
    if "ffcv.fields.rgb_image" in sys.modules:
        return
    typed_dict, torch_threads = numba.typed.Dict, torch.get_num_threads()
    numba.typed.Dict = dict
    try:
        import ffcv.fields.rgb_image  # noqa: F401
    finally:
        numba.typed.Dict = typed_dict
        torch.set_num_threads(torch_threads)  # ffcv's compiler module sets it to 1 at import


_import_ffcv_fields()

import ffcv._libffcv  # noqa: E402
from ffcv.fields.rgb_image import SimpleRGBImageDecoder  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402
from numba import carray, njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

# 1. FFCV's C functions, bound by symbol name so that code calling them can be cached.
llvm.load_library_permanently(ffcv._libffcv.__file__)
_u32, _i64 = types.uint32, types.int64
# int imdecode(uint8 *src, uint64 size, uint32 h, uint32 w, uint8 *dst, uint32 crop_h,
#              uint32 crop_w, uint32 off_x, uint32 off_y, uint32 num, uint32 denom,
#              bool enable_crop, bool hflip)
_imdecode = types.ExternalFunction(
    "imdecode",
    types.int32(_i64, types.uint64, _u32, _u32, _i64, *[_u32] * 6, types.uint8, types.uint8),
)
# void resize(int64 interp, uint8 *src, int64 rows, int64 cols, int64 r0, int64 r1, int64 c0,
#             int64 c1, uint8 *dst, int64 dst_rows, int64 dst_cols)
_resize = types.ExternalFunction("resize", types.void(*[_i64] * 11))

JPG_MODE = 0  # ffcv.fields.rgb_image.IMAGE_MODES["jpg"]


@intrinsic
def _as_voidptr(typingctx, address):
    """An integer address as a ``void*`` (numba has no built-in cast)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@njit(cache=True)
def read_key(address):
    """The uint64 stored at `address` (a decoder's run-time key)."""
    return carray(_as_voidptr(address), (1,), np.uint64)[0]


# 2. Counter-based random numbers: a pure function of (key, sample, view, draw).
@njit(cache=True, inline="always")
def _mix(x):
    """splitmix64's finalizer: a bijective 64-bit hash."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True, inline="always")
def _uniform(stream, draw):
    """A float in [0, 1) from a stream id and a draw number."""
    bits = _mix(stream + np.uint64(draw) * np.uint64(0x9E3779B97F4A7C15))
    return np.float64(bits >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def random_crop(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, stream):
    """torchvision's RandomResizedCrop box (10 tries, then a centre crop): (row, col, h, w)."""
    area = height * width
    draw = 0
    for _ in range(10):
        target = area * (scale_lo + (scale_hi - scale_lo) * _uniform(stream, draw))
        aspect = np.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * _uniform(stream, draw + 1))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(_uniform(stream, draw + 2) * (height - h + 1))
            j = int(_uniform(stream, draw + 3) * (width - w + 1))
            return i, j, h, w
        draw += 4
    in_ratio = width / height
    if in_ratio < np.exp(log_ratio_lo):
        w = width
        h = int(round(w / np.exp(log_ratio_lo)))
    elif in_ratio > np.exp(log_ratio_hi):
        h = height
        w = int(round(h * np.exp(log_ratio_hi)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# 3. The kernel: one decode per image, every view cut from it.
@njit(cache=True, parallel=True, nogil=True)
def _multicrop_kernel(
    batch_indices,
    out,
    scratch,
    metadata,
    mmap,
    ptrs,
    sizes,
    view_size,
    view_offset,
    view_box,
    index_offset,
    key,
):
    """Decodes batch_indices[b] once and writes all its views into out[b].

    Args:
        batch_indices: dataset sample indices, ``[B]``.
        out: flat output rows, ``[B, T]`` uint8 (T = sum of S*S*3).
        scratch: one decode buffer per image, ``[B, max_h * max_w * 3]`` uint8.
        metadata: the image field's metadata (mode, width, height, data_ptr) per sample.
        mmap, ptrs, sizes: FFCV's OS-cache storage state.
        view_size: output side S of each view, ``[V]``.
        view_offset: start of each view in a row, ``[V]``.
        view_box: scale and log-ratio ranges of each view, ``[V, 4]``.
        index_offset: where the sample index goes in a row (8-byte aligned).
        key: run-time key (seed, epoch, rank, stream) of the crop randomness.
    """
    # The batch's key: a hash of its samples in order, so that a sample repeated in another
    # batch of the epoch (or another slot of this one) is cropped afresh.
    batch_key = np.uint64(0x9E3779B97F4A7C15)
    for b in range(len(batch_indices)):
        batch_key = _mix(batch_key ^ np.uint64(batch_indices[b]))

    for b in prange(len(batch_indices)):
        sample = batch_indices[b]
        field = metadata[sample]
        address = np.uint64(field["data_ptr"])
        size = sizes[np.searchsorted(ptrs, address)]
        data = mmap[address : address + size]
        height, width = np.int64(field["height"]), np.int64(field["width"])

        if field["mode"] == JPG_MODE:
            image = scratch[b]
            _imdecode(
                data.ctypes.data, np.uint64(size), np.uint32(height), np.uint32(width),
                image.ctypes.data, np.uint32(height), np.uint32(width),
                np.uint32(0), np.uint32(0), np.uint32(1), np.uint32(1), np.uint8(0), np.uint8(0),
            )  # fmt: skip
            source = image.ctypes.data
        else:  # raw pixels, stored HWC
            source = data.ctypes.data

        row = out[b]
        row[index_offset : index_offset + 8].view(np.uint64)[0] = np.uint64(sample)
        for v in range(len(view_size)):
            slot = _mix(key ^ batch_key ^ np.uint64(b))
            stream = _mix(slot ^ _mix(np.uint64(sample) * np.uint64(64) + np.uint64(v)))
            box = view_box[v]
            i, j, h, w = random_crop(height, width, box[0], box[1], box[2], box[3], stream)
            s = view_size[v]
            dst = row[view_offset[v] : view_offset[v] + s * s * 3]
            _resize(0, source, height, width, i, i + h, j, j + w, dst.ctypes.data, s, s)
    return out[: len(batch_indices)]


class MultiCropDecoder(SimpleRGBImageDecoder):
    """Decodes each image once and cuts every view from the decode into one flat uint8 row.

    Args:
        views: one (size, (scale_lo, scale_hi)) per view, in output order.
        ratio: aspect-ratio range of the crops.
    """

    def __init__(
        self,
        views: Sequence[tuple[int, tuple[float, float]]],
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        super().__init__()
        if not views:
            raise ValueError("MultiCropDecoder needs at least one view")
        self.view_size = np.array([s for s, _ in views], dtype=np.int64)  # [V]
        self.view_offset = np.concatenate([[0], np.cumsum(self.view_size**2 * 3)[:-1]])  # [V]
        view_bytes = int((self.view_size**2 * 3).sum())
        self.index_offset = -(-view_bytes // 8) * 8  # rows stay 8-byte aligned
        self.row_bytes = self.index_offset + 8
        self.view_box = np.array(
            [[lo, hi, np.log(ratio[0]), np.log(ratio[1])] for _, (lo, hi) in views],
            dtype=np.float64,
        )  # [V, 4]
        self._key = np.zeros(1, dtype=np.uint64)  # read by the kernel at run time

    def set_key(self, key: int) -> None:
        """Sets the crop randomness for the batches decoded from now on."""
        self._key[0] = np.uint64(key % 2**64)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple]:
        max_pixels = int(self.metadata["width"].max()) * int(self.metadata["height"].max())
        row = (self.row_bytes,)
        state = replace(previous_state, jit_mode=True, shape=row, dtype=np.dtype("u1"))
        return state, (
            AllocationQuery(row, np.dtype("u1")),
            AllocationQuery((max_pixels * 3,), np.dtype("u1")),
        )

    def generate_code(self) -> Callable:
        kernel, get_key = _multicrop_kernel, read_key
        view_size, view_offset, view_box = self.view_size, self.view_offset, self.view_box
        index_offset = self.index_offset
        key_address = self._key.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            out, scratch = my_storage
            mmap, ptrs, sizes = storage_state
            key = get_key(key_address)
            return kernel(
                batch_indices, out, scratch, metadata, mmap, ptrs, sizes,
                view_size, view_offset, view_box, index_offset, key,
            )  # fmt: skip

        decode.is_parallel = False  # the kernel is parallel itself
        return decode


def unpack_rows(
    flat: torch.Tensor, decoder: MultiCropDecoder, counts: Sequence[int]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Splits a batch of the decoder's rows into groups of views and the sample indices.

    Args:
        flat: the decoder's rows, ``[B, T]`` uint8, on any device.
        decoder: the decoder that wrote them.
        counts: views per group, in row order (a group's views share one side; 0: skipped).

    Returns:
        (one ``[n*B, S, S, 3]`` uint8 tensor per non-empty group, view-major: rows
        ``v*B .. v*B+B-1`` are view v; sample indices ``[B]`` int64).
    """
    b = flat.shape[0]
    at = decoder.index_offset
    indices = flat[:, at : at + 8].contiguous().view(torch.int64).view(b)  # [B]
    groups, view = [], 0
    for n in counts:
        if n == 0:
            continue
        side = int(decoder.view_size[view])
        start = int(decoder.view_offset[view])
        stop = start + n * side * side * 3
        crops = flat[:, start:stop].view(b, n, side, side, 3)  # [B, n, S, S, 3]
        groups.append(crops.transpose(0, 1).reshape(n * b, side, side, 3))  # [n*B, S, S, 3]
        view += n
    return groups, indices


class FixedOrder(TraversalOrder):
    """A traversal order given by a function of the epoch (pass an instance as ``order=``).

    FFCV 1.0.2 accepts a custom order only as an instance it can call with the loader. The
    function must be pure (FFCV calls it twice for epoch 0 and fixes the loader's length
    from epoch 0) and return the same number of entries, of one dtype, every epoch.
    """

    def __init__(self, order_of_epoch: Callable[[int], np.ndarray]) -> None:
        self.order_of_epoch = order_of_epoch

    def __call__(self, loader) -> FixedOrder:
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return np.ascontiguousarray(self.order_of_epoch(epoch), dtype=np.uint64)


def leave_torch_threads_alone() -> None:
    """Stops FFCV from calling ``torch.set_num_threads(num_workers)`` for the whole process.

    FFCV's `Compiler.set_num_threads` sets numba's (thread-local) and torch's (process-wide)
    thread counts, at loader construction and again from each epoch's worker thread, so a
    restore after building a loader would race with it. This replaces it, once, with a version
    that sets only numba's count.

    Limitation: this patches FFCV's `Compiler` class for the whole process (every FFCV loader
    in it keeps torch's thread count as it was).
    """
    from ffcv.pipeline.compiler import Compiler

    if getattr(Compiler, "_torch_threads_left_alone", False):
        return

    def set_num_threads(cls, n: int) -> None:
        cls.num_threads = n if n >= 1 else numba.config.NUMBA_NUM_THREADS
        numba.set_num_threads(min(cls.num_threads, numba.config.NUMBA_NUM_THREADS))

    Compiler.set_num_threads = classmethod(set_num_threads)
    Compiler._torch_threads_left_alone = True


@njit(cache=True)
def _os_cache_read(address, mem_state):
    """FFCV's OS-cache read (ffcv/memory_managers/os_cache.py), compiled once and cached."""
    size = mem_state[2][np.searchsorted(mem_state[1], address)]
    return mem_state[0][address : address + size]


@contextmanager
def cached_os_reader() -> Iterator[None]:
    """While building a Loader: hand FFCV a cached storage reader instead of compiling one.

    FFCV compiles its OS-cache reader eagerly in every Loader (1-4 s each here); our decoder
    reads storage itself, so the reader is only handed to other fields' decoders.
    """
    from ffcv.memory_managers.os_cache import OSCacheManager

    compile_reader = OSCacheManager.compile_reader
    OSCacheManager.compile_reader = lambda self: _os_cache_read
    try:
        yield
    finally:
        OSCacheManager.compile_reader = compile_reader
