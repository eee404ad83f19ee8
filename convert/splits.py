"""Label splits: which training samples keep their label.

One function, `resolve_split`, turns (manifest, spec, seed) into sorted sample indices of the
"train" split; the converter and the trainer both use it, and `write_split` keeps the chosen
list in the run folder in the standard split-file format, so it can be read back as a spec.

Split files are the format of the standard ImageNet semi-supervised splits (SimCLR, SuNCEt,
PAWS): one training file name a line, e.g. ``n04235860_14959.JPEG``. A line matches a sample
whose file base name is that name; a line holding a ``/`` matches the file name relative to the
split folder (``n04235860/n04235860_14959.JPEG``), which is what `write_split` writes when base
names repeat across classes (CIFAR's ``0001.jpg``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from convert.manifest import Manifest

log = logging.getLogger(__name__)

TRAIN = "train"
STANDARD_FILES = {"1pct": "1percent.txt", "10pct": "10percent.txt"}
_FRACTION = re.compile(r"^(\d+(?:\.\d+)?)(?:pct|%)$")
_WNID = re.compile(r"^n\d{8}$")  # ImageNet's class folders (WordNet ids): n01440764


class SplitError(ValueError):
    """A label split that cannot be resolved; the message names the spec or file."""


def read_split_file(path: str | os.PathLike, option: str = "--labels") -> list[str]:
    """Reads a split file: one file name a line; blank lines and ``#`` comments are ignored
    (a UTF-8 byte-order mark, as some editors write, too); `option` names it in errors."""
    path = Path(path)
    if not path.is_file():
        hint = (
            "pass --labels 1pct, 10pct, <p>pct, all, or the path of an existing split file"
            if option == "--labels"
            else f"pass {option} the path of an existing split file"
        )
        raise SplitError(f"{option} {path}: split file not found; {hint}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SplitError(f"{option} {path}: not a UTF-8 text file of file names ({e})") from e
    names = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line)
    if not names:
        raise SplitError(f"{path}: split file lists no file names")
    return names


def indices_from_names(manifest: Manifest, names: list[str], source: str = "split") -> np.ndarray:
    """Maps file names (base names or paths relative to the split folder) to sample indices.

    Raises:
        SplitError: naming the missing names, how many there are and `source`, if any name is
            not in the train split, or a base name is ambiguous.
    """
    files = _train(manifest).files
    by_path = {f: i for i, f in enumerate(files)}
    by_base: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i, f in enumerate(files):
        base = os.path.basename(f)
        if base in by_base:
            ambiguous.add(base)
        by_base[base] = i

    out, missing, unclear = [], [], []
    for name in names:
        if "/" in name:
            i = by_path.get(name)
        elif name in ambiguous:
            unclear.append(name)
            continue
        else:
            i = by_base.get(name)
        if i is None:
            missing.append(name)
        else:
            out.append(i)
    if missing:
        raise SplitError(
            f"{source}: {len(missing)} of {len(names)} names are not in the dataset's train split "
            f"({len(files)} samples), e.g. {', '.join(missing[:5])}; if this is the dataset the "
            "split was made for, remove them from the split file or reconvert the full tree "
            "(check --limit-per-class, --src and skipped.txt); names are base names or "
            "<class>/<file> paths as in manifest.json, not absolute or train/ paths"
        )
    if unclear:
        raise SplitError(
            f"{source}: {len(unclear)} base names match files in several classes, e.g. "
            f"{unclear[0]}; write them as <class>/<file> lines"
        )
    unique = np.unique(np.asarray(out, dtype=np.int64))
    if len(unique) < len(out):
        log.warning("%s: %d lines repeat a name; %d labeled samples", source,
                    len(out) - len(unique), len(unique))  # fmt: skip
    return unique


def stratified_split(manifest: Manifest, fraction: float, seed: int = 0) -> np.ndarray:
    """A seeded class-stratified draw: ``max(1, round(fraction * n_c))`` samples of each class.

    The same (manifest, fraction, seed) always gives the same indices.
    """
    if not 0 < fraction <= 1:
        raise SplitError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(_train(manifest).labels, dtype=np.int64)  # [N]
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(manifest.num_classes):
        members = np.flatnonzero(labels == c)  # [n_c]
        if len(members) == 0:
            continue
        k = min(len(members), max(1, round(fraction * len(members))))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def resolve_split(
    manifest: Manifest,
    spec: str,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
) -> np.ndarray:
    """Sorted int64 indices of the labeled samples of the train split.

    Args:
        manifest: the dataset's manifest.
        spec: ``1pct`` / ``10pct`` (the standard ImageNet files when available, else a
            stratified draw), any ``<p>pct`` or ``<p>%`` (a stratified draw), ``all``, or the
            path of a split file.
        seed: seed of the stratified draw.
        data_dir: where ``1percent.txt`` / ``10percent.txt`` are looked for.
        split_file: a split file to use for ``1pct`` / ``10pct``.
    """
    spec = str(spec).strip()
    if split_file is not None and spec not in STANDARD_FILES:
        raise SplitError(
            f"--split-file {split_file}: only read for --labels 1pct or 10pct, not {spec!r}; "
            "pass the file as --labels FILE instead"
        )
    if spec in ("all", "100pct", "100%"):
        return np.arange(_train(manifest).num_samples, dtype=np.int64)

    standard, option = None, "--labels"
    if spec in STANDARD_FILES:
        if split_file is not None:
            standard, option = Path(split_file), "--split-file"
            if Path(split_file).name != STANDARD_FILES[spec]:
                log.warning("--split-file %s for --labels %s: the standard file is named %s",
                            split_file, spec, STANDARD_FILES[spec])  # fmt: skip
        elif data_dir is not None and (Path(data_dir) / STANDARD_FILES[spec]).is_file():
            standard = Path(data_dir) / STANDARD_FILES[spec]
    if standard is not None:
        log.info("label split %s: %s", spec, standard)
        names = read_split_file(standard, option)
        return indices_from_names(manifest, names, str(standard))

    match = _FRACTION.match(spec)
    if match:
        fraction = float(match.group(1)) / 100
        if not 0 < fraction <= 1:
            raise SplitError(f"--labels {spec}: the fraction must be in (0, 100]%")
        idx = stratified_split(manifest, fraction, seed)
        n = _train(manifest).num_samples
        if len(idx) > 1.5 * fraction * n:  # at least one image a class
            log.warning(
                "label split %s: a class-stratified draw keeps at least one image a class, so "
                "it labels %d of the %d images (%.1f%%), not %s",
                spec, len(idx), n, 100 * len(idx) / n, spec,
            )  # fmt: skip
        if spec in STANDARD_FILES and looks_like_imagenet(manifest):
            log.warning(
                "label split %s: no %s in %s and no --split-file, so a seeded class-stratified "
                "draw (seed %d, %d samples), NOT ImageNet's standard %s split: for numbers "
                "comparable with published ones pass --split-file PATH/%s",
                spec, STANDARD_FILES[spec], data_dir, seed, len(idx), spec, STANDARD_FILES[spec],
            )  # fmt: skip
        else:
            log.info("label split %s: stratified draw, seed %d, %d samples", spec, seed, len(idx))
        return idx

    if Path(spec).is_file() or "/" in spec or spec.endswith(".txt"):
        return indices_from_names(manifest, read_split_file(spec), spec)
    raise SplitError(
        f"label split {spec!r}: expected 1pct, 10pct, <p>pct, all, or the path of a split file"
    )


def looks_like_imagenet(manifest: Manifest) -> bool:
    """Whether the classes are ImageNet's (WordNet ids): its standard split files apply."""
    classes = manifest.classes
    return bool(classes) and all(_WNID.match(c) for c in classes)


def write_split(path: str | os.PathLike, manifest: Manifest, indices: np.ndarray) -> Path:
    """Writes the chosen samples as a split file that `resolve_split` reads back.

    Base names (the standard format) when they are unique in the train split, else paths
    relative to the split folder.
    """
    files = _train(manifest).files
    bases = [os.path.basename(f) for f in files]
    names = bases if len(set(bases)) == len(bases) else files
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(names[i] + "\n" for i in np.asarray(indices, dtype=np.int64)))
    os.replace(tmp, path)
    return path


def _train(manifest: Manifest):
    if TRAIN not in manifest.splits:
        raise SplitError(f"the dataset has no {TRAIN!r} split (splits: {sorted(manifest.splits)})")
    return manifest.splits[TRAIN]
