"""The embedded demo data: scikit-learn's bundled handwritten digits as an ImageFolder tree.

    python convert/make_digits.py --out data/digits-tree

Writes ``OUT/train/<digit>/<n:04d>.png`` and ``OUT/val/<digit>/<n:04d>.png`` (``n`` is the
image's index in ``sklearn.datasets.load_digits``; no download): 1,797 8x8 images with 17 grey
levels, upsampled to 32x32 RGB, split 80/20 within each class by a fixed seed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # `python convert/make_digits.py` puts convert/ first on sys.path; use the root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from convert import common  # noqa: E402

log = logging.getLogger(__name__)

MARKER = ".make_digits"  # marks a tree this script wrote, so it may replace it


def assign_splits(target: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """ "train" or "val" per image: a seeded `val_fraction` of each class goes to val."""
    rng = np.random.default_rng(seed)
    out = ["train"] * len(target)
    for c in np.unique(target):
        members = np.flatnonzero(target == c)
        for n in rng.permutation(members)[: round(val_fraction * len(members))]:
            out[n] = "val"
    return out


def write_digits(out: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Writes the tree (replacing one this function wrote before); returns `out`."""
    out = Path(out)
    if out.exists():
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} exists and was not written by make_digits.py")
        shutil.rmtree(out)
    from sklearn.datasets import load_digits  # ~2 s import, only when needed

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)  # [N, 8, 8], ink is bright
    splits = assign_splits(digits.target, val_fraction, seed)
    for split in ("train", "val"):
        for c in range(10):
            (tmp / split / str(c)).mkdir(parents=True)
    for n, (split, c) in enumerate(zip(splits, digits.target, strict=True)):
        image = Image.fromarray(images[n]).resize((size, size), Image.BILINEAR).convert("RGB")
        image.save(tmp / split / str(c) / f"{n:04d}.png")
    (tmp / MARKER).write_text("written by convert/make_digits.py\n")
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/digits-tree"))
    parser.add_argument("--size", type=int, default=32, help="side of the RGB images (32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    args = parser.parse_args(argv)
    # The tree is written beside OUT (OUT.tmp), then renamed: OUT's folder must be writable.
    problem = common.cannot_write(args.out.parent)
    if problem is None and args.out.exists() and not (args.out / MARKER).is_file():
        problem = "exists and was not written by make_digits.py; remove it or pass another --out"
    if problem is not None:
        raise common.ConversionError(f"--out {args.out}: {problem}")
    try:
        out = write_digits(args.out, args.size, seed=args.seed)
    except KeyboardInterrupt as e:  # the next run removes OUT.tmp
        raise common.Interrupted(args.out) from e
    n_train = len(list((out / "train").glob("*/*.png")))
    n_val = len(list((out / "val").glob("*/*.png")))
    log.info("digits: %d train + %d val images, 10 classes, in %s", n_train, n_val, out)
    return out


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
