"""The manifest: the only contract between a converted dataset folder and the pipelines.

Layout of a dataset folder written by ``convert/``::

    DATA/manifest.json           this file's JSON (see `Manifest`)
    DATA/train.beton             FFCV: fields image (RGBImageField), label, index (IntField)
    DATA/val.beton
    DATA/shards/train-00000.tar  DALI: WebDataset shards, members <index:09d>.jpg / .cls / .idx
    DATA/shards/train-00000.idx  DALI's index for fn.readers.webdataset (made by wds2idx)
    DATA/shards/train-offsets.npy  [N, 3] int64: shard number, byte offset, byte size of each .jpg
    DATA/skipped.txt             files the converter could not decode, one "path<TAB>reason" a line
    DATA/warned.txt              JPEGs kept although libjpeg warned ("path<TAB>warning" a line)

Sample ``i`` of a split is the same image, with the same label, in every format.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT = "suncet-dataset/1"


class ManifestError(ValueError):
    """A dataset folder or manifest that cannot be used; the message names the file."""


@dataclass
class SplitInfo:
    """One split (train or val): sample index -> relative file name and label."""

    files: list[str]
    labels: list[int]

    @property
    def num_samples(self) -> int:
        return len(self.files)

    def counts(self, num_classes: int) -> list[int]:
        out = [0] * num_classes
        for y in self.labels:
            out[y] += 1
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for f, y in zip(self.files, self.labels, strict=True):
            h.update(f"{f}\t{y}\n".encode())
        return h.hexdigest()


@dataclass
class Manifest:
    classes: list[str]  # class folder names in label order
    splits: dict[str, SplitInfo]  # "train", "val"
    formats: dict[str, dict] = field(default_factory=dict)  # "ffcv" / "dali" -> options, files
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "source": self.source,
            "classes": self.classes,
            "splits": {
                name: {
                    "num_samples": s.num_samples,
                    "fingerprint": s.fingerprint(),
                    "counts": s.counts(self.num_classes),
                    "files": s.files,
                    "labels": s.labels,
                }
                for name, s in self.splits.items()
            },
            "formats": self.formats,
        }

    @classmethod
    def from_json(cls, d: dict, path: str = MANIFEST_NAME) -> Manifest:
        fix = "reconvert the ImageFolder tree with convert/imagenet_to_ffcv.py (or _dali.py)"
        if d.get("format") != FORMAT:
            raise ManifestError(
                f"{path}: not a suncet dataset manifest (format {d.get('format')!r}); {fix}"
            )
        try:
            splits = {
                name: SplitInfo(files=list(s["files"]), labels=[int(y) for y in s["labels"]])
                for name, s in d["splits"].items()
            }
            manifest = cls(list(d["classes"]), splits, dict(d.get("formats", {})),
                           d.get("source", ""))  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(
                f"{path}: incomplete manifest ({type(e).__name__}: {e}); {fix}"
            ) from None
        for name, split in splits.items():
            if len(split.files) != len(split.labels):
                raise ManifestError(f"{path}: split {name!r} lists {len(split.files)} files "
                                    f"and {len(split.labels)} labels; {fix}")  # fmt: skip
            if split.labels and not 0 <= min(split.labels) <= max(split.labels) < (
                manifest.num_classes
            ):
                bad = next(y for y in split.labels if not 0 <= y < manifest.num_classes)
                raise ManifestError(
                    f"{path}: split {name!r} has label {bad}, outside the "
                    f"{manifest.num_classes} classes it lists; {fix}"
                )
        return manifest

    def save(self, data_dir: str | os.PathLike) -> Path:
        """Writes ``manifest.json`` atomically (temporary name, fsync, rename)."""
        path = Path(data_dir) / MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path


def load_manifest(data_dir: str | os.PathLike) -> Manifest:
    """Reads ``DATA/manifest.json`` with errors that say what to do."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ManifestError(
            f"{data_dir}: dataset folder does not exist; convert an ImageFolder tree first "
            f"with `python convert/imagenet_to_ffcv.py --src TREE --out {data_dir}`"
        )
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path}: no manifest; this folder was not written by convert/ (convert the "
            f"ImageFolder tree with `python convert/imagenet_to_ffcv.py --src TREE --out "
            f"{data_dir}`)"
        )
    try:
        d = json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise ManifestError(
            f"{path}: corrupt manifest ({e}); reconvert with `python convert/imagenet_to_ffcv.py "
            f"--src TREE --out {data_dir}`"
        ) from e
    return Manifest.from_json(d, str(path))


def split_of_file(rel: str) -> str:
    """The split a dataset file belongs to: ``train.beton`` and ``shards/train-00000.tar``
    belong to ``train``."""
    name = rel.removeprefix("shards/")
    return name.removesuffix(".beton") if name.endswith(".beton") else name.split("-")[0]


def check_files(
    data_dir: str | os.PathLike, manifest: Manifest, fmt: str, split: str | None = None
) -> None:
    """Checks that format `fmt`'s files (of `split` only, if given) are all there, each the
    size the converter wrote.

    Catches a truncated copy (an interrupted rsync, a full disk) or a file swapped in from
    another conversion before any work starts. Manifests written before sizes were recorded
    are checked for presence only.

    Raises:
        ManifestError: naming the file, what is wrong with it and the command that rewrites it.
    """
    data_dir = Path(data_dir)
    fix = f"reconvert with `python convert/imagenet_to_{fmt}.py --src TREE --out {data_dir}`"
    section = manifest.formats.get(fmt)
    if section is None:
        raise ManifestError(f"{data_dir / MANIFEST_NAME}: the dataset has no {fmt} files; {fix}")
    sizes = section.get("sizes", {})
    for rel in section.get("files", []):
        if split is not None and split_of_file(rel) != split:
            continue
        path = data_dir / rel
        if not path.is_file():
            raise ManifestError(f"{path}: missing ({fmt} file listed in {MANIFEST_NAME}); {fix}")
        want, got = sizes.get(rel), path.stat().st_size
        if want is not None and got != want:
            raise ManifestError(
                f"{path}: {got} bytes but {MANIFEST_NAME} records {want}, so it is truncated or "
                f"from another conversion; copy it again or {fix}"
            )
