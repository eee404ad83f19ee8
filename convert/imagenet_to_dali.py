"""ImageFolder tree -> WebDataset tar shards for DALI plus the shared manifest.

    python convert/imagenet_to_dali.py --src /data/imagenet --out data/imagenet

Writes, per split, ``OUT/shards/<split>-00000.tar ...`` with members ``<index:09d>.jpg`` (the
image re-encoded at the same --max-resolution and --jpeg-quality as the FFCV converter, with
the same code, so both formats hold the same pixels), ``<index:09d>.cls`` (the label, ASCII)
and ``<index:09d>.idx`` (the sample index, ASCII); ``<split>-00000.idx`` beside each shard
(DALI's index for ``fn.readers.webdataset``, made by DALI's own ``wds2idx``); and
``<split>-offsets.npy``, ``[N, 3]`` int64: shard number, byte offset and byte size of each
sample's .jpg inside its tar, for readers that fetch samples by index (the labeled stream).

Sample ``i`` sits in shard ``i // shard_size``, so ranks can read disjoint shards.
"""

from __future__ import annotations

import io
import logging
import sys
import tarfile
import time
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # `python convert/imagenet_to_dali.py` puts convert/ first on sys.path; use the root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402

import numpy as np  # noqa: E402
from wds2idx import IndexCreator  # noqa: E402  (DALI's wds2idx, installed as a module)

from convert import common  # noqa: E402
from convert.manifest import Manifest  # noqa: E402

log = logging.getLogger(__name__)

SHARD_DIR = "shards"
MEMBERS = ("jpg", "cls", "idx")
# What forked encoder processes read: (source, split, max_resolution, jpeg_quality).
_JOB: tuple | None = None


def _encode_sample(i: int) -> bytes:
    source, split, max_resolution, quality = _JOB
    path = source.path(split, i)
    try:
        return common.encode_jpeg(common.load_rgb(path, max_resolution), quality)
    except Exception as e:
        raise common.ConversionError(f"{path}: failed to decode while writing ({e})") from e


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Appends one file; returns the byte offset of its data in the tar."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
    padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return tar.offset - padded


def shard_name(split: str, shard: int) -> str:
    return f"{SHARD_DIR}/{split}-{shard:05d}.tar"


def write_split(
    source: common.SourceDataset,
    split: str,
    out: Path,
    args: argparse.Namespace,
    staging: common.Staging,
) -> dict:
    """Writes one split's shards, index files and offsets under temporary names."""
    global _JOB
    n = source.splits[split].num_samples
    labels = source.splits[split].labels
    offsets = np.zeros((n, 3), dtype=np.int64)  # [N, 3] shard, offset, size
    shards = [shard_name(split, k) for k in range(-(-n // args.shard_size))]

    _JOB = (source, split, args.max_resolution, args.jpeg_quality)
    encoded = common.parallel_map(_encode_sample, list(range(n)), args.workers, f"{split} shards")
    tar = None
    try:
        for i, jpg in enumerate(encoded):
            shard = i // args.shard_size
            if i % args.shard_size == 0:
                if tar is not None:
                    tar.close()
                tmp = staging.tmp(out / shards[shard])
                tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
            offsets[i] = (shard, _add_member(tar, f"{i:09d}.jpg", jpg), len(jpg))
            _add_member(tar, f"{i:09d}.cls", str(labels[i]).encode())
            _add_member(tar, f"{i:09d}.idx", str(i).encode())
    finally:
        if tar is not None:
            tar.close()
        _JOB = None

    index_files = [s.removesuffix(".tar") + ".idx" for s in shards]
    for shard, index in zip(shards, index_files, strict=True):
        tmp_tar = out / (shard + common.TMP_SUFFIX)
        with IndexCreator(str(tmp_tar), str(staging.tmp(out / index)), verbose=False) as ic:
            ic.create_index()

    offsets_name = f"{SHARD_DIR}/{split}-offsets.npy"
    with open(staging.tmp(out / offsets_name), "wb") as f:
        np.save(f, offsets)
    counts = [min(args.shard_size, n - k * args.shard_size) for k in range(len(shards))]
    return {"shards": shards, "index_files": index_files, "offsets": offsets_name, "counts": counts}


def remove_stale_shards(out: Path, keep: list[str]) -> None:
    """Deletes shards and index files an earlier conversion left that this one did not write."""
    keep_set = set(keep)
    for p in sorted((out / SHARD_DIR).glob("*")):
        rel = f"{SHARD_DIR}/{p.name}"
        if p.suffix in (".tar", ".idx", ".npy") and rel not in keep_set:
            log.info("removing stale %s", rel)
            p.unlink()


def convert(args: argparse.Namespace) -> Manifest:
    """Validates, writes every split under temporary names, renames, then writes the manifest."""
    source, existing, t0 = common.start(args)
    out: Path = args.out
    (out / SHARD_DIR).mkdir(exist_ok=True)

    with common.Staging() as staging:
        written = {split: write_split(source, split, out, args, staging) for split in source.splits}
        files = sorted(
            f for w in written.values() for f in (*w["shards"], *w["index_files"], w["offsets"])
        )
        section = {
            "files": files,
            "shards": {s: w["shards"] for s, w in written.items()},
            "index_files": {s: w["index_files"] for s, w in written.items()},
            "offsets": {s: w["offsets"] for s, w in written.items()},
            "shard_counts": {s: w["counts"] for s, w in written.items()},
            "shard_size": args.shard_size,
            "members": list(MEMBERS),
            "max_resolution": args.max_resolution,
            "jpeg_quality": args.jpeg_quality,
            "limit_per_class": args.limit_per_class,
            "skipped": len(source.skipped),
            "warned": len(source.warned),
            "skip_warned": args.skip_warned,
        }
        manifest = common.write_outputs(out, source, "dali", section, existing, staging)
    remove_stale_shards(out, files)

    seconds = time.perf_counter() - t0
    nbytes = common.file_bytes(out, files)
    log.info(common.summary_line("dali", source, nbytes, seconds))
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        help="samples per shard (default 1000: ~15-25 MB shards at 256 px, 1,282 for ImageNet)",
    )
    args = parser.parse_args(argv)
    common.check_common_args(args)
    if args.shard_size < 1:
        raise SystemExit("--shard-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> Manifest:
    """Command-line entry point; returns the manifest written."""
    args = parse_args(argv)
    with common.output_lock(args.out):
        return convert(args)


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
