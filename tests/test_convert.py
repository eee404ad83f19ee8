"""The converters: one sample list, two formats, bad files skipped, nothing half-written."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convert import common, imagenet_to_dali, imagenet_to_ffcv, make_digits
from convert.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "owl"]
EXPECTED_SKIPS = {
    "train/dog/empty.JPEG": "empty file",
    "train/dog/notes.JPEG": "not an image",
    "train/dog/truncated.JPEG": "truncated",
    "train/owl/locked.JPEG": "unreadable",
}


# ---------------------------------------------------------------------------------------------
# Helpers: synthetic images and readers for both formats
# ---------------------------------------------------------------------------------------------


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth RGB image (JPEG-friendly, so re-encoding errors stay small)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = rng.uniform(0.5, 3, size=3)
    phase = rng.uniform(0, 6, size=3)
    chans = [np.sin(a * 3 * x + phase[k]) * np.cos(b * 3 * y + c * k) for k in range(3)]
    return ((np.stack(chans, -1) + 1) * 127.5).round().astype(np.uint8)  # [H, W, 3]


def save_jpeg(path: Path, image: np.ndarray, mode: str = "RGB") -> None:
    Image.fromarray(image).convert(mode).save(path, format="JPEG", quality=95)


def read_beton(path: Path) -> dict:
    """Labels, indices and stored image bytes of a .beton, without compiling a Loader."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    assert reader.field_names == ["image", "label", "index"]
    md = {name: reader.metadata[f"f{k}"] for k, name in enumerate(reader.field_names)}
    size_at = {int(p): int(n) for _, p, n in reader.alloc_table}
    raw = np.fromfile(path, dtype=np.uint8)
    images = []
    for m in md["image"]:
        ptr = int(m["data_ptr"])
        images.append((int(m["mode"]), bytes(raw[ptr : ptr + size_at[ptr]])))
    return {"label": md["label"].tolist(), "index": md["index"].tolist(), "images": images}


def read_shards(out: Path, manifest: Manifest, split: str) -> dict:
    """Each sample's .jpg via the offsets file, and the .cls / .idx members via tarfile."""
    dali = manifest.formats["dali"]
    offsets = np.load(out / dali["offsets"][split])  # [N, 3]
    jpgs = []
    for shard, offset, size in offsets:
        with open(out / dali["shards"][split][shard], "rb") as f:
            f.seek(offset)
            jpgs.append(f.read(size))
    members: dict[str, dict[int, bytes]] = {"jpg": {}, "cls": {}, "idx": {}}
    for shard in dali["shards"][split]:
        with tarfile.open(out / shard) as tar:
            for m in tar:
                stem, ext = m.name.split(".")
                members[ext][int(stem)] = tar.extractfile(m).read()
    return {"offsets": offsets, "jpgs": jpgs, "members": members}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float32)


def reference(path: Path, max_resolution: int) -> np.ndarray:
    """The source decoded at full scale and resized the converters' way."""
    image = np.asarray(Image.open(path).convert("RGB"))
    return common.resize_max_side(image, max_resolution).astype(np.float32)


def convert_both(src: Path, out: Path, *extra: str, shard_size: int = 1000) -> Manifest:
    args = ["--src", str(src), "--out", str(out), *extra]
    imagenet_to_ffcv.main(args)
    imagenet_to_dali.main([*args, "--shard-size", str(shard_size)])
    return load_manifest(out)


def simulate_unreadable(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """chmod 000 does not stop root (tests run as root): make `open_source` refuse instead."""
    real = common.open_source

    def open_source(path):
        if Path(path).name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(common, "open_source", open_source)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory) -> Path:
    """train/{cat,dog,owl} x 5 good JPEGs plus every bad case; val/ x 2 good JPEGs."""
    src = tmp_path_factory.mktemp("bad") / "tree"
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for c in CLASSES:
            (src / split / c).mkdir(parents=True)
            for k in range(n):
                h, w = rng.integers(36, 72, size=2)
                save_jpeg(src / split / c / f"img{k}.JPEG", smooth_image(rng, h, w))
    cat, dog, owl = (src / "train" / c for c in CLASSES)
    save_jpeg(cat / "cmyk.JPEG", smooth_image(rng, 48, 40), "CMYK")
    save_jpeg(cat / "gray.JPEG", smooth_image(rng, 40, 56), "L")
    Image.fromarray(smooth_image(rng, 50, 30)).save(cat / "png_named.JPEG", format="PNG")
    (dog / "empty.JPEG").write_bytes(b"")
    good = io.BytesIO()
    Image.fromarray(smooth_image(rng, 64, 64)).save(good, format="JPEG", quality=95)
    (dog / "truncated.JPEG").write_bytes(good.getvalue()[: len(good.getvalue()) * 2 // 3])
    (dog / "notes.JPEG").write_text("not a picture, just some text\n")
    save_jpeg(owl / "locked.JPEG", smooth_image(rng, 40, 40))
    (owl / "locked.JPEG").chmod(0)  # effective only when not root; see simulate_unreadable
    return src


@pytest.fixture(scope="module")
def bad_dataset(bad_tree, tmp_path_factory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("bad-data") / "data"
    with pytest.MonkeyPatch.context() as mp:
        simulate_unreadable(mp, "locked.JPEG")
        manifest = convert_both(
            bad_tree, out, "--max-resolution", "32", "--workers", "2", shard_size=7
        )
    return out, manifest


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_files_are_skipped_and_listed_in_skipped_txt(bad_dataset):
    out, manifest = bad_dataset
    lines = (out / common.SKIPPED_NAME).read_text().splitlines()
    skipped = dict(line.split("\t") for line in lines)
    assert sorted(skipped) == sorted(EXPECTED_SKIPS)
    for path, reason in EXPECTED_SKIPS.items():
        assert skipped[path].startswith(reason), skipped[path]

    train = manifest.splits["train"]
    assert {"cat/cmyk.JPEG", "cat/gray.JPEG", "cat/png_named.JPEG"} <= set(train.files)
    assert train.counts(3) == [8, 5, 5]
    assert manifest.splits["val"].counts(3) == [2, 2, 2]
    assert manifest.formats["ffcv"]["skipped"] == manifest.formats["dali"]["skipped"] == 4


def test_cmyk_grayscale_and_png_named_jpeg_decode_to_rgb(bad_dataset, bad_tree):
    out, manifest = bad_dataset
    files = manifest.splits["train"].files
    beton = read_beton(out / "train.beton")
    for name in ("cat/cmyk.JPEG", "cat/gray.JPEG", "cat/png_named.JPEG"):
        i = files.index(name)
        got = decode(beton["images"][i][1])
        want = reference(bad_tree / "train" / name, 32)
        assert got.shape == want.shape and got.shape[2] == 3
        assert np.abs(got - want).mean() < 4, name
    gray = decode(beton["images"][files.index("cat/gray.JPEG")][1])
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 2


def test_strict_fails_at_the_first_bad_file(bad_tree, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(common.ConversionError, match=r"dog/empty\.JPEG: empty file"):
        imagenet_to_dali.main(["--src", str(bad_tree), "--out", str(out), "--strict"])
    assert not (out / MANIFEST_NAME).exists()


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    src = tmp_path / "tree"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
    save_jpeg(src / "a" / "x.jpg", smooth_image(np.random.default_rng(0), 16, 16))
    (src / "b" / ".hidden").write_text("")
    with pytest.raises(common.ConversionError, match=r"tree/b: empty class folder"):
        common.prepare_source(src)


def test_check_image_detects_truncation_at_reduced_scale(tmp_path):
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, size=(384, 512, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    for cut in (len(data) // 3, len(data) * 9 // 10, len(data) - 2):  # last: only EOI missing
        path = tmp_path / f"cut{cut}.jpg"
        path.write_bytes(data[:cut])
        reason = common.check_image(path)
        assert reason is not None and reason.startswith("truncated"), (cut, reason)
    (tmp_path / "whole.jpg").write_bytes(data)
    assert common.check_image(tmp_path / "whole.jpg") is None


# ---------------------------------------------------------------------------------------------
# Both formats hold the same samples
# ---------------------------------------------------------------------------------------------


def check_formats_agree(
    out: Path, manifest: Manifest, src: Path, max_resolution: int, tolerance: float
) -> None:
    """Labels, index <-> file mapping and pixels agree in the manifest, .beton and shards."""
    for split, info in manifest.splits.items():
        n = info.num_samples
        beton = read_beton(out / f"{split}.beton")
        shards = read_shards(out, manifest, split)
        assert beton["index"] == list(range(n))
        assert beton["label"] == info.labels
        assert sorted(shards["members"]["cls"]) == list(range(n))
        assert [int(shards["members"]["cls"][i]) for i in range(n)] == info.labels
        assert [int(shards["members"]["idx"][i]) for i in range(n)] == list(range(n))
        assert all(shards["members"]["jpg"][i] == shards["jpgs"][i] for i in range(n))
        shard_size = manifest.formats["dali"]["shard_size"]
        assert (shards["offsets"][:, 0] == np.arange(n) // shard_size).all()

        # jpg mode: both formats store byte-identical JPEGs (same decode, resize and encoder)
        assert all(mode == 0 for mode, _ in beton["images"])
        assert all(b == s for (_, b), s in zip(beton["images"], shards["jpgs"], strict=True))
        diffs = [
            np.abs(
                decode(shards["jpgs"][i]) - reference(src / split / info.files[i], max_resolution)
            ).mean()
            for i in range(0, n, max(1, n // 25))
        ]
        assert max(diffs) < tolerance, diffs


def test_both_formats_agree_on_generated_tree(bad_dataset, bad_tree):
    out, manifest = bad_dataset
    assert set(manifest.formats) == {"ffcv", "dali"}
    assert manifest.formats["dali"]["shard_counts"]["train"] == [7, 7, 4]
    # 36-72 px synthetic images with strong colour detail, shrunk to 32 px: JPEG's 4:2:0 chroma
    # subsampling costs a few grey levels at this size.
    check_formats_agree(out, manifest, bad_tree, 32, tolerance=6)


def test_both_formats_agree_on_real_cifar(cifar_dataset, cifar_tree):
    manifest = load_manifest(cifar_dataset)
    assert manifest.classes == sorted(p.name for p in (cifar_tree / "train").iterdir())
    assert manifest.splits["train"].counts(10) == [60] * 10
    assert manifest.splits["val"].counts(10) == [10] * 10
    assert manifest.formats["ffcv"]["max_resolution"] == 32
    check_formats_agree(cifar_dataset, manifest, cifar_tree, 32, tolerance=3)


def test_dali_webdataset_reader_reads_the_shards(cifar_dataset):
    from nvidia.dali import fn, pipeline_def

    manifest = load_manifest(cifar_dataset)
    dali = manifest.formats["dali"]

    @pipeline_def(batch_size=50, num_threads=1, device_id=None)
    def pipe():
        jpg, cls, idx = fn.readers.webdataset(
            paths=[str(cifar_dataset / s) for s in dali["shards"]["val"]],
            index_paths=[str(cifar_dataset / s) for s in dali["index_files"]["val"]],
            ext=["jpg", "cls", "idx"],
        )
        return fn.decoders.image(jpg, device="cpu"), cls, idx

    p = pipe()
    p.build()
    images, cls, idx = p.run()
    labels = manifest.splits["val"].labels
    for k in range(50):
        i = int(np.asarray(idx.at(k)).tobytes())
        assert int(np.asarray(cls.at(k)).tobytes()) == labels[i]
        assert np.asarray(images.at(k)).shape == (32, 32, 3)


def test_manifest_lists_the_same_samples_for_both_converters(bad_dataset, bad_tree):
    out, manifest = bad_dataset
    with pytest.MonkeyPatch.context() as mp:
        simulate_unreadable(mp, "locked.JPEG")
        again = common.prepare_source(bad_tree, workers=1)
    for split, info in again.splits.items():
        assert info.fingerprint() == manifest.splits[split].fingerprint()


def damaged_jpegs() -> dict[str, bytes]:
    """A clean JPEG and three copies with damage that libjpeg only warns about."""
    rng = np.random.default_rng(0)  # this garbage is garbage libjpeg notices (not all is)
    buf = io.BytesIO()
    Image.fromarray(smooth_image(rng, 96, 128)).save(buf, format="JPEG", quality=90)
    clean = buf.getvalue()
    scan = clean.index(b"\xff\xda") + 20  # inside the entropy-coded data
    garbled = bytearray(clean)
    garbled[scan : scan + 40] = rng.integers(0, 255, size=40, dtype=np.uint8).tobytes()
    return {
        "clean": clean,
        "garbled": bytes(garbled),
        "eoi_mid_scan": clean[: (scan + len(clean)) // 2] + b"\xff\xd9",
        "bytes_before_eoi": clean[:-2] + bytes(100) + b"\xff\xd9",
    }


def test_damage_libjpeg_only_warns_about_is_reported_with_its_message(tmp_path):
    """PIL decodes these without a word; the check returns libjpeg's warning for each."""
    files = damaged_jpegs()
    for name, data in files.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
        Image.open(tmp_path / f"{name}.jpg").load()  # PIL: no error
        error, warning = common.inspect_image(tmp_path / f"{name}.jpg")
        assert error is None, (name, error)
        if name == "clean":
            assert warning is None
        else:
            assert warning is not None and warning.startswith("Corrupt JPEG data"), (name, warning)
    cmyk = io.BytesIO()
    Image.fromarray(smooth_image(np.random.default_rng(3), 96, 128)).convert("CMYK").save(
        cmyk, format="JPEG", quality=90
    )
    cmyk = cmyk.getvalue()
    scan = cmyk.index(b"\xff\xda") + 20
    (tmp_path / "cmyk_eoi.jpg").write_bytes(cmyk[: (scan + len(cmyk)) // 2] + b"\xff\xd9")
    warning = common.inspect_image(tmp_path / "cmyk_eoi.jpg")[1]
    assert warning is not None and warning.startswith("Corrupt JPEG data"), warning
    rng = np.random.default_rng(1)
    save_jpeg(tmp_path / "cmyk.jpg", smooth_image(rng, 40, 48), "CMYK")
    save_jpeg(tmp_path / "gray.jpg", smooth_image(rng, 40, 48), "L")
    Image.fromarray(smooth_image(rng, 40, 48)).save(tmp_path / "png.jpg", format="PNG")
    for name in ("cmyk", "gray", "png"):
        assert common.inspect_image(tmp_path / f"{name}.jpg") == (None, None), name


def test_jpegs_libjpeg_warns_about_are_kept_and_listed_or_skipped_or_stop_strict(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "tree"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for k in range(3):
            save_jpeg(src / c / f"{k}.jpg", smooth_image(rng, 40, 48))
    files = damaged_jpegs()
    (src / "a" / "garbled.jpg").write_bytes(files["garbled"])
    (src / "b" / "cut_eoi.jpg").write_bytes(files["eoi_mid_scan"])
    warned = {"a/garbled.jpg", "b/cut_eoi.jpg"}  # a flat tree: its train split

    out = tmp_path / "kept"
    imagenet_to_dali.main(["--src", str(src), "--out", str(out), "--workers", "2"])
    lines = dict(line.split("\t") for line in (out / common.WARNED_NAME).read_text().splitlines())
    assert set(lines) == warned
    assert all(msg.startswith("Corrupt JPEG data") for msg in lines.values()), lines
    assert (out / common.SKIPPED_NAME).read_text() == ""
    manifest = load_manifest(out)
    assert warned <= set(manifest.splits["train"].files)
    assert manifest.splits["train"].num_samples == 8
    source = common.prepare_source(src)
    assert "8 images (2 with libjpeg warnings, kept: warned.txt)" in common.summary_line(
        "dali", source, 0, 1.0
    )

    assert manifest.formats["dali"]["warned"] == 2
    assert manifest.formats["dali"]["skip_warned"] is False

    out = tmp_path / "skipped"
    imagenet_to_dali.main(["--src", str(src), "--out", str(out), "--skip-warned"])
    source = common.prepare_source(src, skip_warned=True)
    assert "2 skipped (2 for libjpeg warnings)" in common.summary_line("dali", source, 0, 1.0)
    lines = dict(line.split("\t") for line in (out / common.SKIPPED_NAME).read_text().splitlines())
    assert set(lines) == warned
    assert all(r.startswith("libjpeg warning (Corrupt JPEG data") for r in lines.values())
    assert (out / common.WARNED_NAME).read_text() == ""
    assert load_manifest(out).splits["train"].num_samples == 6

    with pytest.raises(common.ConversionError, match=r"a/garbled\.jpg: libjpeg warning \(Corrupt"):
        imagenet_to_dali.main(["--src", str(src), "--out", str(tmp_path / "strict"), "--strict"])


def test_a_file_turbojpeg_fails_on_does_not_spoil_the_checks_after_it(tmp_path):
    """A JPEG cut inside its header once left TurboJPEG's handle broken: the next check
    reported nothing or crashed the process. Run in a child process, so a crash is a failure."""
    files = damaged_jpegs()
    clean = files["clean"]
    (tmp_path / "header_cut.jpg").write_bytes(clean[: clean.index(b"\xff\xda")])
    (tmp_path / "eoi.jpg").write_bytes(files["eoi_mid_scan"])
    (tmp_path / "clean.jpg").write_bytes(clean)
    code = f"""
from pathlib import Path
from convert import common
d = Path({str(tmp_path)!r})
for _ in range(3):
    assert common.jpeg_warning((d / "header_cut.jpg").read_bytes()) is None
    assert common.inspect_image(d / "header_cut.jpg")[0].startswith("undecodable")
    assert common.jpeg_warning((d / "eoi.jpg").read_bytes()).startswith("Corrupt JPEG data")
    assert common.jpeg_warning((d / "clean.jpg").read_bytes()) is None
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr)


def test_very_thin_images_keep_one_pixel_on_their_short_side(tmp_path):
    """600x1 and 8x65000 once resized to a side of 0 pixels and stopped the conversion."""
    rng = np.random.default_rng(4)
    for name, shape, want in (("wide", (1, 600), (1, 256)), ("tall", (65000, 8), (256, 1))):
        pixels = rng.integers(0, 255, size=(*shape, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{name}.jpg", quality=90)
        assert common.inspect_image(tmp_path / f"{name}.jpg") == (None, None)
        assert common.load_rgb(tmp_path / f"{name}.jpg", 256).shape == (*want, 3), name


# ---------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------


def small_tree(root: Path, classes: tuple[str, ...], per_class: int = 3) -> Path:
    rng = np.random.default_rng(len(classes))
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            save_jpeg(root / c / f"{k}.jpg", smooth_image(rng, 20, 24))
    return root


def finished_looking(out: Path) -> list[str]:
    names = [MANIFEST_NAME, "train.beton", "val.beton", common.SKIPPED_NAME, common.WARNED_NAME]
    found = [n for n in names if (out / n).exists()]
    return found + [p.name for p in out.glob("shards/*") if p.suffix in (".tar", ".idx", ".npy")]


def fail_on(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Makes the writing pass (not validation) die on one file, as a crash midway would."""
    real = common.load_rgb

    def load_rgb(path, max_resolution):
        if Path(path).name == name:
            raise OSError("simulated crash")
        return real(path, max_resolution)

    monkeypatch.setattr(common, "load_rgb", load_rgb)


@pytest.mark.parametrize("module", [imagenet_to_dali, imagenet_to_ffcv], ids=["dali", "ffcv"])
def test_failed_conversion_leaves_no_finished_looking_file(module, tmp_path, monkeypatch):
    src = small_tree(tmp_path / "tree", ("a", "b", "c"), per_class=4)
    out = tmp_path / "data"
    fail_on(monkeypatch, "2.jpg")
    argv = ["--src", str(src), "--out", str(out), "--workers", "2"]
    extra = ["--chunk-size", "1"] if module is imagenet_to_ffcv else ["--shard-size", "2"]
    with pytest.raises(common.ConversionError, match="2.jpg|worker failed"):
        module.main(argv + extra)
    assert finished_looking(out) == []
    assert list(out.rglob("*.tmp")) == []


def test_leftover_tmp_files_are_removed(tmp_path):
    src = small_tree(tmp_path / "tree", ("a", "b"))
    out = tmp_path / "data"
    (out / "shards").mkdir(parents=True)
    (out / "train.beton.tmp").write_bytes(b"half")
    (out / "shards" / "train-00003.tar.tmp").write_bytes(b"half")
    imagenet_to_dali.main(["--src", str(src), "--out", str(out), "--workers", "1"])
    assert list(out.rglob("*.tmp")) == []


def test_second_conversion_into_a_busy_folder_fails_at_once(tmp_path):
    src = small_tree(tmp_path / "tree", ("a", "b"))
    out = tmp_path / "data"
    with common.output_lock(out):  # as if another converter were running
        with pytest.raises(common.ConversionError, match="another conversion is writing"):
            imagenet_to_dali.main(["--src", str(src), "--out", str(out)])
    imagenet_to_dali.main(["--src", str(src), "--out", str(out), "--workers", "1"])


def test_other_dataset_in_out_folder_needs_force(tmp_path):
    out = tmp_path / "data"
    first = small_tree(tmp_path / "one", ("a", "b"))
    second = small_tree(tmp_path / "two", ("a", "b", "c"))
    imagenet_to_dali.main(["--src", str(first), "--out", str(out), "--shard-size", "1"])
    assert len(list(out.glob("shards/*.tar"))) == 6

    with pytest.raises(ManifestError, match="different dataset.*--force"):
        imagenet_to_dali.main(["--src", str(second), "--out", str(out)])
    assert load_manifest(out).num_classes == 2

    imagenet_to_dali.main(["--src", str(second), "--out", str(out), "--force"])
    manifest = load_manifest(out)
    assert manifest.num_classes == 3 and manifest.formats["dali"]["shards"]["train"] == [
        "shards/train-00000.tar"
    ]
    assert sorted(p.name for p in out.glob("shards/*")) == [
        "train-00000.idx",
        "train-00000.tar",
        "train-offsets.npy",
    ]


def test_flat_image_folder_is_one_train_split_and_limit_per_class_applies(tmp_path):
    src = small_tree(tmp_path / "flat", ("x", "y"), per_class=5)
    out = tmp_path / "data"
    manifest = imagenet_to_dali.main(
        ["--src", str(src), "--out", str(out), "--limit-per-class", "2"]
    )
    assert list(manifest.splits) == ["train"]
    assert manifest.splits["train"].files == ["x/0.jpg", "x/1.jpg", "y/0.jpg", "y/1.jpg"]
    assert manifest.splits["train"].labels == [0, 0, 1, 1]


def test_a_test_folder_is_the_val_split_when_there_is_no_val_folder(tmp_path, caplog):
    """CIFAR-10's layout (train/ and test/); another folder beside them is named in the log."""
    src = tmp_path / "cifar-like"
    small_tree(src / "train", ("x", "y"), per_class=3)
    small_tree(src / "test", ("x", "y"), per_class=2)
    small_tree(src / "extra", ("x",), per_class=1)
    with caplog.at_level("INFO", logger="convert.common"):
        manifest = imagenet_to_dali.main(["--src", str(src), "--out", str(tmp_path / "data")])
    assert manifest.splits["train"].num_samples == 6 and manifest.splits["val"].num_samples == 4
    assert manifest.splits["val"].files[0] == "x/0.jpg"
    assert f"using {src / 'test'} as the val split" in caplog.text
    assert f"not reading {src / 'extra'}" in caplog.text


# ---------------------------------------------------------------------------------------------
# Decoding and encoding match FFCV's
# ---------------------------------------------------------------------------------------------


def test_resize_and_jpeg_encode_match_ffcv():
    from ffcv.fields.rgb_image import encode_jpeg, resizer

    rng = np.random.default_rng(1)
    for h, w in ((300, 200), (100, 257), (64, 64)):
        image = smooth_image(rng, h, w)
        ours = common.resize_max_side(image, 128)
        assert np.array_equal(ours, resizer(image, 128))
        assert np.array_equal(resizer(ours, 128), ours)  # FFCV's writer leaves it alone
        assert common.encode_jpeg(ours, 90) == encode_jpeg(ours, 90).tobytes()


def test_load_rgb_drafts_large_jpegs_without_losing_resolution(tmp_path):
    image = smooth_image(np.random.default_rng(2), 600, 1000)
    save_jpeg(tmp_path / "big.jpg", image)
    got = common.load_rgb(tmp_path / "big.jpg", 256)
    assert max(got.shape[:2]) in (255, 256) and got.shape[2] == 3
    want = reference(tmp_path / "big.jpg", 256)
    assert got.shape == want.shape and np.abs(got - want).mean() < 2


# ---------------------------------------------------------------------------------------------
# Command line and demo data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_tree(tmp_path_factory) -> Path:
    """The demo tree, written by running ``python convert/make_digits.py`` from the root."""
    tree = tmp_path_factory.mktemp("digits") / "digits-tree"
    cmd = [sys.executable, "convert/make_digits.py", "--out", str(tree)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return tree


def test_scripts_run_as_files_from_the_repo_root(digits_tree, tmp_path):
    cmd = [sys.executable, "convert/imagenet_to_dali.py", "--src", str(digits_tree)]
    cmd += ["--out", str(tmp_path / "digits"), "--limit-per-class", "3", "--workers", "1"]
    res = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    assert "dali: 60 images, 10 classes, 0 skipped" in res.stderr
    cmd = [sys.executable, "convert/imagenet_to_ffcv.py", "--help"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "--write-mode" in res.stdout


def test_make_digits_writes_an_rgb_image_folder_split_80_20(digits_tree):
    train = sorted(digits_tree.glob("train/*/*.png"))
    val = sorted(digits_tree.glob("val/*/*.png"))
    assert len(train) + len(val) == 1797 and 340 <= len(val) <= 380
    assert sorted(p.name for p in (digits_tree / "val").iterdir()) == [str(d) for d in range(10)]
    image = Image.open(train[0])
    assert image.mode == "RGB" and image.size == (32, 32)


def test_make_digits_split_is_deterministic_and_stratified():
    target = np.repeat(np.arange(10), 50)
    first = make_digits.assign_splits(target, 0.2, seed=0)
    assert first == make_digits.assign_splits(target, 0.2, seed=0)
    assert first != make_digits.assign_splits(target, 0.2, seed=1)
    val_per_class = np.bincount(target[np.array(first) == "val"], minlength=10)
    assert (val_per_class == 10).all()


def test_make_digits_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="not written by make_digits"):
        make_digits.write_digits(tmp_path / "mine")


def test_a_hand_edited_or_foreign_manifest_is_an_error_saying_to_reconvert(tmp_path):
    from convert.manifest import FORMAT, ManifestError, load_manifest

    good = {"format": FORMAT, "classes": ["a", "b"],
            "splits": {"train": {"files": ["a/1.jpg", "b/2.jpg"], "labels": [0, 1]}}}  # fmt: skip
    cases = {
        "fewer classes than the labels": ({**good, "classes": ["a"]}, "label 1, outside the 1"),
        "no labels": ({**good, "splits": {"train": {"files": []}}}, "incomplete manifest"),
        "another format": ({**good, "format": "suncet-dataset/0"}, "not a suncet dataset"),
    }
    for name, (manifest, says) in cases.items():
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ManifestError, match=says) as err:
            load_manifest(tmp_path)
        assert "reconvert" in str(err.value), name
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="corrupt manifest .*; reconvert with"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    assert load_manifest(tmp_path).num_classes == 2


# ---------------------------------------------------------------------------------------------
# An output that cannot be written; Ctrl-C
# ---------------------------------------------------------------------------------------------

CONVERTER_SCRIPTS = ["convert/imagenet_to_ffcv.py", "convert/imagenet_to_dali.py"]


@pytest.mark.parametrize("script", [*CONVERTER_SCRIPTS, "convert/make_digits.py"])
def test_an_out_that_cannot_be_written_is_one_error_line_before_work(script, tmp_path):
    """--out in /proc (nothing can be created there, even by root) or below a file: one
    `error:` line naming --out and the path, status 2, before the source is even read (the
    --src given does not exist)."""
    (tmp_path / "file").write_text("")
    digits = script == "convert/make_digits.py"  # checks OUT's folder: it writes OUT.tmp there
    in_proc = "cannot write there (" if digits else "cannot create it in /proc ("
    for out, says in (
        (Path("/proc/suncet-test-out"), in_proc),
        (tmp_path / "file" / "data", f"{tmp_path / 'file'} is a file, not a folder"),
    ):
        cmd = [sys.executable, script, "--out", str(out)]
        if not digits:
            cmd += ["--src", str(tmp_path / "no-such-tree")]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, (script, out, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --out {out}"), (script, lines)
        assert says in lines[0], (script, lines)


def test_a_read_only_out_fails_before_work_and_writes_nothing(tmp_path, unwritable):
    src = small_tree(tmp_path / "tree", ("a", "b"))
    ro = tmp_path / "ro"
    ro.mkdir()
    unwritable(ro)
    says = r"--out .*ro.*: cannot write there \(Read-only file system\)"
    for module in (imagenet_to_dali, imagenet_to_ffcv):
        with pytest.raises(common.ConversionError, match=says):
            module.main(["--src", str(src), "--out", str(ro)])
    # A folder still to be made: its nearest existing parent must allow creating it.
    says = r"--out .*ro/new/data: cannot create it in .*ro \(Read-only file system\)"
    with pytest.raises(common.ConversionError, match=says):
        imagenet_to_dali.main(["--src", str(src), "--out", str(ro / "new" / "data")])
    # make_digits.py writes OUT.tmp beside OUT, then renames it: OUT's folder is checked.
    says = r"--out .*ro/digits: cannot write there \(Read-only file system\)"
    with pytest.raises(common.ConversionError, match=says):
        make_digits.main(["--out", str(ro / "digits")])
    assert list(ro.iterdir()) == []  # no lock file, no probe left
    assert common.cannot_write(tmp_path / "fine" / "new") is None
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert common.cannot_write(tmp_path / "link") == (
        f"{tmp_path / 'link'} is a broken symbolic link (to {tmp_path / 'gone'})"
    )
    (tmp_path / "link").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro", "tree"]


SLOW_CONVERTER = """
import runpy, sys, time
from convert import common
real = common.load_rgb
def load_rgb(path, max_resolution):  # a slow decode, so Ctrl-C lands mid-conversion
    time.sleep(0.5)
    return real(path, max_resolution)
common.load_rgb = load_rgb
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", CONVERTER_SCRIPTS, ids=["ffcv", "dali"])
@pytest.mark.parametrize(
    "how, status, what",
    [("ctrl-c", 130, "interrupted"), ("sigterm", 143, "terminated (SIGTERM)")],
)
def test_ctrl_c_or_sigterm_during_a_conversion_is_one_line(script, how, status, what, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C, or SIGTERM to the main
    process alone, as `kill` or a scheduler sends it: the workers stay quiet, the main process
    says one line, and what it says holds: no finished-looking file."""
    import os
    import signal
    import time

    src = small_tree(tmp_path / "tree", ("a", "b", "c"), per_class=4)
    out = tmp_path / "data"
    cmd = [sys.executable, "-c", SLOW_CONVERTER, script, "--src", str(src), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--workers", "2"], cwd=ROOT, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    # Writing has begun: FFCV's file is open under its temporary name; the DALI converter
    # makes shards/ once validation is done.
    started = out / ("train.beton.tmp" if "ffcv" in script else "shards")
    deadline = time.monotonic() + 120
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == status, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"{what}; nothing was finished in {out} (partial files are removed by the next run)"
    )
    assert finished_looking(out) == []
    common.remove_stale_tmp(out)  # what the next run does first
    assert list(out.rglob("*.tmp")) == []


def sigint_ignored(_item=None) -> bool:
    import signal

    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_conversion_workers_leave_ctrl_c_to_the_main_process():
    """A terminal's Ctrl-C reaches every worker too: each would print its own traceback
    (racing the main process, which ends them), so workers ignore SIGINT."""
    import multiprocessing

    workers = common.parallel_map(sigint_ignored, list(range(4)), 2, "t", chunksize=1)
    assert list(workers) == [True] * 4  # validation, and the DALI converter's encoders
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    writer = ctx.Process(  # an FFCV writer worker
        target=imagenet_to_ffcv._worker, args=(lambda q: q.put(sigint_ignored()), queue)
    )
    writer.start()
    assert queue.get(timeout=60) is True
    writer.join(timeout=60)
    assert not sigint_ignored()  # the main process still handles it
