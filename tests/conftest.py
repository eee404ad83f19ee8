"""Shared fixtures: real data from ../shared/data, extracted once per session, and the
converted CIFAR-10 subset that pipeline and trainer tests share (FFCV compiles per process,
so tests reuse one dataset and, where they can, one loader)."""

from __future__ import annotations

import errno
import os
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SUNCET_SHARED_DATA", ROOT.parent / "shared" / "data"))
CIFAR_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"
IMAGENET_TAR = SHARED_DATA / "imagenet-sample.tar"
SPLIT_1PCT = SHARED_DATA / "imagenet_subsets" / "1percent.txt"
SPLIT_10PCT = SHARED_DATA / "imagenet_subsets" / "10percent.txt"


def require(path: Path) -> Path:
    """Skips the test, naming the file, where a piece of shared data is absent."""
    if not path.exists():
        pytest.skip(f"real data not found: {path} (see ../shared/data/README.md)")
    return path


def extract_cifar_subset(dest: Path, per_class: int, splits=("train",)) -> Path:
    """Extracts the first `per_class` JPEGs of each class of CIFAR-10 into dest/cifar10."""
    require(CIFAR_TAR)
    taken: dict[tuple[str, str], int] = defaultdict(int)
    with tarfile.open(CIFAR_TAR, "r:gz") as tar:
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) != 4 or parts[1] not in splits:
                continue
            key = (parts[1], parts[2])
            if taken[key] >= per_class:
                continue
            taken[key] += 1
            tar.extract(m, dest, filter="data")
    return dest / "cifar10"


@pytest.fixture(scope="session")
def cifar_tree(tmp_path_factory) -> Path:
    """A real CIFAR-10 ImageFolder tree: train/ 10 classes x 60, val/ 10 x 10."""
    dest = tmp_path_factory.mktemp("cifar")
    root = extract_cifar_subset(dest, per_class=60, splits=("train", "test"))
    (root / "test").rename(root / "val")
    for d in (root / "val").iterdir():  # keep val small
        for f in sorted(d.iterdir())[10:]:
            f.unlink()
    return root


@pytest.fixture(scope="session")
def cifar_dataset(tmp_path_factory, cifar_tree) -> Path:
    """The CIFAR subset converted to both formats (one dataset folder, one manifest)."""
    from convert import imagenet_to_dali, imagenet_to_ffcv

    out = tmp_path_factory.mktemp("cifar-data") / "cifar10"
    imagenet_to_ffcv.main(["--src", str(cifar_tree), "--out", str(out), "--max-resolution", "32"])
    imagenet_to_dali.main(["--src", str(cifar_tree), "--out", str(out), "--max-resolution", "32"])
    return out


@pytest.fixture(scope="session")
def imagenet_tree(tmp_path_factory) -> Path:
    """The 1,000 real ImageNet JPEGs (one per class) as an ImageFolder tree."""
    require(IMAGENET_TAR)
    dest = tmp_path_factory.mktemp("imagenet")
    with tarfile.open(IMAGENET_TAR) as tar:
        tar.extractall(dest, filter="data")
    return dest / "imagenet-sample"


@pytest.fixture
def unwritable(monkeypatch):
    """Makes a folder act as on a read-only mount for `convert.common.cannot_write`'s probe
    (chmod does not stop root, and tests run as root): `unwritable(folder)`."""

    def make(folder: Path) -> None:
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == folder:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    return make
