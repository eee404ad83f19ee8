"""Label splits: the standard ImageNet files, the stratified fallback, and the run-folder copy."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import SPLIT_1PCT, SPLIT_10PCT, require

from convert.manifest import Manifest, SplitInfo
from convert.splits import (
    SplitError,
    read_split_file,
    resolve_split,
    stratified_split,
    write_split,
)


def imagenet_like_manifest(names: list[str], extra_per_class: int = 2) -> Manifest:
    """A manifest (no images) holding `names` plus a few more files per class, ImageNet-style."""
    classes = sorted({n.split("_")[0] for n in names})
    label = {c: i for i, c in enumerate(classes)}
    all_names = names + [f"{c}_extra{k}.JPEG" for c in classes for k in range(extra_per_class)]
    files = sorted(f"{n.split('_')[0]}/{n}" for n in all_names)
    labels = [label[f.split("/")[0]] for f in files]
    return Manifest(classes, {"train": SplitInfo(files, labels)})


def uneven_manifest(sizes: list[int], prefix: str = "") -> Manifest:
    """Classes of the given sizes; file base names repeat across classes (like CIFAR)."""
    classes = [f"c{i}" for i in range(len(sizes))]
    files, labels = [], []
    for c, n in enumerate(sizes):
        files += [f"c{c}/{prefix}{k:04d}.jpg" for k in range(n)]
        labels += [c] * n
    return Manifest(classes, {"train": SplitInfo(files, labels)})


@pytest.fixture(scope="module")
def names_1pct() -> list[str]:
    return read_split_file(require(SPLIT_1PCT))


def test_standard_1pct_file_parses_to_12811_names(names_1pct):
    assert len(names_1pct) == 12811 == len(set(names_1pct))
    assert all(n.endswith(".JPEG") and "/" not in n for n in names_1pct)
    assert len({n.split("_")[0] for n in names_1pct}) == 1000


def test_1pct_resolves_to_the_named_files_via_split_file_or_data_dir(names_1pct, tmp_path):
    manifest = imagenet_like_manifest(names_1pct)
    idx = resolve_split(manifest, "1pct", split_file=SPLIT_1PCT)
    assert idx.dtype == np.int64 and len(idx) == 12811 and (np.diff(idx) > 0).all()
    files = manifest.splits["train"].files
    assert sorted(files[i].split("/")[1] for i in idx) == sorted(names_1pct)

    (tmp_path / "1percent.txt").symlink_to(SPLIT_1PCT)
    assert np.array_equal(resolve_split(manifest, "1pct", data_dir=tmp_path), idx)
    assert np.array_equal(resolve_split(manifest, str(SPLIT_1PCT)), idx)  # spec as a path


def test_10pct_file_parses_when_present():
    names = read_split_file(require(SPLIT_10PCT))
    assert len(names) == 128116


def test_split_file_name_missing_from_dataset_is_an_error_naming_it(names_1pct):
    gone = names_1pct[1234]
    manifest = imagenet_like_manifest([n for n in names_1pct if n != gone])
    with pytest.raises(SplitError) as err:
        resolve_split(manifest, "1pct", split_file=SPLIT_1PCT)
    msg = str(err.value)
    assert gone in msg and str(SPLIT_1PCT) in msg and "1 of 12811 names" in msg


def test_stratified_fallback_takes_at_least_one_and_about_p_per_class():
    sizes = [3, 10, 57, 150, 300, 1000, 1300]
    manifest = uneven_manifest(sizes)
    idx = resolve_split(manifest, "1pct", seed=0)  # no split file anywhere: stratified
    labels = np.asarray(manifest.splits["train"].labels)[idx]
    per_class = np.bincount(labels, minlength=len(sizes))
    assert per_class.tolist() == [max(1, round(0.01 * n)) for n in sizes]  # [1,1,1,2,3,10,13]
    tenth = resolve_split(manifest, "10pct", seed=0)
    assert abs(len(tenth) - 0.1 * sum(sizes)) <= len(sizes)
    assert (np.diff(idx) > 0).all() and idx.dtype == np.int64


def test_1pct_without_the_standard_file_on_imagenet_warns_that_the_split_is_a_draw(
    names_1pct, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    manifest = imagenet_like_manifest(names_1pct[:300], extra_per_class=0)
    idx = resolve_split(manifest, "1pct", seed=0, data_dir=tmp_path)  # no 1percent.txt there
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    standard = [m for m in warned if "NOT ImageNet's standard" in m]
    assert len(standard) == 1 and len(idx) > 0
    msg = standard[0]
    assert "NOT ImageNet's standard 1pct split" in msg and "--split-file PATH/1percent.txt" in msg
    assert str(tmp_path) in msg

    caplog.clear()
    resolve_split(uneven_manifest([200] * 4), "1pct", seed=0)  # CIFAR-like names: a draw
    assert [r.levelname for r in caplog.records] == ["INFO"]
    resolve_split(manifest, "2pct", seed=0)  # asked for a draw by name
    assert "NOT ImageNet's standard" not in caplog.text


def test_stratified_draw_is_deterministic_per_seed():
    manifest = uneven_manifest([200] * 10)
    a = stratified_split(manifest, 0.1, seed=3)
    assert np.array_equal(a, stratified_split(manifest, 0.1, seed=3))
    assert not np.array_equal(a, stratified_split(manifest, 0.1, seed=4))
    assert len(resolve_split(manifest, "all")) == 2000
    assert len(resolve_split(manifest, "2.5pct", seed=3)) == 50


def test_written_split_reads_back_as_a_split_file(names_1pct, tmp_path):
    manifest = imagenet_like_manifest(names_1pct[:500])  # unique base names: standard format
    idx = resolve_split(manifest, "10pct", seed=1)
    path = write_split(tmp_path / "labeled.txt", manifest, idx)
    lines = path.read_text().splitlines()
    assert all("/" not in line and line.endswith(".JPEG") for line in lines)
    assert np.array_equal(resolve_split(manifest, str(path)), idx)

    cifar_like = uneven_manifest([40, 40, 40])  # "0001.jpg" in every class: relative paths
    idx = resolve_split(cifar_like, "10pct", seed=1)
    path = write_split(tmp_path / "cifar.txt", cifar_like, idx)
    assert path.read_text().splitlines()[0].startswith("c0/")
    assert np.array_equal(resolve_split(cifar_like, str(path)), idx)


def test_ambiguous_base_name_and_bad_specs_are_errors(tmp_path):
    manifest = uneven_manifest([5, 5])
    (tmp_path / "split.txt").write_text("0001.jpg\n")
    with pytest.raises(SplitError, match="several classes.*0001.jpg"):
        resolve_split(manifest, str(tmp_path / "split.txt"))
    with pytest.raises(SplitError, match="split file not found"):
        resolve_split(manifest, str(tmp_path / "nope.txt"))
    with pytest.raises(SplitError, match="expected 1pct, 10pct"):
        resolve_split(manifest, "some")


def test_split_files_with_a_byte_order_mark_or_repeated_lines_read_as_meant(tmp_path, caplog):
    manifest = uneven_manifest([5, 5], prefix="img")
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffc0/img0001.jpg\r\nc1/img0002.jpg\nc1/img0002.jpg\n".encode())
    assert resolve_split(manifest, str(path)).tolist() == [1, 7]
    assert "1 lines repeat a name; 2 labeled samples" in caplog.text


def test_split_file_option_is_named_and_never_silently_ignored(tmp_path):
    manifest = uneven_manifest([50] * 4)
    with pytest.raises(SplitError, match=r"^--split-file /nonexist.txt: split file not found"):
        resolve_split(manifest, "1pct", split_file="/nonexist.txt")
    for spec in ("20pct", "all"):
        with pytest.raises(SplitError, match=rf"only read for --labels 1pct or 10pct, not .{spec}"):
            resolve_split(manifest, spec, split_file=tmp_path / "1percent.txt")
    with pytest.raises(SplitError, match=r"^--labels /nonexist.txt: split file not found"):
        resolve_split(manifest, "/nonexist.txt")


def test_a_draw_that_keeps_far_more_than_its_fraction_says_so(caplog):
    manifest = uneven_manifest([3] * 10)  # 10pct of 3 images a class: still one of each
    assert len(resolve_split(manifest, "10pct", seed=0)) == 10
    assert "so it labels 10 of the 30 images (33.3%), not 10pct" in caplog.text
    with pytest.raises(SplitError, match=r"^--labels 0pct: the fraction must be in \(0, 100\]%"):
        resolve_split(manifest, "0pct")


def test_files_that_are_not_utf8_are_named(tmp_path):
    """A split file, manifest, saved config or preset with a stray 0xff byte: an error naming
    the file, not a bare codec message."""
    from convert.manifest import ManifestError, load_manifest
    from convert.splits import SplitError, read_split_file
    from runner import config as rc

    bad = b"\xffn01440764_10026.JPEG\n"
    (tmp_path / "split.txt").write_bytes(bad)
    with pytest.raises(SplitError, match=r"--labels .*split\.txt: not a UTF-8 text file"):
        read_split_file(tmp_path / "split.txt")
    (tmp_path / "manifest.json").write_bytes(bad)
    with pytest.raises(ManifestError, match=r"manifest\.json: corrupt manifest"):
        load_manifest(tmp_path)
    (tmp_path / "config.json").write_bytes(bad)
    with pytest.raises(rc.ConfigError, match=r"cannot read the saved config .*config\.json"):
        rc.load_json(tmp_path / "config.json")
    (tmp_path / "preset.toml").write_bytes(bad)
    with pytest.raises(rc.ConfigError, match=r"--config: .*preset\.toml is not valid TOML"):
        rc.read_preset(tmp_path / "preset.toml")
