"""The labeled store: the labeled split's images decoded once, as raw pixels on disk.

SuNCEt's labeled split is small and revisited every step (C x K images a step from 1% or 10%
of the training set), so decoding its JPEGs again on every visit costs more than the crops cut
from them. The store holds each labeled image decoded once, uint8 HWC at its stored size, all
concatenated in one flat file, plus a small index; the pipelines crop from a memory map of it.

Files, in a cache folder (``DATA/cache/`` unless ``data.cache_dir`` says otherwise)::

    labeled-<source>-<key>.u8         the pixels, image after image
    labeled-<source>-<key>.index.npz  per image: sample index, height, width, byte offset;
                                      the key's parts; written last (it marks the store done)
    labeled-<source>-<key>.lock       serializes builders (fcntl), left in place

The key is a sha1 of the labeled indices, the source files' sizes and the manifest's train
fingerprint, so another split, another dataset or a reconverted one gets another store; the
index repeats the key's parts and is checked against them, so a store renamed or copied from
elsewhere is rebuilt, not used. A build writes temporary files and renames them, the index
last, so a killed build never leaves a store that looks finished; several ranks starting
together take an exclusive lock: one builds, the others wait and then read its store.

Size: about 141 kB per image at max side 256 (ImageNet's mean), so 1.8 GB for ImageNet's
1% split (12,811 images) and 18 GB for 10% (128,116); 15 MB for CIFAR-10's 10%. Clear it with
``rm -rf DATA/cache`` (or the ``cache_dir`` folder): the next run rebuilds what it needs.

Limitation: a store is checked by its size and index, not by a checksum of its pixels, so
bytes damaged in place (same size) go unnoticed; delete the cache folder if in doubt.
Limitation: the pixels are read through the page cache; a store larger than the free memory
(10% ImageNet: 18 GB per node) is read from disk on most steps, at the disk's random-read
speed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipelines.errors import PipelineError

log = logging.getLogger(__name__)

VERSION = 1
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "suncet-trainer"


def store_key(source: str, source_bytes: Sequence[int], fingerprint: str, samples) -> str:
    """The store's content key: sha1 of its format, source, source sizes, train fingerprint and
    labeled sample indices."""
    h = hashlib.sha1(f"labeled-store/{VERSION}\n{source}\n{fingerprint}\n".encode())
    h.update(np.asarray(source_bytes, dtype="<i8").tobytes())
    h.update(np.asarray(samples, dtype="<i8").tobytes())
    return h.hexdigest()


class LabeledStore:
    """A finished store, read-only: the pixels as a memory map and the per-image index.

    Attributes:
        samples: sample indices, ``[L]`` int64, sorted (store position = rank in this array).
        height, width: each image's size, ``[L]`` int64.
        offset: each image's first byte in the pixel file, ``[L]`` int64.
        pixels: the pixel file, ``[bytes]`` uint8 memory map.
    """

    def __init__(self, pixels_path: Path, index: dict[str, np.ndarray]) -> None:
        self.path = pixels_path
        self.samples = index["samples"]
        self.height, self.width, self.offset = index["height"], index["width"], index["offset"]
        self.nbytes = int(index["nbytes"])
        self.pixels = (
            np.memmap(pixels_path, dtype=np.uint8, mode="r")
            if self.nbytes
            else np.zeros(0, np.uint8)
        )  # [bytes]

    def __len__(self) -> int:
        return len(self.samples)

    def positions(self, samples: np.ndarray) -> np.ndarray:
        """Store positions of dataset sample indices (all must be in the store), ``[n]``."""
        pos = np.searchsorted(self.samples, samples)  # [n]
        pos = np.minimum(pos, len(self.samples) - 1)
        if not np.array_equal(self.samples[pos], samples):
            missing = np.asarray(samples)[self.samples[pos] != samples][:5].tolist()
            raise PipelineError(f"{self.path}: samples {missing} are not in the labeled store")
        return pos

    def images(self, samples: np.ndarray) -> list[np.ndarray]:
        """The decoded images of dataset samples, each ``[H, W, 3]`` uint8 (views of the map)."""
        out = []
        for p in self.positions(np.asarray(samples)).tolist():
            h, w, at = int(self.height[p]), int(self.width[p]), int(self.offset[p])
            out.append(self.pixels[at : at + h * w * 3].reshape(h, w, 3))  # [H, W, 3]
        return out


def open_store(
    data_dir: str | os.PathLike,
    cache_dir: str,
    source: str,
    source_bytes: Sequence[int],
    fingerprint: str,
    samples: np.ndarray,
    make_decode: Callable[[], Iterable[Sequence[np.ndarray]]],
) -> LabeledStore:
    """The labeled store of `samples`, reused if a finished one exists, else built.

    Args:
        data_dir: the dataset folder (its ``cache/`` is the default place).
        cache_dir: ``data.cache_dir``: "" for ``DATA/cache`` (or, where DATA is read-only,
            ``~/.cache/suncet-trainer``); else the folder to use.
        source: which decoder the pixels come from (``ffcv``, ``dali``): part of the name.
        source_bytes: sizes of the files the pixels are decoded from.
        fingerprint: the manifest's train-split fingerprint.
        samples: sorted labeled sample indices, ``[L]``.
        make_decode: called only when building: returns an iterable of chunks, each a sequence
            of ``[H, W, 3]`` uint8 images, the images of `samples` in order.

    Raises:
        PipelineError: no cache folder can be written, or the disk fills up while building.
    """
    samples = np.ascontiguousarray(samples, dtype=np.int64)  # [L]
    key = store_key(source, source_bytes, fingerprint, samples)
    name = f"labeled-{source}-{key[:20]}"
    parts = {"key": key, "source": source, "fingerprint": fingerprint}
    folders = [Path(cache_dir)] if cache_dir else [Path(data_dir) / "cache", USER_CACHE]

    # 1. A finished store in any candidate folder is used as it is (read-only folders too).
    for folder in folders:
        store = _load(folder, name, parts, samples, quiet=True)
        if store is not None:
            log.info("labeled store: reusing %s (%s)", store.path, _size(store.nbytes))
            return store

    # 2. Else build it in the first folder we can write, under an exclusive lock.
    errors = []
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = open(folder / f"{name}.lock", "a")  # noqa: SIM115 (held until the end)
        except OSError as e:
            errors.append(f"{folder} ({e.strerror or e})")
            continue
        if folder != folders[0]:
            log.info("labeled store: %s not writable, using %s", folders[0], folder)
        with lock, _locked(lock, folder / name):
            store = _load(folder, name, parts, samples, quiet=False)  # another rank built it
            if store is not None:
                log.info("labeled store: reusing %s (%s)", store.path, _size(store.nbytes))
                return store
            return _build(folder, name, parts, samples, make_decode())
    raise PipelineError(
        "labeled store: no cache folder can be written: " + "; ".join(errors)
        + "; set --cache-dir (data.cache_dir) to a writable folder"
    )  # fmt: skip


@contextmanager
def _locked(lock, what: Path) -> Iterator[None]:
    """Holds an exclusive fcntl lock on the open file `lock` (waits for another builder)."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("labeled store: waiting for another process building %s", what)
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)


def _load(folder: Path, name: str, parts: dict, samples: np.ndarray, quiet: bool):
    """The finished store `name` in `folder` if it is whole and is the one asked for, else None
    (a damaged or mismatched one is reported unless `quiet`, and later rebuilt)."""
    index_path, pixels_path = folder / f"{name}.index.npz", folder / f"{name}.u8"
    if not index_path.is_file():
        return None
    try:
        with np.load(index_path, allow_pickle=False) as z:
            index = {k: z[k] for k in z.files}
        problem = _mismatch(index, parts, samples, pixels_path)
    except (OSError, ValueError, KeyError, EOFError) as e:
        problem = f"unreadable index ({type(e).__name__}: {e})"
    if problem is None:
        return LabeledStore(pixels_path, index)
    if not quiet:
        log.warning("labeled store: %s: %s; rebuilding it", index_path, problem)
    return None


def _mismatch(index: dict, parts: dict, samples: np.ndarray, pixels_path: Path) -> str | None:
    """Why an index does not describe a whole store of `samples` for `parts`, or None."""
    if int(index["version"]) != VERSION:
        return f"format version {int(index['version'])}, expected {VERSION}"
    if not np.array_equal(index["samples"], samples):
        return "it holds other labeled images (stale store)"
    for k, want in parts.items():
        if str(index[k]) != want:
            return f"{k} {str(index[k])!r} differs from this dataset's {want!r} (stale store)"
    if not pixels_path.is_file():
        return f"{pixels_path.name} is missing"
    size = pixels_path.stat().st_size
    if size != int(index["nbytes"]):
        return f"{pixels_path.name} has {size} bytes, the index records {int(index['nbytes'])}"
    return None


def _build(folder: Path, name: str, parts: dict, samples: np.ndarray, chunks) -> LabeledStore:
    """Writes the store under temporary names and renames it into place, the index last."""
    t0 = time.perf_counter()
    for stale in folder.glob(f"{name}.*.tmp-*"):  # left by a killed build (we hold the lock)
        stale.unlink(missing_ok=True)
    tag = f"tmp-{socket.gethostname()}-{os.getpid()}"
    pixels_tmp, index_tmp = folder / f"{name}.u8.{tag}", folder / f"{name}.index.npz.{tag}"
    n = len(samples)
    height, width = np.zeros(n, np.int64), np.zeros(n, np.int64)  # [L]
    offset = np.zeros(n, np.int64)  # [L]
    try:
        done = 0
        with open(pixels_tmp, "wb") as f:
            for chunk in chunks:
                for image in chunk:
                    if done == n:
                        raise PipelineError(f"labeled store: more than {n} images decoded")
                    h, w, c = image.shape
                    if c != 3 or image.dtype != np.uint8:
                        raise PipelineError(
                            f"labeled store: sample {samples[done]} decoded to {image.shape} "
                            f"{image.dtype}, expected [H, W, 3] uint8"
                        )
                    height[done], width[done], offset[done] = h, w, f.tell()
                    f.write(memoryview(np.ascontiguousarray(image)).cast("B"))
                    done += 1
            if done != n:
                raise PipelineError(f"labeled store: {done} of {n} images decoded")
            nbytes = f.tell()
            f.flush()
            os.fsync(f.fileno())
        index = dict(
            version=VERSION, samples=samples, height=height, width=width, offset=offset,
            nbytes=nbytes, **parts,
        )  # fmt: skip
        with open(index_tmp, "wb") as f:
            np.savez(f, **index)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pixels_tmp, folder / f"{name}.u8")
        os.replace(index_tmp, folder / f"{name}.index.npz")  # the store is finished from here
        fsync_dir(folder)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PipelineError(
                f"labeled store: disk full writing {pixels_tmp} ({n} images); free space "
                "or set --cache-dir (data.cache_dir) to a folder with room"
            ) from None
        raise PipelineError(f"labeled store: cannot write {pixels_tmp} ({e})") from None
    finally:
        pixels_tmp.unlink(missing_ok=True)
        index_tmp.unlink(missing_ok=True)
    store = LabeledStore(folder / f"{name}.u8", index)
    log.info(
        "labeled store: built %s: %d images, %s in %.1f s",
        store.path, n, _size(nbytes), time.perf_counter() - t0,
    )  # fmt: skip
    return store


def fsync_dir(folder: Path) -> None:
    """Flushes a folder's entries (a rename into it) to disk, where the filesystem allows it
    (some network and FUSE filesystems refuse a folder's fsync: then nothing is done)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
