"""What both converters share: the scan of an ImageFolder tree, validation, decoding,
staged (temporary-name) outputs, the manifest merge and the closing summary.

Both converters call `prepare_source` and therefore see the same sample list for the same tree:
the scan is sorted like torchvision's ImageFolder, and validation is a pure function of each
file's bytes. They also decode with the same `load_rgb` and encode with the same `encode_jpeg`
(FFCV's own OpenCV call), so in jpg mode the JPEG bytes in ``train.beton`` and in the shards are
identical.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import fcntl
import io
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from convert.manifest import MANIFEST_NAME, Manifest, ManifestError, SplitInfo, load_manifest

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
SKIPPED_NAME = "skipped.txt"
WARNED_NAME = "warned.txt"
WARNING_SKIP = "libjpeg warning"  # the reason in skipped.txt with --skip-warned
TMP_SUFFIX = ".tmp"

# A truncated file must be a skip, never a silently grey-padded sample.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ConversionError(RuntimeError):
    """A conversion that cannot go on; the message names the file or folder at fault."""


class Terminated(KeyboardInterrupt):
    """SIGTERM in the main process of a converter (`run_cli`): handled as Ctrl-C is."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while writing `out`: still a KeyboardInterrupt for callers, with the folder named.

    The partial files it leaves are temporary names (`Staging`), removed on the way out or, if
    the process dies first, by the next conversion into `out` (`remove_stale_tmp`).
    """

    def __init__(self, out: Path) -> None:
        super().__init__(str(out))
        self.out = out


# ---------------------------------------------------------------------------------------------
# Scan and validation
# ---------------------------------------------------------------------------------------------


@dataclass
class SourceDataset:
    """The validated sample list of an ImageFolder tree, in manifest order."""

    src: Path
    classes: list[str]
    splits: dict[str, SplitInfo]
    roots: dict[str, Path]  # split -> folder its file names are relative to
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path under src, reason)
    limit_per_class: int | None = None
    warned: list[tuple[str, str]] = field(default_factory=list)  # kept; (path, libjpeg's warning)

    def path(self, split: str, index: int) -> Path:
        return self.roots[split] / self.splits[split].files[index]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.splits.values())


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _class_files(class_dir: Path) -> list[str]:
    """Files under one class folder, relative to its parent, in ImageFolder's order."""
    out = []
    for root, dirs, files in sorted(os.walk(class_dir, followlinks=True)):
        dirs[:] = [d for d in dirs if not _is_hidden(d)]
        for name in sorted(files):
            if not _is_hidden(name):
                out.append(os.path.relpath(os.path.join(root, name), class_dir.parent))
    return out


def split_roots(src: Path) -> dict[str, Path]:
    """``{"train": src/train, "val": src/val}`` for those present, else ``{"train": src}``.

    Without src/val, a src/test folder (CIFAR-10's layout) becomes the val split. Other
    folders beside train/ are not read, and the log says so.
    """
    if not src.is_dir():
        raise ConversionError(
            f"{src}: source folder does not exist; pass --src an ImageFolder tree "
            "(SRC/<class>/<image> or SRC/train/<class>/<image>)"
        )
    roots = {s: src / s for s in SPLITS if (src / s).is_dir()}
    if "train" in roots and "val" not in roots and (src / "test").is_dir():
        log.info("using %s as the val split (there is no %s)", src / "test", src / "val")
        roots["val"] = src / "test"
    if roots:
        read = {p.name for p in roots.values()}
        for p in sorted(src.iterdir()):
            if p.is_dir() and p.name not in read and not _is_hidden(p.name):
                log.warning("not reading %s: only train/ and val/ (or test/) are splits", p)
    return roots or {"train": src}


def scan_tree(
    src: Path, limit_per_class: int | None = None
) -> tuple[list[str], dict[str, list[tuple[str, int]]], dict[str, Path]]:
    """Lists candidate files per split, deterministically.

    Returns:
        classes (sorted class folder names of the first split), per split a list of
        (file name relative to the split folder, label), and the split folders.
    """
    roots = split_roots(src)
    classes: list[str] | None = None
    candidates: dict[str, list[tuple[str, int]]] = {}
    for split, root in roots.items():
        names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _is_hidden(e.name))
        if not names:
            raise ConversionError(f"{root}: no class folders (expected {root}/<class>/<image>)")
        if classes is None:
            classes = names
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise ConversionError(
                f"{root}: class folders {unknown[:5]} are not among the {len(classes)} classes "
                f"of the {next(iter(roots))} split"
            )
        label_of = {c: i for i, c in enumerate(classes)}
        found: list[tuple[str, int]] = []
        for name in names:
            files = _class_files(root / name)
            if not files:
                raise ConversionError(
                    f"{root / name}: empty class folder (no image files); add its images or "
                    "remove the folder"
                )
            found += [(f, label_of[name]) for f in files[:limit_per_class]]
        candidates[split] = found
    assert classes is not None
    return classes, candidates, roots


def open_source(path: str | os.PathLike):
    """Opens a source file for reading (one place, so tests can simulate unreadable files)."""
    return open(path, "rb")


def check_image(path: str | os.PathLike) -> str | None:
    """Cheaply checks that a file decodes; returns the reason it cannot be used, or None."""
    return inspect_image(path)[0]


def inspect_image(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """Checks one source file: (why it cannot be used, or None; libjpeg's warning, or None).

    PIL, which the writing pass decodes with, has the word on errors. JPEGs are decoded at 1/8
    scale (``draft``): libjpeg still reads every entropy-coded segment, so a truncated file
    fails here as it would at full scale (verified on real ImageNet files cut at 30..99 % and
    with the EOI marker removed); other formats decode fully. A JPEG that PIL decodes is then
    decoded again at 1/8 scale by TurboJPEG (`jpeg_warning`) for libjpeg's warnings, which PIL
    drops: damage that libjpeg only warns about (garbage inside the entropy-coded data, an EOI
    marker in mid-scan, bytes before a marker) decodes with grey or garbled areas. Garbage that
    happens to be valid entropy-coded data decodes without a warning: no decoder can tell it
    from an image.
    """
    try:
        with open_source(path) as f:
            data = f.read()
    except OSError as e:
        return f"unreadable ({type(e).__name__}: {e.strerror or e})", None
    if not data:
        return "empty file", None
    try:
        with Image.open(io.BytesIO(data)) as im:
            is_jpeg = im.format == "JPEG"
            im.draft("RGB", (1, 1))
            im.load()
            im.convert("RGB")
    except UnidentifiedImageError:
        return "not an image (PIL cannot identify it)", None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        kind = "truncated" if "truncated" in str(e).lower() else "undecodable"
        return f"{kind} ({type(e).__name__}: {e})", None
    return None, jpeg_warning(data) if is_jpeg else None


class _TurboJPEG:
    """The few calls of libjpeg-turbo's TurboJPEG API (the library FFCV decodes with) that
    report libjpeg's warnings: ``tjDecompress2`` returns -1 with ``tjGetErrorCode`` 0
    (TJERR_WARNING) and the message in ``tjGetErrorStr2``. No dependency of this project
    exposes them (PIL drops them; OpenCV, FFCV and torchvision print them to stderr at most).
    """

    FLAGS = 2048  # TJFLAG_FASTDCT
    RGB, CMYK = 0, 11  # TJPF_RGB, TJPF_CMYK (TurboJPEG cannot turn CMYK into RGB)
    CMYK_SPACES = (3, 4)  # TJCS_CMYK, TJCS_YCCK

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.tjInitDecompress.restype = ctypes.c_void_p
        lib.tjDestroy.argtypes = [ctypes.c_void_p]
        lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong]
        lib.tjDecompressHeader3.argtypes += [ctypes.POINTER(ctypes.c_int)] * 4
        lib.tjDecompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong]
        lib.tjDecompress2.argtypes += [ctypes.c_void_p] + [ctypes.c_int] * 5
        lib.tjGetErrorCode.argtypes = [ctypes.c_void_p]
        lib.tjGetErrorStr2.argtypes = [ctypes.c_void_p]
        lib.tjGetErrorStr2.restype = ctypes.c_char_p

    def warning(self, data: bytes) -> str | None:
        """libjpeg's warning decoding `data` at 1/8 scale, or None (a clean decode, or an error:
        PIL decoded the file, and PIL has the word on errors)."""
        # A handle per file: after an error in a header, libjpeg-turbo 2.1 leaves the handle
        # in a state where the next file's decode reports nothing or crashes the process.
        handle = self.lib.tjInitDecompress()
        if not handle:
            raise MemoryError("tjInitDecompress failed")
        try:
            w, h, sub, space = (ctypes.c_int() for _ in range(4))
            refs = (ctypes.byref(w), ctypes.byref(h), ctypes.byref(sub), ctypes.byref(space))
            if self.lib.tjDecompressHeader3(handle, data, len(data), *refs) != 0:
                return None
            fmt, channels = (self.CMYK, 4) if space.value in self.CMYK_SPACES else (self.RGB, 3)
            sw, sh = -(-w.value // 8), -(-h.value // 8)  # the 1/8 scale's size (TJSCALED)
            out = ctypes.create_string_buffer(sw * sh * channels)
            if self.lib.tjDecompress2(handle, data, len(data), out, sw, 0, sh, fmt, self.FLAGS):
                if self.lib.tjGetErrorCode(handle) == 0:  # TJERR_WARNING
                    return self.lib.tjGetErrorStr2(handle).decode(errors="replace")
            return None
        finally:
            self.lib.tjDestroy(handle)


_turbojpeg: _TurboJPEG | None | bool = False  # False: not loaded yet (in this process)


def jpeg_warning(data: bytes) -> str | None:
    """The warning libjpeg gives decoding these JPEG bytes ("Corrupt JPEG data: ..."), or None.

    None also where libturbojpeg cannot be loaded (logged): such damage then goes undetected.
    """
    global _turbojpeg
    if _turbojpeg is False:
        name = ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0"
        try:
            _turbojpeg = _TurboJPEG(ctypes.CDLL(name))
        except OSError as e:
            log.warning(
                "libturbojpeg not loaded (%s): JPEG damage that libjpeg only warns "
                "about is not detected; install libturbojpeg0",
                e,
            )
            _turbojpeg = None
    return None if _turbojpeg is None else _turbojpeg.warning(data)


def _pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()):
    # Limitation: relies on the "fork" start method (Linux's default before Python 3.14) so
    # workers inherit the sample list instead of pickling it per task.
    ctx = multiprocessing.get_context("fork")
    return ctx.Pool(workers, initializer=initializer, initargs=initargs)


def parallel_map(
    fn: Callable, items: list, workers: int, desc: str, chunksize: int = 16
) -> Iterator:
    """``map(fn, items)`` in order over `workers` processes (in-process for one), with a bar."""
    bar = progress(len(items), desc)
    try:
        if workers <= 1:
            for item in items:
                yield fn(item)
                bar.update()
        else:
            with _pool(workers, _worker_init) as pool:
                for out in pool.imap(fn, items, chunksize=chunksize):
                    yield out
                    bar.update()
    finally:
        bar.close()


def _worker_init() -> None:
    """Runs in each worker process: parallelism is across processes; OpenCV's pool contends.

    Ctrl-C in a terminal reaches every process of the group: a worker ignores it (no traceback
    of its own); the main process handles it and ends the workers, with SIGTERM, which ends a
    worker at once (not through the main process's handler, inherited by a fork).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cv2.setNumThreads(1)


def prepare_source(
    src: str | os.PathLike,
    *,
    limit_per_class: int | None = None,
    workers: int = 1,
    strict: bool = False,
    skip_warned: bool = False,
) -> SourceDataset:
    """Scans and validates an ImageFolder tree into the sample list both formats share.

    A JPEG that decodes with a libjpeg warning is kept and listed in `SourceDataset.warned`
    (with `skip_warned`, skipped instead).

    Raises:
        ConversionError: on an empty class folder, a class left with no decodable image, or
            (with `strict`) the first file that cannot be used or that libjpeg warns about.
    """
    src = Path(src).resolve()
    classes, candidates, roots = scan_tree(src, limit_per_class)
    splits: dict[str, SplitInfo] = {}
    skipped: list[tuple[str, str]] = []
    warned: list[tuple[str, str]] = []
    for split, found in candidates.items():
        paths = [str(roots[split] / f) for f, _ in found]
        checks = parallel_map(inspect_image, paths, workers, f"validate {split}", chunksize=32)
        keep = SplitInfo(files=[], labels=[])
        for (rel, label), path, (reason, warning) in zip(found, paths, checks, strict=True):
            shown = os.path.relpath(path, src)
            if warning is not None:
                if strict or skip_warned:
                    reason = f"{WARNING_SKIP} ({warning})"
                else:
                    log.warning("keeping %s, which libjpeg warns about: %s", shown, warning)
                    warned.append((shown, warning))
            if reason is None:
                keep.files.append(rel)
                keep.labels.append(label)
                continue
            if strict:
                raise ConversionError(f"{path}: {reason} (--strict stops at the first bad file)")
            log.warning("skipping %s: %s", shown, reason)
            skipped.append((shown, reason))
        counts = keep.counts(len(classes))
        empty = [classes[c] for c, n in enumerate(counts) if n == 0 and _has_candidates(found, c)]
        if empty:
            raise ConversionError(
                f"{roots[split]}: class folders {empty[:5]} have no decodable image "
                f"(see the skipped files above); replace their images or remove the folders"
            )
        splits[split] = keep
    return SourceDataset(src, classes, splits, roots, skipped, limit_per_class, warned)


def _has_candidates(found: list[tuple[str, int]], label: int) -> bool:
    return any(y == label for _, y in found)


# ---------------------------------------------------------------------------------------------
# Decoding and encoding
# ---------------------------------------------------------------------------------------------


def resize_max_side(image: np.ndarray, max_resolution: int) -> np.ndarray:
    """Shrinks ``[H, W, 3]`` so its longer side is at most `max_resolution` (never enlarges).

    The same arithmetic and INTER_AREA filter as ``ffcv.fields.rgb_image.resizer`` (but no side
    below 1 pixel, where FFCV's would fail), so FFCV's writer leaves an image resized here
    untouched.
    """
    size = np.array([image.shape[1], image.shape[0]])
    ratio = max_resolution / size.max()
    if ratio < 1:
        new_size = np.maximum((ratio * size).astype(int), 1)  # a 600x1 image: 256x1, not 256x0
        image = cv2.resize(image, tuple(new_size), interpolation=cv2.INTER_AREA)
    return image


def load_rgb(path: str | os.PathLike, max_resolution: int) -> np.ndarray:
    """Decodes an image once into RGB ``[H, W, 3]`` uint8 with longer side <= max_resolution.

    JPEGs large enough are decoded with PIL ``draft`` at the largest 1/2, 1/4 or 1/8 scale that
    keeps both sides at or above their final size, then area-resized: far fewer pixels decoded,
    no loss of detail at the stored resolution. CMYK, grayscale and palette images become RGB.
    """
    with open_source(path) as f, Image.open(f) as im:
        w, h = im.size
        scale = max_resolution / max(w, h)
        if scale < 1:
            im.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
        image = np.asarray(im.convert("RGB"))  # [H, W, 3]
    return resize_max_side(image, max_resolution)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG-encodes RGB ``[H, W, 3]`` exactly as FFCV's ``RGBImageField`` does (OpenCV)."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise ConversionError("OpenCV could not JPEG-encode an image")
    return buf.tobytes()


# ---------------------------------------------------------------------------------------------
# Outputs: temporary names, the manifest, the summary
# ---------------------------------------------------------------------------------------------


class Staging:
    """Files written under temporary names and renamed, in order, only once all are complete.

    Use as a context manager: on any error the temporary files are removed and no final name
    is touched. A SIGKILL leaves only ``*.tmp`` files, which `remove_stale_tmp` clears.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []

    def tmp(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        tmp.unlink(missing_ok=True)
        self.pending.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self.pending:
            os.replace(tmp, final)
        self.pending.clear()

    def abort(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending.clear()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


LOCK_NAME = ".convert.lock"
PROBE_PREFIX = ".write-probe-"


def cannot_write(folder: str | os.PathLike) -> str | None:
    """Why new files cannot be written in `folder`, or None.

    Where `folder` does not exist yet, its nearest existing parent must allow creating it.
    Checked by creating and removing a small file there: ``os.access`` is not reliable on
    every filesystem (a read-only mount, ACLs, root on NFS). The one check of an output folder
    before any work: the converters' and make_digits.py's ``--out``, and the folder of
    evaluate.py's and finetune.py's results file.
    """
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), None)
    if existing is None:
        return "cannot write there (no part of the path exists)"
    if os.path.islink(existing) and not os.path.exists(existing):
        return f"{existing} is a broken symbolic link (to {os.readlink(existing)})"
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=existing)
    except OSError as e:
        reason = e.strerror or str(e)
        if existing == folder:
            return f"cannot write there ({reason})"
        return f"cannot create it in {existing} ({reason})"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Holds an exclusive lock on the dataset folder for a whole conversion.

    Two converters writing one folder at once would clear each other's temporary files and
    race on the manifest; the second one fails at once instead. The OS drops the lock when the
    process dies, so a killed conversion never leaves the folder locked. A folder that cannot
    be written (a file, below a file, read-only) fails here, before any work; Ctrl-C inside
    is raised as `Interrupted`, naming `out`.
    """
    problem = cannot_write(out)
    if problem is not None:
        raise ConversionError(f"--out {out}: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_NAME, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConversionError(
                f"{out}: another conversion is writing this folder; wait for it to finish or "
                "pass another --out"
            ) from None
        try:
            yield
        except KeyboardInterrupt as e:
            if isinstance(e, Interrupted):
                raise
            raise Interrupted(out) from e


def remove_stale_tmp(out: Path) -> None:
    """Removes ``*.tmp`` files a killed conversion left behind."""
    for p in [*out.glob("*" + TMP_SUFFIX), *out.glob("shards/*" + TMP_SUFFIX)]:
        log.info("removing %s left by an interrupted conversion", p)
        p.unlink()


def check_existing(out: Path, source: SourceDataset, force: bool) -> Manifest | None:
    """Returns the manifest already in `out` if it describes the same samples.

    Raises:
        ManifestError: if it describes other samples (different classes, splits or file
            lists) and `force` is not set.
    """
    if not (out / MANIFEST_NAME).is_file():
        return None
    old = load_manifest(out)
    diff = describe_difference(old, source)
    if diff is None:
        return old
    if not force:
        raise ManifestError(
            f"{out / MANIFEST_NAME}: this folder holds a different dataset ({diff}); both "
            f"formats must share one sample list (same --src, --limit-per-class and "
            f"--skip-warned). Use --force to replace it, or another --out."
        )
    log.warning("--force: replacing %s (%s)", out / MANIFEST_NAME, diff)
    return None


def describe_difference(old: Manifest, source: SourceDataset) -> str | None:
    """Says how an existing manifest's samples differ from `source`, or None if they agree."""
    if old.classes != source.classes:
        return f"{len(old.classes)} classes there, {len(source.classes)} here"
    if set(old.splits) != set(source.splits):
        return f"splits {sorted(old.splits)} there, {sorted(source.splits)} here"
    for name, split in source.splits.items():
        if old.splits[name].fingerprint() != split.fingerprint():
            return (
                f"split {name!r} fingerprint differs: {old.splits[name].num_samples} samples "
                f"there, {split.num_samples} here"
            )
    return None


def write_outputs(
    out: Path,
    source: SourceDataset,
    fmt: str,
    section: dict,
    existing: Manifest | None,
    staging: Staging,
) -> Manifest:
    """Stages ``skipped.txt`` and ``warned.txt``, commits every staged file, then writes the
    manifest last.

    Keeps the other format's section when the existing manifest describes the same samples;
    otherwise (``--force``) deletes the files that section listed.
    """
    skipped = staging.tmp(out / SKIPPED_NAME)
    skipped.write_text("".join(f"{p}\t{r}\n" for p, r in source.skipped))
    warned = staging.tmp(out / WARNED_NAME)
    warned.write_text("".join(f"{p}\t{r}\n" for p, r in source.warned))

    formats: dict[str, dict] = {}
    if existing is not None:
        formats = {k: v for k, v in existing.formats.items() if k != fmt}
    elif (out / MANIFEST_NAME).is_file():
        # --force over another dataset: nothing here may look finished until the new manifest.
        for other, sec in load_manifest(out).formats.items():
            if other != fmt:
                for rel in sec.get("files", []):
                    (out / rel).unlink(missing_ok=True)
        (out / MANIFEST_NAME).unlink()
    staging.commit()
    # The byte size of every file, so a truncated or swapped copy is caught before training.
    sizes = {rel: (out / rel).stat().st_size for rel in section.get("files", [])}
    formats[fmt] = {**section, "sizes": sizes}
    manifest = Manifest(source.classes, source.splits, formats, str(source.src))
    manifest.save(out)
    return manifest


def file_bytes(out: Path, files: Iterable[str]) -> int:
    return sum((out / f).stat().st_size for f in files)


def summary_line(fmt: str, source: SourceDataset, num_bytes: int, seconds: float) -> str:
    n = source.num_samples
    kept = f" ({len(source.warned)} with libjpeg warnings, kept: {WARNED_NAME})"
    dropped = sum(reason.startswith(WARNING_SKIP) for _, reason in source.skipped)
    skipped = f" ({dropped} for libjpeg warnings)"
    return (
        f"{fmt}: {n} images{kept if source.warned else ''}, {len(source.classes)} classes, "
        f"{len(source.skipped)} skipped{skipped if dropped else ''}, "
        f"{num_bytes / 1e6:.1f} MB written, {seconds:.1f} s, {n / max(seconds, 1e-9):.0f} images/s"
    )


def progress(total: int, desc: str) -> tqdm:
    """A tqdm bar in images/s, shown only when stderr is a terminal."""
    return tqdm(total=total, desc=desc, unit="img", disable=not sys.stderr.isatty(), leave=False)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options both converters take, with the same defaults."""
    parser.add_argument("--src", required=True, type=Path, help="ImageFolder tree")
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    parser.add_argument(
        "--max-resolution",
        type=int,
        default=256,
        help="longer side stored, in pixels (default 256: see imagenet_to_ffcv.py)",
    )
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (90)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (all cores)"
    )
    parser.add_argument(
        "--limit-per-class",
        type=int,
        default=None,
        help="keep only the first N files of each class folder (before validation)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail at the first bad file (one libjpeg warns about included)",
    )
    parser.add_argument(
        "--skip-warned",
        action="store_true",
        help="skip JPEGs that decode with a libjpeg warning (corrupt data: grey or garbled "
        f"areas) instead of keeping them and listing them in {WARNED_NAME}",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace a folder holding a different dataset"
    )


def check_common_args(args: argparse.Namespace) -> None:
    if args.max_resolution < 1:
        raise SystemExit("--max-resolution must be a positive number of pixels")
    if not 1 <= args.jpeg_quality <= 100:
        raise SystemExit("--jpeg-quality must be in 1..100")
    if args.limit_per_class is not None and args.limit_per_class < 1:
        raise SystemExit("--limit-per-class must be at least 1")


def start(args: argparse.Namespace) -> tuple[SourceDataset, Manifest | None, float]:
    """Validates the tree and checks the output folder before anything is written."""
    t0 = time.perf_counter()
    source = prepare_source(
        args.src,
        limit_per_class=args.limit_per_class,
        workers=args.workers,
        strict=args.strict,
        skip_warned=args.skip_warned,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    existing = check_existing(args.out, source, args.force)
    remove_stale_tmp(args.out)
    log.debug("validated %d files in %.1f s", source.num_samples, time.perf_counter() - t0)
    return source, existing, t0


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def run_cli(main: Callable[[], object]) -> int:
    """Runs a converter's `main` as a program: bad input is one `error: ...` line, status 2;
    Ctrl-C is one line, status 130, and SIGTERM (a scheduler, `kill`) the same, status 143."""
    setup_logging()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main()
    except (ConversionError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated) or isinstance(e.__cause__, Terminated)
        what = "terminated (SIGTERM)" if term else "interrupted"
        out = getattr(e, "out", None)
        if out is not None:
            what += f"; nothing was finished in {out} (partial files are removed by the next run)"
        print(what, file=sys.stderr)
        return 143 if term else 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0
