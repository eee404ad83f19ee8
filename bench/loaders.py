"""Loader benchmark: source images/s of five loaders, side by side, on the same stored JPEGs.

    python bench/loaders.py --images imagenet|cifar [--quick] [--rounds N] [--json FILE]

One process times, in interleaved rounds (medians, the order rotated each round):
  (a) a torchvision/PIL DataLoader (2 workers) with the same multi-crop augmentation, reading
      the JPEG bytes stored in the DALI shards (bench/baseline_torchvision.py);
  (b) FFCV with one pipeline per view (a RandomResizedCropRGBImageDecoder each: a decode
      per view);
  (c) this project's FFCVPipeline (one decode per image, every crop cut from it);
  (d) this project's DALIPipeline (CPU-only mode on a machine without a GPU);
  (e) decode only: the same FFCV decoder as (c) decoding each JPEG and writing nothing but the
      sample index (the limit of any loader reading these files).
"Host-side" is what a GPU run leaves on the CPU: for (b) decode and crops, without the
colour/grayscale/blur/normalize that then run on the device; for (c) decode and the crop
boxes (a GPU run cuts the views on the device, `--crops auto`), and, in a row of its own,
decode and crops as with `--crops host`; for (a) everything (PIL does it all on the host);
for (d) nothing on a GPU (decode is `mixed`), so its CPU-only figure is shown in both rows.
"Everything on the CPU" is a CPU-only run: (b) and (c) then also run the project's torch
augmentation (pipelines.augment) on the CPU, (c) with its workers cutting the views. Also
measured: the time to first batch of (c) from launching a fresh process (imports included;
the median of three launches, with an empty numba cache and with a warm one), and what the
labeled stream adds to data time for (c) and (d).

Ratios of two loaders measured back to back in each round ((c) vs (e), each row with the
labeled stream vs the same row without) are medians of the per-round ratios, with their
range, so that the machine's drift between rounds cancels.

Rate of one measurement: each epoch restarts the loader; its first `--warm` batches (thread or
worker start, pipeline fill) are not timed; the rest are, until `--seconds` have been timed
in total. The data (1,000 ImageNet JPEGs, or a 500-per-class CIFAR-10 subset) is unpacked
from ../shared/data and converted with convert/ at the default max side 256 into a scratch
folder (default /tmp/suncet-bench) once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

if __name__ == "__main__":
    # `python bench/loaders.py` puts bench/ first on sys.path; use the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SUNCET_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Per image set: preset, archive, folder inside it, files kept per class, and the bench's
# batch sizes (half the preset's per-rank batch, with the labeled batch C x K scaled alike, so
# the labeled stream's share is the preset's: imagenet 64 vs 20x2, cifar 512 vs 10x8).
IMAGE_SETS = {
    "imagenet": dict(
        preset="configs/imagenet.toml", archive="imagenet-sample.tar",
        tree="imagenet-sample", per_class=0, batch=32, C=10, K=2,
    ),
    "cifar": dict(
        preset="configs/cifar10.toml", archive="cifar10-jpeg.tar.gz",
        tree="cifar10", per_class=500, batch=256, C=10, K=4,
    ),
}  # fmt: skip
WORKERS = 2

# Goals of issue 3 (ratios measured side by side, and two absolute limits).
GOAL_HOST_VS_TV = 10.0
GOAL_HOST_VS_DECODE = 0.7
GOAL_CPU_VS_TV = 1.5
GOAL_FIRST_BATCH_S = 12.0
GOAL_LABELED_SHARE = 0.10


# ---------------------------------------------------------------------------------- data


def prepare_data(images: str, scratch: Path) -> Path:
    """The converted dataset folder (FFCV + DALI formats), made once in `scratch`."""
    spec = IMAGE_SETS[images]
    out = scratch / f"{images}-data"
    manifest = out / "manifest.json"
    if manifest.is_file() and "dali" in json.loads(manifest.read_text()).get("formats", {}):
        return out
    archive = SHARED_DATA / spec["archive"]
    if not archive.is_file():
        raise SystemExit(f"{archive}: not found (see ../shared/data/README.md)")
    tree = scratch / "src" / spec["tree"]
    if not tree.is_dir():
        log(f"unpacking {archive} ...")
        with tarfile.open(archive) as tar:
            tar.extractall(scratch / "src", filter="data")
    source = tree  # converted splits: train/ (and val/ where present)
    extra = ["--limit-per-class", str(spec["per_class"])] if spec["per_class"] else []
    for tool in ("imagenet_to_ffcv.py", "imagenet_to_dali.py"):
        log(f"converting with convert/{tool} ...")
        cmd = [sys.executable, str(ROOT / "convert" / tool), "--src", str(source)]
        subprocess.run([*cmd, "--out", str(out), *extra], check=True, cwd=ROOT)
    return out


def bench_configs(images: str):
    """(DataConfig, AugConfig) of the preset with the bench's batch sizes and 2 workers."""
    from runner.config import load_preset

    spec = IMAGE_SETS[images]
    cfg = load_preset(ROOT / spec["preset"])
    data = replace(
        cfg.data,
        batch_size=spec["batch"],
        classes_per_batch=spec["C"],
        images_per_class=spec["K"],
        num_workers=WORKERS,
    )
    return data, cfg.aug


# ------------------------------------------------------------------------------- sources


class Source:
    """One loader under test: `epoch()` starts an epoch and yields source images per batch."""

    name = ""

    def epoch(self) -> Iterator[int]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TorchvisionSource(Source):
    """(a): PIL decode and every view's augmentation in 2 worker processes."""

    def __init__(self, data_dir: Path, data, aug):
        from bench.baseline_torchvision import make_loader

        self.loader = make_loader(str(data_dir), aug, data.batch_size, WORKERS, persistent=False)
        self.epochs = 0

    def epoch(self) -> Iterator[int]:
        self.loader.generator.manual_seed(self.epochs)
        self.epochs += 1
        for views, _, _ in self.loader:
            yield views[0].shape[0]


class FFCVPerViewSource(Source):
    """(b): stock FFCV, one image pipeline (and one JPEG decode) per view."""

    def __init__(self, data_dir: Path, data, aug, on_cpu: bool):
        # First: importing FFCV sets torch's thread count to 1 for the whole process
        # (ffcv/pipeline/compiler.py at import); pipelines.ffcv_ops imports it and restores it.
        from pipelines.ffcv_ops import leave_torch_threads_alone  # isort: skip

        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToTensor

        leave_torch_threads_alone()
        self.sizes = [aug.large_size] * aug.n_large + [aug.small_size] * aug.n_small
        scales = [aug.large_scale] * aug.n_large + [aug.small_scale] * aug.n_small
        pipelines = {"image": None, "label": None, "index": None}
        for v, (size, scale) in enumerate(zip(self.sizes, scales, strict=True)):
            decoder = RandomResizedCropRGBImageDecoder((size, size), scale=scale)
            pipelines[f"view{v}"] = PipelineSpec("image", decoder=decoder, transforms=[ToTensor()])
        self.loader = Loader(
            str(data_dir / "train.beton"),
            batch_size=data.batch_size,
            num_workers=WORKERS,
            order=OrderOption.RANDOM,
            pipelines=pipelines,
            drop_last=True,
            seed=0,
        )
        self.augment = DeviceAugOnCPU(aug) if on_cpu else None

    def epoch(self) -> Iterator[int]:
        for views in self.loader:
            if self.augment is not None:
                self.augment(list(views), self.sizes)
            yield views[0].shape[0]


class DeviceAugOnCPU:
    """The project's batched view augmentation (pipelines.augment), run on the CPU."""

    def __init__(self, aug):
        from pipelines.augment import ViewAug, seed_generator

        common = dict(color_strength=aug.color_strength, color_p=aug.color_p, gray_p=aug.gray_p)
        self.large = ViewAug(**common, blur_p=aug.blur_p_large, blur_sigma=aug.blur_sigma)
        self.small = ViewAug(**common, blur_p=aug.blur_p_small, blur_sigma=aug.blur_sigma)
        self.large_size, self.aug = aug.large_size, aug
        self.g = seed_generator("cpu", 0)

    def __call__(self, views: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
        from pipelines.augment import augment_views

        out = []
        for size in dict.fromkeys(sizes):  # one batched call per crop size, as FFCVPipeline
            group = torch.cat([v for v, s in zip(views, sizes, strict=True) if s == size])
            view_aug = self.large if size == self.large_size else self.small
            out.append(augment_views(group, view_aug, self.g, self.aug.mean, self.aug.std))
        return out  # per size: [n*B, 3, S, S]


class ProjectFFCVHostSource(Source):
    """(c) host-side / (e): FFCVPipeline's own loaders, their uint8 rows, no device work.

    crops: where the views are cut ("device": a GPU run's host work; "host": the workers');
    decode_only: (e), the unlabeled loader's decoder replaced by a decode-only one.
    """

    def __init__(
        self, data_dir: Path, data, aug, labeled: np.ndarray, crops: str, decode_only=False
    ):
        from pipelines.ffcv_ops import MultiCropDecoder
        from pipelines.ffcv_pipeline import FFCVPipeline

        data = replace(data, crops=crops)
        self.pipe = p = FFCVPipeline(str(data_dir), data, aug, labeled, device="cpu")
        if decode_only:
            p.unlabeled_decoder = MultiCropDecoder([], cut="decode")
            p.unlabeled_loader = p._loader(
                p.unlabeled_decoder, data.batch_size, p.unlabeled_order, data.drop_last
            )
        self.epochs = 0

    def epoch(self) -> Iterator[int]:
        # FFCVPipeline.host_batches: the decoders' uint8 rows of both streams, no device work.
        p = self.pipe
        p.set_epoch(self.epochs)
        self.epochs += 1
        steps = p.host_batches()
        try:
            for rows, _ in steps:
                yield rows.shape[0]
        finally:
            steps.close()

    def close(self) -> None:
        self.pipe.close()


class PipelineSource(Source):
    """(c) everything on the CPU, (d): a project pipeline iterated as the trainer does."""

    def __init__(self, backend: str, data_dir: Path, data, aug, labeled: np.ndarray):
        from pipelines.build import build_pipeline

        self.pipe = build_pipeline(backend, str(data_dir), data, aug, labeled, device="cpu")
        self.epochs = 0

    def epoch(self) -> Iterator[int]:
        self.pipe.set_epoch(self.epochs)
        self.epochs += 1
        for batch in self.pipe:
            yield batch.batch_size

    def close(self) -> None:
        self.pipe.close()


# ---------------------------------------------------------------------------- measuring


def measure(source: Source, seconds: float, warm: int) -> float:
    """Steady-state source images/s: epochs restart; their first `warm` batches are untimed.

    Every source runs with torch's `WORKERS` threads (the torch augmentation of (b) and (c)
    on the CPU uses them): a source that changed the count for the process stops the bench.
    """
    if torch.get_num_threads() != WORKERS:
        raise RuntimeError(
            f"{source.name}: torch runs {torch.get_num_threads()} thread(s), not {WORKERS}; "
            "something changed the process's count (FFCV does at import)"
        )
    images, timed = 0, 0.0
    while timed < seconds:
        it = source.epoch()
        start = stop = None
        n = 0
        try:
            for k, count in enumerate(it):
                now = time.perf_counter()
                if k < warm:
                    start = now
                    continue
                n, stop = n + count, now
                if timed + (stop - start) >= seconds:
                    break
        finally:
            it.close()
        if stop is None:
            raise RuntimeError(f"{source.name}: an epoch has no more than {warm} batches")
        images, timed = images + n, timed + (stop - start)
    gc.collect()  # frees the epoch's threads, workers and DALI pipelines before the next
    return images / timed


@dataclass
class Row:
    key: str
    label: str
    rates: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def run_rounds(
    sources: dict[str, tuple[str, Callable[[], Source]]], rounds: int, seconds: float, warm: int
) -> dict[str, Row]:
    """Builds every source, warms it (compiles), then times them in rotated rounds."""
    built: dict[str, Source] = {}
    rows = {}
    for key, (label, make) in sources.items():
        t = time.perf_counter()
        src = make()
        src.name = key
        it = src.epoch()
        next(it)  # FFCV compiles its pipelines here
        it.close()
        gc.collect()
        built[key] = src
        rows[key] = Row(key, label, [])
        log(f"  ready {key}: {time.perf_counter() - t:.1f} s to the first batch")
    keys = list(built)
    for r in range(rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for key in order:
            rate = measure(built[key], seconds, warm)
            rows[key].rates.append(rate)
            log(f"  round {r + 1}/{rounds} {key}: {rate:.1f} img/s")
    for src in built.values():
        src.close()
    return rows


def first_batch_seconds(data_dir: Path, images: str, cache_dir: Path, crops: str) -> float:
    """Seconds from launching a fresh process (imports included) to (c)'s first batch."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    launched = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--first-batch-child", str(data_dir)]
    out = subprocess.run(
        [*cmd, "--images", images, "--crops", crops, "--launched", repr(launched)],
        env=env, cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("first-batch ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"first-batch child failed:\n{out.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def first_batch_child(data_dir: str, images: str, crops: str, launched: float) -> None:
    """Runs in the fresh process: a training-shaped FFCVPipeline (labeled stream on), its
    views cut by the workers (`crops` "host") or by torch (`crops` "device", here on the CPU);
    torchvision is imported first, as train.py's model imports it."""
    import torchvision  # noqa: F401

    from pipelines.ffcv_pipeline import FFCVPipeline

    data, aug = bench_configs(images)
    data = replace(data, crops=crops)
    labeled = np.arange(len(json.loads((Path(data_dir) / "manifest.json").read_text())
                            ["splits"]["train"]["labels"]))  # fmt: skip
    pipe = FFCVPipeline(data_dir, data, aug, labeled, device="cpu")
    next(iter(pipe))
    print(f"first-batch {time.time() - launched:.3f}", flush=True)
    os._exit(0)  # skip FFCV's thread teardown (and its harmless numba KeyError)


# ------------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def paired(rows: dict[str, Row], num: str, den: str) -> tuple[float, float, float]:
    """Median, min and max over the rounds of rate(num) / rate(den), each round's two measured
    back to back (adjacent in `sources_for`), so that the machine's drift between rounds
    cancels."""
    per_round = [ratio(a, b) for a, b in zip(rows[num].rates, rows[den].rates, strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round)


def build_report(rows: dict[str, Row], first: dict[str, float], quick: bool) -> list[dict]:
    """The table's lines: measurement, median img/s, range, ratio, goal, met."""
    med = {k: r.median for k, r in rows.items()}
    out = []

    def add(label, value=None, rng=None, ratio_text="", goal="", met=None):
        out.append(dict(label=label, value=value, range=rng, ratio=ratio_text, goal=goal, met=met))

    def rate_line(key, ratio_text="", goal="", met=None, label=None):
        r = rows[key]
        add(label or r.label, r.median, (min(r.rates), max(r.rates)), ratio_text, goal, met)

    tv = med["a"]
    rate_line("a")
    for key in ("b_host", "b_cpu"):
        if key in rows:
            rate_line(key, f"{ratio(med[key], tv):.2f}x (a)")
    c_tv = ratio(med["c_host"], tv)
    rate_line("c_host", f"{c_tv:.2f}x (a)", f">= {GOAL_HOST_VS_TV:g}x (a)", c_tv >= GOAL_HOST_VS_TV)
    c_dec, lo, hi = paired(rows, "c_host", "e")
    add(
        "(c) host-side vs decode only", None, None, f"{c_dec:.2f}x (e) (rounds {lo:.2f}-{hi:.2f})",
        f">= {GOAL_HOST_VS_DECODE:g}x (e)", c_dec >= GOAL_HOST_VS_DECODE,
    )  # fmt: skip
    w_dec, lo, hi = paired(rows, "c_workers", "e")
    rate_line("c_workers", f"{w_dec:.2f}x (e) (rounds {lo:.2f}-{hi:.2f})")
    for key in ("c_cpu", "d"):
        x = ratio(med[key], tv)
        rate_line(key, f"{x:.2f}x (a)", f">= {GOAL_CPU_VS_TV:g}x (a)", x >= GOAL_CPU_VS_TV)
    rate_line("e", f"{ratio(med['e'], tv):.2f}x (a)")
    for name, launches in first.items():
        seconds = statistics.median(launches)
        text = f"{seconds:.1f} s" + (
            f" (launches {min(launches):.1f}-{max(launches):.1f} s)" if len(launches) > 1 else ""
        )
        add(name, None, None, text, f"<= {GOAL_FIRST_BATCH_S:g} s", seconds <= GOAL_FIRST_BATCH_S)
    for base, with_lab in (("c_host", "c_host_lab"), ("c_cpu", "c_cpu_lab"), ("d", "d_lab")):
        if with_lab in rows:
            share, lo, hi = (100 * (x - 1) for x in paired(rows, base, with_lab))  # extra time
            rate_line(
                with_lab, f"{share:+.0f}% data time (rounds {lo:+.0f}..{hi:+.0f}%)",
                f"<= +{100 * GOAL_LABELED_SHARE:g}%", share <= 100 * GOAL_LABELED_SHARE,
            )  # fmt: skip
    return out


def format_table(lines: list[dict]) -> str:
    """Markdown: measurement | img/s (median) | range | ratio | goal | met."""
    head = "| measurement | img/s (median) | min-max | ratio | goal | met |\n"
    head += "|---|---:|---:|---:|---|---|"
    body = []
    for ln in lines:
        value = "" if ln["value"] is None else f"{ln['value']:,.0f}"
        rng = "" if ln["range"] is None else f"{ln['range'][0]:,.0f}-{ln['range'][1]:,.0f}"
        met = "" if ln["met"] is None else ("yes" if ln["met"] else "**no**")
        body.append(f"| {ln['label']} | {value} | {rng} | {ln['ratio']} | {ln['goal']} | {met} |")
    return "\n".join([head, *body])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------- main


def sources_for(data_dir: Path, images: str, quick: bool) -> dict:
    data, aug = bench_configs(images)
    n = len(json.loads((data_dir / "manifest.json").read_text())["splits"]["train"]["labels"])
    none, every = np.empty(0, dtype=np.int64), np.arange(n)
    s = {
        "a": ("(a) torchvision/PIL DataLoader, 2 workers (host = everything)",
              lambda: TorchvisionSource(data_dir, data, aug)),
        "b_host": ("(b) FFCV, a decoder per view: host-side",
                   lambda: FFCVPerViewSource(data_dir, data, aug, on_cpu=False)),
        "b_cpu": ("(b) FFCV, a decoder per view: everything on CPU",
                  lambda: FFCVPerViewSource(data_dir, data, aug, on_cpu=True)),
        "c_workers": ("(c) host-side with --crops host (decode + crops by the workers)",
                      lambda: ProjectFFCVHostSource(data_dir, data, aug, none, "host")),
        "e": ("(e) decode only (FFCV's JPEG decode, nothing else)",
              lambda: ProjectFFCVHostSource(data_dir, data, aug, none, "device", True)),
        "c_host": ("(c) FFCVPipeline: host-side of a GPU run (decode; views cut on the GPU)",
                   lambda: ProjectFFCVHostSource(data_dir, data, aug, none, "device")),
        "c_host_lab": ("(c) host-side of a GPU run + labeled stream",
                       lambda: ProjectFFCVHostSource(data_dir, data, aug, every, "device")),
        "c_cpu": ("(c) FFCVPipeline: everything on CPU",
                  lambda: PipelineSource("ffcv", data_dir, data, aug, none)),
        "c_cpu_lab": ("(c) everything on CPU + labeled stream",
                      lambda: PipelineSource("ffcv", data_dir, data, aug, every)),
        "d": ("(d) DALIPipeline, CPU-only (= host-side here; on a GPU the host does ~nothing)",
              lambda: PipelineSource("dali", data_dir, data, aug, none)),
        "d_lab": ("(d) CPU-only + labeled stream",
                  lambda: PipelineSource("dali", data_dir, data, aug, every)),
    }  # fmt: skip
    if quick:  # (b) compiles eight FFCV pipelines (about a minute)
        for key in ("b_host", "b_cpu"):
            del s[key]
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", choices=sorted(IMAGE_SETS), default="imagenet")
    p.add_argument("--quick", action="store_true", help="1 round, short windows, no (b)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 8; --quick 1)")
    p.add_argument("--seconds", type=float, help="timed seconds per measurement (default 3)")
    p.add_argument("--warm", type=int, default=2, help="untimed batches per epoch")
    p.add_argument("--scratch", default=os.environ.get("SUNCET_BENCH_DIR", "/tmp/suncet-bench"))
    p.add_argument("--json", help="results file (default SCRATCH/loaders-IMAGES.json)")
    p.add_argument("--first-batch-child", help=argparse.SUPPRESS)
    p.add_argument("--crops", default="host", help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.first_batch_child:
        first_batch_child(args.first_batch_child, args.images, args.crops, args.launched)
        return 0

    t0 = time.perf_counter()
    rounds = args.rounds or (1 if args.quick else 8)
    seconds = args.seconds or 3.0
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(args.images, scratch)
    torch.set_num_threads(WORKERS)

    # 1. Time to first batch of (c) in fresh processes: an empty kernel cache, then a warm one.
    # Medians of `launches` fresh processes each (each empty-cache one with a cache of its own).
    first, launches = {}, 1 if args.quick else 3
    for crops, how in (("host", "views cut by the workers"), ("device", "views cut by torch")):
        empty, cached = [], []
        for _ in range(launches):
            with tempfile.TemporaryDirectory(dir=scratch) as cache:
                empty.append(first_batch_seconds(data_dir, args.images, Path(cache), crops))
                cached.append(first_batch_seconds(data_dir, args.images, Path(cache), crops))
        if not args.quick:
            first[f"(c) first batch, {how}: fresh process, empty numba cache"] = empty
        first[f"(c) first batch, {how}: fresh process, cached kernels"] = cached
    log(f"first batch (s): {first}")

    # 2. Every loader, interleaved rounds.
    rows = run_rounds(sources_for(data_dir, args.images, args.quick), rounds, seconds, args.warm)
    lines = build_report(rows, first, args.quick)

    data, aug = bench_configs(args.images)
    views = f"{aug.n_large}x{aug.large_size} + {aug.n_small}x{aug.small_size}"
    title = (
        f"### Loaders, {args.images} ({data_dir.name}): batch {data.batch_size}, views {views}, "
        f"labeled {data.classes_per_batch}x{data.images_per_class}, {WORKERS} workers, "
        f"{os.cpu_count()} cores; median of {rounds} interleaved round(s), {seconds:g} s each"
    )
    table = format_table(lines)
    print(f"{title}\n\n{table}\n")
    result = dict(
        images=args.images, data=str(data_dir), batch_size=data.batch_size,
        labeled=[data.classes_per_batch, data.images_per_class], views=views,
        workers=WORKERS, cores=os.cpu_count(), rounds=rounds, seconds=seconds, warm=args.warm,
        rates={k: dict(label=r.label, median=r.median, all=r.rates) for k, r in rows.items()},
        first_batch_s=first, table=lines, wall_s=time.perf_counter() - t0,
    )  # fmt: skip
    path = Path(args.json or scratch / f"loaders-{args.images}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
