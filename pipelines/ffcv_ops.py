"""FFCV pieces for multi-crop SSL: a decode-once multi-crop decoder and a fixed traversal order.

`MultiCropDecoder` decodes each stored image once into a scratch buffer and writes one flat
uint8 row per image, so that one decoder serves the whole batch and no other field needs a
compiled decoder; the caller splits the row with torch views. Where the views are cut:

- ``cut="host"`` (CPU-only runs): the worker threads cut every view (random-resized crop +
  resize, OpenCV's area interpolation through FFCV's C library) into the row: the views in
  order, each ``[S_v, S_v, 3]`` (HWC), then 8 bytes holding the sample index (int64);
- ``cut="device"`` (GPU runs): the worker threads only decode; the row holds the part of the
  image the views need on a fixed ``[max_h + 1, max_w + 1, 3]`` plane and the views' boxes,
  and `cut_on_device` cuts and resizes the views batched where the rows are. Cutting eight
  views costs the host about as much as decoding the image (a 224 crop is as many pixels as
  the whole stored image), so leaving it to the GPU about halves the host's work per image
  (bench/loaders.py); the plane is also fewer bytes to copy than the eight views.

The heavy loops (`_multicrop_kernel`, `_image_kernel`) are numba functions compiled with
``cache=True``: they call FFCV's C library by symbol name (``imdecode``, ``resize``) rather
than through FFCV's ctypes wrappers, so numba can cache them on disk and a second process
starts in well under a second. Crop randomness (the same boxes for both cuts) comes from a
counter-based hash of (key, the batch's sample indices, slot in the batch, view, draw), not
from numba's thread-local generator, so crops are the same whichever worker thread decodes a
sample, and a sample that comes twice (a labeled class with fewer images than K, a small
labeled split seen several times an epoch) gets fresh crops each time; the key is read at run
time from a small array owned by the decoder (`set_key`), so a new epoch needs no
recompilation.

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
from pathlib import Path

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

from pipelines.errors import PipelineError  # noqa: E402

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
UNDECODED = np.uint64(1 << 63)  # set in a row's sample index when its JPEG did not decode


@intrinsic
def _as_voidptr(typingctx, address):
    """An integer address as a ``void*`` (numba has no built-in cast)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@intrinsic
def _memcpy(typingctx, dst, src, nbytes):
    """Copies `nbytes` bytes from address `src` to address `dst` (LLVM's memcpy)."""

    def codegen(context, builder, signature, args):
        to, frm, n = args
        to, frm = builder.inttoptr(to, cgutils.voidptr_t), builder.inttoptr(frm, cgutils.voidptr_t)
        cgutils.raw_memcpy(builder, to, frm, n, 1)
        return context.get_dummy_value()

    return types.void(dst, src, nbytes), codegen


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


# 3. The kernels: one decode per image; every view cut from it (on the host), or the decode and
# the views' boxes handed on (the device cuts them).
@njit(cache=True)
def find_size(ptrs, sizes, address):
    """The size of the allocation that starts at `address`; ptrs ``[A]`` sorted, sizes ``[A]``.
    (A loop, not np.searchsorted: that one takes ~0.7 s to compile, each new process with an
    empty numba cache pays it.)"""
    lo, hi = 0, len(ptrs)
    while lo < hi:
        mid = (lo + hi) // 2
        if ptrs[mid] < address:
            lo = mid + 1
        else:
            hi = mid
    return sizes[lo]


@njit(cache=True)
def _batch_key(batch_indices):
    """A hash of the batch's samples in order, so that a sample repeated in another batch of
    the epoch (or another slot of this one) is cropped afresh."""
    batch_key = np.uint64(0x9E3779B97F4A7C15)
    for b in range(len(batch_indices)):
        batch_key = _mix(batch_key ^ np.uint64(batch_indices[b]))
    return batch_key


@njit(cache=True)
def _pixels(field, mmap, ptrs, sizes, scratch):
    """(address of the sample's HWC pixels, height, width, imdecode's status: 0 decoded):
    decoded into `scratch` when stored as JPEG, in the storage itself when stored raw."""
    address = np.uint64(field["data_ptr"])
    size = find_size(ptrs, sizes, address)
    data = mmap[address : address + size]
    height, width = np.int64(field["height"]), np.int64(field["width"])
    if field["mode"] != JPG_MODE:  # raw pixels, stored HWC
        return data.ctypes.data, height, width, 0
    status = _imdecode(
        data.ctypes.data, np.uint64(size), np.uint32(height), np.uint32(width),
        scratch.ctypes.data, np.uint32(height), np.uint32(width),
        np.uint32(0), np.uint32(0), np.uint32(1), np.uint32(1), np.uint8(0), np.uint8(0),
    )  # fmt: skip
    return scratch.ctypes.data, height, width, status


@njit(cache=True)
def _write_index(row, at, sample, status):
    """The row's sample index (8 bytes at `at`), its top bit set when the JPEG did not decode
    (`check_rows` turns that into an error on the host)."""
    mark = np.uint64(0) if status == 0 else UNDECODED
    row[at : at + 8].view(np.uint64)[0] = np.uint64(sample) | mark


@njit(cache=True)
def _box(key, batch_key, b, sample, v, height, width, box):
    """View v's crop box (row, col, h, w) of the sample in slot b: the same in both kernels."""
    slot = _mix(key ^ batch_key ^ np.uint64(b))
    stream = _mix(slot ^ _mix(np.uint64(sample) * np.uint64(64) + np.uint64(v)))
    return random_crop(height, width, box[0], box[1], box[2], box[3], stream)


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
    layout,
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
        layout: ``[index_offset]``: where the sample index goes in a row (8-byte aligned); an
            array, not a number, so that numba compiles one kernel for every layout.
        key: run-time key (seed, epoch, rank, stream) of the crop randomness.
    """
    index_offset = layout[0]
    batch_key = _batch_key(batch_indices)
    for b in prange(len(batch_indices)):
        sample = batch_indices[b]
        source, height, width, status = _pixels(metadata[sample], mmap, ptrs, sizes, scratch[b])
        row = out[b]
        _write_index(row, index_offset, sample, status)
        for v in range(len(view_size)):
            i, j, h, w = _box(key, batch_key, np.int64(b), sample, v, height, width, view_box[v])
            s = view_size[v]
            dst = row[view_offset[v] : view_offset[v] + s * s * 3]
            _resize(0, source, height, width, i, i + h, j, j + w, dst.ctypes.data, s, s)
    return out[: len(batch_indices)]


@njit(cache=True, parallel=True, nogil=True)
def _image_kernel(batch_indices, out, scratch, metadata, mmap, ptrs, sizes, view_box, layout, key):
    """Decodes batch_indices[b] once and writes the image and its views' boxes into out[b].

    The part of the image that the views need (their boxes' union and a pixel around it; the
    whole image without views) goes to the top-left of a ``[plane_h, plane_w, 3]`` plane
    (plane_h 0: not written), its last row and column repeated once beyond it, so that bilinear
    sampling up to half a pixel past a crop's edge reads the edge; then per view (row, col, h,
    w: `_multicrop_kernel`'s boxes, relative to that part) as int32, then the part's (height,
    width) as int32, then the sample index (int64). Arguments as `_multicrop_kernel`'s, but
    layout is ``[plane_h, plane_w, box_offset, index_offset]``.
    """
    batch_key = _batch_key(batch_indices)
    for b in prange(len(batch_indices)):
        sample = batch_indices[b]
        source, height, width, status = _pixels(metadata[sample], mmap, ptrs, sizes, scratch[b])
        slot = np.int64(b)  # b is an int64 where numba types the loop, a uint64 where it
        # lowers it: without the cast it compiles every callee twice (~2 s)
        _image_row(out[b], source, height, width, sample, slot, view_box, layout, key, batch_key)
        _write_index(out[b], layout[3], sample, status)
    return out[: len(batch_indices)]


@njit(cache=True, nogil=True)
def _image_row(row, source, height, width, sample, b, view_box, layout, key, batch_key):
    """`_image_kernel`'s row for the sample in slot b. A function of its own: numba 0.68's
    parallel-loop pass drops some of these stores when they are written in the loop's body."""
    plane_h, plane_w, box_offset, index_offset = layout[0], layout[1], layout[2], layout[3]
    row[index_offset : index_offset + 8].view(np.uint64)[0] = np.uint64(sample)
    n_views = len(view_box)
    boxes = row[box_offset : box_offset + 16 * n_views + 8].view(np.int32)  # [4V + 2]
    # The region the views need: their boxes' union, one pixel wider on each side that the
    # image has (bilinear sampling reads up to half a pixel past a box's edge).
    r0, r1, c0, c1 = (0, height, 0, width) if n_views == 0 else (height, 0, width, 0)
    for v in range(n_views):
        i, j, h, w = _box(key, batch_key, b, sample, v, height, width, view_box[v])
        boxes[4 * v], boxes[4 * v + 1], boxes[4 * v + 2], boxes[4 * v + 3] = i, j, h, w
        r0, r1, c0, c1 = min(r0, i), max(r1, i + h), min(c0, j), max(c1, j + w)
    r0, r1, c0, c1 = max(r0 - 1, 0), min(r1 + 1, height), max(c0 - 1, 0), min(c1 + 1, width)
    for v in range(n_views):  # boxes relative to the region
        boxes[4 * v] -= r0
        boxes[4 * v + 1] -= c0
    boxes[4 * n_views], boxes[4 * n_views + 1] = r1 - r0, c1 - c0
    line, stride, pitch = (c1 - c0) * 3, width * 3, plane_w * 3  # bytes of the rows
    first = source + r0 * stride + c0 * 3
    for y in range(min(r1 - r0 + 1, plane_h)):  # plane_h 0: no plane
        at = row.ctypes.data + y * pitch
        _memcpy(at, first + min(y, r1 - r0 - 1) * stride, line)
        if c1 - c0 < plane_w:
            _memcpy(at + line, at + line - 3, 3)  # the last column, repeated


CUTS = ("host", "device", "decode")


class MultiCropDecoder(SimpleRGBImageDecoder):
    """Decodes each image once; every view is cut from that decode, here or on the device.

    Args:
        views: one (size, (scale_lo, scale_hi)) per view, in output order.
        ratio: aspect-ratio range of the crops.
        cut: ``"host"``: the worker threads cut and resize every view into one flat uint8 row
            (`unpack_rows` splits it); ``"device"``: they hand on the decoded image and the
            views' boxes (`cut_on_device` cuts them where the rows are, e.g. on a GPU);
            ``"decode"``: decode only, nothing written but the sample index (the limit that
            bench/loaders.py measures any loader against).
    """

    def __init__(
        self,
        views: Sequence[tuple[int, tuple[float, float]]],
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        cut: str = "host",
    ) -> None:
        super().__init__()
        if cut not in CUTS:
            raise ValueError(f"MultiCropDecoder: cut must be one of {CUTS}, got {cut!r}")
        if not views and cut != "decode":
            raise ValueError("MultiCropDecoder needs at least one view")
        self.cut = cut
        self.view_size = np.array([s for s, _ in views], dtype=np.int64)  # [V]
        self.view_offset = np.concatenate([[0], np.cumsum(self.view_size**2 * 3)[:-1]])  # [V]
        self.view_box = np.array(
            [[lo, hi, np.log(ratio[0]), np.log(ratio[1])] for _, (lo, hi) in views],
            dtype=np.float64,
        ).reshape(-1, 4)  # [V, 4]
        self._key = np.zeros(1, dtype=np.uint64)  # read by the kernel at run time
        self.plane = (0, 0)  # (rows, columns) of the image plane in a row ("device" only)
        if cut == "host":
            self._layout(int((self.view_size**2 * 3).sum()))
        else:  # the plane's size is known once the loader hands over the metadata
            self._layout(0)

    def _layout(self, head_bytes: int) -> None:
        """Row layout after `head_bytes` of views or image plane: (boxes,) index; 8-aligned."""
        self.box_offset = -(-head_bytes // 8) * 8
        boxes = 0 if self.cut == "host" else 16 * len(self.view_size) + 8
        self.index_offset = self.box_offset + boxes
        self.row_bytes = self.index_offset + 8
        self._kernel_args = None  # `kernel`'s arrays, made once per layout

    def set_key(self, key: int) -> None:
        """Sets the crop randomness for the batches decoded from now on."""
        self._key[0] = np.uint64(key % 2**64)

    def plan(self, max_h: int, max_w: int) -> None:
        """Fixes the row layout for images of at most ``max_h x max_w`` (FFCV calls this
        through `declare_state_and_memory`; a caller compiling `generate_code` itself must)."""
        if self.cut == "device":
            self.plane = (max_h + 1, max_w + 1)  # room for the repeated last row and column
            self._layout(self.plane[0] * self.plane[1] * 3)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple]:
        max_h, max_w = int(self.metadata["height"].max()), int(self.metadata["width"].max())
        self.plan(max_h, max_w)
        row = (self.row_bytes,)
        state = replace(previous_state, jit_mode=True, shape=row, dtype=np.dtype("u1"))
        return state, (
            AllocationQuery(row, np.dtype("u1")),
            AllocationQuery((max_h * max_w * 3,), np.dtype("u1")),
        )

    def kernel(self) -> tuple[Callable, tuple[np.ndarray, ...]]:
        """The compiled kernel and its arguments between the storage state and the key, as
        read-only arrays (numba types a closure's arrays so: one compiled kernel serves both
        the generated code and `decode_batch`)."""
        kernel = _multicrop_kernel if self.cut == "host" else _image_kernel
        if self._kernel_args is None:
            if self.cut == "host":
                args = (self.view_size, self.view_offset, self.view_box, [self.index_offset])
            else:
                args = (self.view_box, [*self.plane, self.box_offset, self.index_offset])
            self._kernel_args = tuple(np.array(a, dtype=np.asarray(a).dtype) for a in args)
            for a in self._kernel_args:
                a.setflags(write=False)
        return kernel, self._kernel_args

    def decode_batch(self, batch_indices, out, scratch, metadata, storage_state) -> np.ndarray:
        """The generated code's work, called from Python: the rows of `batch_indices`
        ``[B]`` uint64 into `out` ``[B, row_bytes]``. It reuses the kernel compiled (or
        cached) for the FFCV loader; compiling the generated code instead costs ~0.7 s a
        process. `metadata` and `storage_state` as an FFCV loader passes them."""
        kernel, args = self.kernel()
        key = np.uint64(self._key[0])
        return kernel(batch_indices, out, scratch, metadata, *storage_state, *args, key)

    def generate_code(self) -> Callable:
        get_key, key_address = read_key, self._key.ctypes.data
        kernel, args = self.kernel()

        if self.cut == "host":
            view_size, view_offset, view_box, layout = args

            def decode(batch_indices, my_storage, metadata, storage_state):
                out, scratch = my_storage
                mmap, ptrs, sizes = storage_state
                return kernel(
                    batch_indices, out, scratch, metadata, mmap, ptrs, sizes,
                    view_size, view_offset, view_box, layout, get_key(key_address),
                )  # fmt: skip
        else:
            view_box, layout = args

            def decode(batch_indices, my_storage, metadata, storage_state):
                out, scratch = my_storage
                mmap, ptrs, sizes = storage_state
                return kernel(
                    batch_indices, out, scratch, metadata, mmap, ptrs, sizes, view_box,
                    layout, get_key(key_address),
                )  # fmt: skip

        decode.is_parallel = False  # the kernel is parallel itself
        return decode


def check_rows(rows: torch.Tensor, decoder: MultiCropDecoder, beton: Path, files) -> torch.Tensor:
    """The sample indices ``[B]`` of host `rows` (`row_indices`); raises `PipelineError`
    naming the first sample whose JPEG the kernel could not decode (damaged after
    conversion; its views would be garbage otherwise)."""
    index = row_indices(rows, decoder)  # [B]; the top bit marks a failed decode
    if bool((index < 0).any()):
        sample = int(index[index < 0][0]) & ((1 << 63) - 1)
        raise PipelineError(
            f"{beton}: sample {sample} ({files[sample]}): its JPEG does not decode (the file "
            "was damaged after conversion); reconvert the dataset"
        )
    return index


def row_indices(flat: torch.Tensor, decoder: MultiCropDecoder) -> torch.Tensor:
    """The sample indices ``[B]`` int64 carried by a batch of the decoder's rows."""
    at = decoder.index_offset
    return flat[:, at : at + 8].contiguous().view(torch.int64).view(flat.shape[0])  # [B]


def unpack_rows(
    flat: torch.Tensor, decoder: MultiCropDecoder, counts: Sequence[int]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Splits a batch of the decoder's rows (cut ``"host"``) into groups of views.

    Args:
        flat: the decoder's rows, ``[B, T]`` uint8, on any device.
        decoder: the decoder that wrote them.
        counts: views per group, in row order (a group's views share one side; 0: skipped).

    Returns:
        (one ``[n*B, S, S, 3]`` uint8 tensor per non-empty group, view-major: rows
        ``v*B .. v*B+B-1`` are view v; sample indices ``[B]`` int64).
    """
    b = flat.shape[0]
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
    return groups, row_indices(flat, decoder)


def row_boxes(flat: torch.Tensor, decoder: MultiCropDecoder) -> torch.Tensor:
    """The crop boxes (row, col, h, w) of a batch of rows (cut ``"device"``), ``[B, V, 4]``, in
    the coordinates of each row's plane."""
    b, n_views = flat.shape[0], len(decoder.view_size)
    at = decoder.box_offset
    raw = flat[:, at : at + 16 * n_views].contiguous().view(torch.int32)  # [B, 4V]
    return raw.view(b, n_views, 4)


def cut_on_device(
    flat: torch.Tensor, decoder: MultiCropDecoder, counts: Sequence[int]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Cuts the views out of a batch of rows (cut ``"device"``) where the rows are.

    Each view is its box resized to ``S x S`` by `torchvision.ops.roi_align` (aligned, with
    adaptive sampling): bilinear where the box is upscaled, the mean of several bilinear
    samples per output pixel where it is shrunk, as torchvision's antialiased resize.

    Args and returns as `unpack_rows`, except that each group is float32 in [0, 1].

    Limitation: tested on the CPU only (against the workers' cut); its CUDA run is
    tests/test_gpu.py's, which no GPU has run yet.
    """
    from torchvision.ops import roi_align

    b = flat.shape[0]
    rows, cols = decoder.plane
    planes = flat[:, : rows * cols * 3].view(b, rows, cols, 3).permute(0, 3, 1, 2)
    planes = planes.float().div_(255)  # [B, 3, Hp, Wp]
    boxes = row_boxes(flat, decoder).float()  # [B, V, 4]: row, col, h, w
    slot = torch.arange(b, device=flat.device, dtype=torch.float32)  # [B]
    groups, view = [], 0
    for n in counts:
        if n == 0:
            continue
        side = int(decoder.view_size[view])
        box = boxes[:, view : view + n].transpose(0, 1)  # [n, B, 4], view-major
        i, j, h, w = box.unbind(-1)  # each [n, B]
        rois = torch.stack([slot.expand(n, b), j, i, j + w, i + h], -1).view(n * b, 5)
        crops = roi_align(planes, rois, side, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        groups.append(crops.permute(0, 2, 3, 1))  # [n*B, S, S, 3]
        view += n
    return groups, row_indices(flat, decoder)


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
    size = find_size(mem_state[1], mem_state[2], address)
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
