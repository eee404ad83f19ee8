"""ImageFolder tree -> FFCV ``train.beton`` / ``val.beton`` plus the shared manifest.

    python convert/imagenet_to_ffcv.py --src /data/imagenet --out data/imagenet

Fields, in this order: ``image`` (RGBImageField), ``label`` (IntField), ``index`` (IntField,
the sample's index in the manifest's split).

Why ``--max-resolution 256``: SuNCEt/SimCLR crops are RandomResizedCrop at 224 with scale down
to 0.08 and multi-crop views at 96 with scale 0.05-0.14. A 0.08 crop of a 256-px image is about
72 px wide, upsampled to 224, and a 0.05 crop is about 57 px for a 96-px view, so little detail
is lost against the full-size original (~400-500 px), while JPEG decode cost grows with pixel
count and dominates the loader: 256 stores about a third of ImageNet's pixels. It is also the
resolution of the FFCV measurements in FEASIBILITY.md.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from multiprocessing import Process, Queue, Value
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # `python convert/imagenet_to_ffcv.py` puts convert/ first on sys.path; use the root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402

from convert import common  # noqa: E402
from convert.manifest import Manifest  # noqa: E402

log = logging.getLogger(__name__)

WRITE_MODES = ("jpg", "raw", "smart", "proportion")
MIN_PAGE_SIZE = 1 << 21


class SourceSplit:
    """One split as FFCV's indexed dataset: ``[i] -> (image [H, W, 3], label, i)``."""

    def __init__(self, source: common.SourceDataset, split: str, max_resolution: int) -> None:
        self.source, self.split, self.max_resolution = source, split, max_resolution
        self.labels = source.splits[split].labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        path = self.source.path(self.split, i)
        try:
            image = common.load_rgb(path, self.max_resolution)
        except Exception as e:
            raise common.ConversionError(f"{path}: failed to decode while writing ({e})") from e
        return image, self.labels[i], i


def _worker(work_fn, *args) -> None:
    """An FFCV writer worker: Ctrl-C (which a terminal sends to every process of the group) is
    left to the main process, which ends the workers; no traceback from each of them."""
    common._worker_init()
    work_fn(*args)


def _make_writer_class():
    """FFCV's DatasetWriter with a progress loop that notices a dead worker.

    FFCV 1.0.2 waits for its sample counter forever, so one worker that raises (a file changed
    since validation, a full disk) hangs the conversion. This copy of ``_write_common`` fails
    instead, and always frees the shared metadata memory.
    """
    import torch

    threads = torch.get_num_threads()
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    torch.set_num_threads(threads)  # FFCV's compiler module sets it to 1 for the process

    class Writer(DatasetWriter):
        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            try:
                self._run_workers(queue_content, work_fn, extra_worker_args, MemoryAllocator)
            finally:
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        def _run_workers(self, queue_content, work_fn, extra_worker_args, allocator_cls):
            workqueue: Queue = Queue()
            for todo in queue_content:
                workqueue.put(todo)
            for _ in range(self.num_workers):
                workqueue.put(None)
            allocations_queue: Queue = Queue()
            done = Value(ctypes.c_uint64, 0)
            allocator = allocator_cls(self.fname, self.data_region_start, self.page_size)
            args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator)
            args += (done, allocations_queue, *extra_worker_args)
            procs = [
                Process(target=_worker, args=(work_fn, *args)) for _ in range(self.num_workers)
            ]
            for p in procs:
                p.start()
            try:
                self._wait(procs, done, allocations_queue)
            finally:
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                    p.join()

        def _wait(self, procs, done, allocations_queue):
            bar = common.progress(self.num_samples, Path(self.fname).name.removesuffix(".tmp"))
            seen = 0
            allocations: list = []
            while len(allocations) < len(procs):
                if seen < self.num_samples:
                    now = done.value
                    bar.update(now - seen)
                    seen = now
                while not allocations_queue.empty():
                    allocations.append(allocations_queue.get())
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise common.ConversionError(
                        f"an FFCV writer worker failed (exit code {dead[0]}); "
                        f"its traceback is printed above"
                    )
                time.sleep(0.05)
            bar.close()
            self.finalize([a for worker in allocations for a in worker])

    return Writer


def ffcv_fields(args: argparse.Namespace) -> dict:
    from ffcv.fields import IntField, RGBImageField

    image = RGBImageField(
        write_mode=args.write_mode,
        max_resolution=args.max_resolution,
        smart_threshold=args.smart_threshold,
        jpeg_quality=args.jpeg_quality,
        compress_probability=args.compress_probability,
    )
    return {"image": image, "label": IntField(), "index": IntField()}


def page_size_for(max_resolution: int, num_samples: int) -> int:
    """FFCV's default 8 MiB page, 2 MiB for small splits, or a power of two holding a raw image.

    Each writer worker fills its own pages, so a split costs at least a page per worker: 8 MiB
    pages would turn 600 CIFAR images (~0.6 MB) into a 20 MB file.
    """
    raw = 3 * max_resolution**2 + 4096
    size = MIN_PAGE_SIZE if num_samples * raw < 256 * 2**20 else 4 * MIN_PAGE_SIZE
    while size < raw:
        size *= 2
    return size


def write_split(
    source: common.SourceDataset, split: str, path: Path, args: argparse.Namespace
) -> None:
    """Writes one split's .beton at `path` (a temporary name)."""
    writer = _make_writer_class()(
        str(path),
        ffcv_fields(args),
        page_size=page_size_for(args.max_resolution, source.splits[split].num_samples),
        num_workers=max(1, args.workers),
    )
    dataset = SourceSplit(source, split, args.max_resolution)
    writer.from_indexed_dataset(dataset, chunksize=args.chunk_size)


def convert(args: argparse.Namespace) -> Manifest:
    """Validates, writes every split under temporary names, renames, then writes the manifest."""
    _make_writer_class()  # import FFCV (~10 s of numba set-up) before the clock starts
    source, existing, t0 = common.start(args)
    out: Path = args.out
    files = {split: f"{split}.beton" for split in source.splits}

    with common.Staging() as staging:
        for split, name in files.items():
            t = time.perf_counter()
            write_split(source, split, staging.tmp(out / name), args)
            log.debug("wrote %s in %.1f s", name, time.perf_counter() - t)
        section = {
            "files": sorted(files.values()),
            "betons": files,
            "fields": {"image": "RGBImageField", "label": "IntField", "index": "IntField"},
            "write_mode": args.write_mode,
            "max_resolution": args.max_resolution,
            "jpeg_quality": args.jpeg_quality,
            "smart_threshold": args.smart_threshold,
            "compress_probability": args.compress_probability,
            "page_size": {
                split: page_size_for(args.max_resolution, info.num_samples)
                for split, info in source.splits.items()
            },
            "limit_per_class": args.limit_per_class,
            "skipped": len(source.skipped),
            "warned": len(source.warned),
            "skip_warned": args.skip_warned,
        }
        manifest = common.write_outputs(out, source, "ffcv", section, existing, staging)

    seconds = time.perf_counter() - t0
    nbytes = common.file_bytes(out, files.values())
    log.info(common.summary_line("ffcv", source, nbytes, seconds))
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument(
        "--write-mode",
        choices=WRITE_MODES,
        default="jpg",
        help="jpg (default): JPEG at --jpeg-quality; raw: pixels (bigger, ~2x faster to read); "
        "smart: raw unless the raw image exceeds --smart-threshold bytes; "
        "proportion: JPEG with probability --compress-probability",
    )
    parser.add_argument(
        "--smart-threshold",
        type=int,
        default=None,
        help="smart mode: raw-size threshold in bytes (default: 3*R*R/2, R=max-resolution)",
    )
    parser.add_argument("--compress-probability", type=float, default=0.5)
    parser.add_argument("--chunk-size", type=int, default=100, help="samples per worker task")
    args = parser.parse_args(argv)
    common.check_common_args(args)
    if args.write_mode == "smart" and args.smart_threshold is None:
        # FFCV 1.0.2 stores every image raw in smart mode when no threshold is given.
        args.smart_threshold = 3 * args.max_resolution**2 // 2
    return args


def main(argv: list[str] | None = None) -> Manifest:
    """Command-line entry point; returns the manifest written."""
    args = parse_args(argv)
    with common.output_lock(args.out):
        return convert(args)


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
