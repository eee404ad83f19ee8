"""The labeled store: labeled images decoded once into raw pixels, built once, never misused,
and the labeled batches both backends cut from it (real CIFAR-10 subset, 32-px crops)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from convert.manifest import load_manifest
from pipelines.config import AugConfig, DataConfig
from pipelines.errors import PipelineError
from pipelines.labeled_store import open_store

ROOT = Path(__file__).resolve().parents[1]
DATA = DataConfig(batch_size=64, classes_per_batch=5, images_per_class=2, n_supervised_views=2)
AUG = AugConfig(n_large=2, large_size=32, n_small=0, small_size=16)
# Whole-image crops and no colour work, views back in 0..255: a view is its image (or mirror).
PLAIN = replace(
    AUG, n_large=1, large_scale=(1.0, 1.0), color_p=0, gray_p=0, blur_p_large=0,
    mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255),
)  # fmt: skip


@pytest.fixture
def log_lines(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.labeled_store")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "pipelines.labeled_store"]


# ---- the store itself, on synthetic images ----


def images_of(samples: np.ndarray) -> list[np.ndarray]:
    """A distinct image per sample, of a size that depends on it."""
    return [
        np.random.default_rng(int(s)).integers(0, 256, (5 + s % 4, 7 + s % 3, 3), dtype=np.uint8)
        for s in samples
    ]


def decoder(samples, calls: list | None = None, delay: float = 0.0):
    """A `make_decode` for `open_store` that records each call."""

    def make():
        if calls is not None:
            calls.append(1)
        time.sleep(delay)
        imgs = images_of(samples)
        return [imgs[i : i + 3] for i in range(0, len(imgs), 3)]

    return make


def store_of(folder: Path, samples, fingerprint="fp", calls=None, delay=0.0):
    return open_store(
        folder, "", "test", [1234], fingerprint, samples, decoder(samples, calls, delay)
    )


def test_store_holds_each_image_and_a_second_open_reuses_it(tmp_path, log_lines):
    samples = np.array([2, 5, 6, 11, 40])
    store = store_of(tmp_path, samples)
    for got, want in zip(store.images(samples), images_of(samples), strict=True):
        np.testing.assert_array_equal(got, want)
    assert store.path.parent == tmp_path / "cache"
    assert any("built" in m for m in log_lines())
    mtime = store.path.stat().st_mtime_ns

    calls: list = []
    again = store_of(tmp_path, samples, calls=calls)
    assert calls == [] and again.path == store.path and store.path.stat().st_mtime_ns == mtime
    assert "reusing" in log_lines()[-1]
    with pytest.raises(PipelineError, match=r"samples \[3\] are not in the labeled store"):
        store.images(np.array([3]))


def test_truncated_or_stale_store_is_rebuilt_with_a_warning(tmp_path, log_lines):
    a, b = np.array([1, 2, 3, 4]), np.array([7, 8, 9, 10])
    store = store_of(tmp_path, a)
    with open(store.path, "r+b") as f:  # truncated (an interrupted copy, a full disk)
        f.truncate(store.path.stat().st_size - 10)
    calls: list = []
    store = store_of(tmp_path, a, calls=calls)
    assert calls == [1] and any("bytes, the index records" in m for m in log_lines())
    np.testing.assert_array_equal(store.images(a)[-1], images_of(a)[-1])

    other = store_of(tmp_path, b)  # other labeled images: another file, then copied over a's
    for suffix in (".u8", ".index.npz"):
        src = other.path.parent / (other.path.name.removesuffix(".u8") + suffix)
        src.replace(store.path.parent / (store.path.name.removesuffix(".u8") + suffix))
    calls.clear()
    store = store_of(tmp_path, a, calls=calls)
    assert calls == [1] and any("other labeled images (stale store)" in m for m in log_lines())
    np.testing.assert_array_equal(store.images(a)[0], images_of(a)[0])

    calls.clear()  # another dataset (train fingerprint): its own store, a's left alone
    fresh = store_of(tmp_path, a, fingerprint="other", calls=calls)
    assert calls == [1] and fresh.path != store.path and store.path.is_file()


def test_killed_build_leaves_no_finished_store(tmp_path):
    child = f"""
import os, signal, sys, numpy as np
sys.path.insert(0, {str(ROOT)!r})
from pipelines.labeled_store import open_store
def chunks():
    yield [np.zeros((4, 4, 3), np.uint8)]
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-build
open_store({str(tmp_path)!r}, "", "test", [1234], "fp", np.array([1, 2]), chunks)
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert out.returncode == -9, out.stderr
    cache = tmp_path / "cache"
    assert not list(cache.glob("*.index.npz")) and not list(cache.glob("*.u8"))
    assert list(cache.glob("*.tmp-*"))  # only temporary names

    calls: list = []
    store = store_of(tmp_path, np.array([1, 2]), calls=calls)
    assert calls == [1] and not list(cache.glob("*.tmp-*"))
    np.testing.assert_array_equal(store.images(np.array([2]))[0], images_of([2])[0])


def test_ranks_starting_together_build_the_store_once(tmp_path):
    samples, calls, stores = np.arange(6), [], []

    def rank():
        stores.append(store_of(tmp_path, samples, calls=calls, delay=0.3))

    threads = [threading.Thread(target=rank) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and len({s.path for s in stores}) == 1
    for s in stores:
        np.testing.assert_array_equal(s.images(samples)[3], images_of(samples)[3])


def test_unwritable_data_folder_falls_back_then_fails_clearly(tmp_path, monkeypatch, log_lines):
    import pipelines.labeled_store as ls

    monkeypatch.setattr(ls, "USER_CACHE", tmp_path / "user-cache")
    (tmp_path / "cache").write_text("not a folder")  # DATA/cache cannot be made
    store = store_of(tmp_path, np.arange(3))
    assert store.path.parent == tmp_path / "user-cache"
    assert any("not writable, using" in m for m in log_lines())
    with pytest.raises(PipelineError, match=r"no cache folder can be written.*--cache-dir"):
        open_store(tmp_path, str(tmp_path / "cache" / "x"), "test", [1], "fp", np.arange(2), None)


# ---- the backends' stores and labeled batches ----


def labeled_split(data_dir, per_class: int = 6) -> np.ndarray:
    """The first `per_class` training images of each class, sorted."""
    labels = np.asarray(load_manifest(data_dir).splits["train"].labels)
    picks = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def build(backend: str, data_dir, aug, cache: Path, data: DataConfig = DATA):
    from pipelines.build import build_pipeline

    data = replace(data, cache_dir=str(cache))
    return build_pipeline(backend, str(data_dir), data, aug, labeled_split(data_dir), device="cpu")


def ffcv_decode(beton: Path, samples) -> list[np.ndarray]:
    """FFCV's own decode of each sample (its ctypes `imdecode`), ``[H, W, 3]`` each."""
    from ffcv.libffcv import imdecode
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    meta = reader.metadata["f0"]
    table = reader.alloc_table
    size_at = dict(zip(table["ptr"].tolist(), table["size"].tolist(), strict=True))
    raw = np.memmap(beton, dtype=np.uint8, mode="r")
    out = []
    for i in samples:
        ptr, h, w = int(meta["data_ptr"][i]), int(meta["height"][i]), int(meta["width"][i])
        dst = np.empty((h, w, 3), np.uint8)
        assert imdecode(np.array(raw[ptr : ptr + size_at[ptr]]), dst, h, w, h, w) == 0
        out.append(dst)
    return out


def dali_decode(pipe, samples) -> list[np.ndarray]:
    """DALI's CPU decode of each sample's JPEG bytes from the shards, ``[H, W, 3]`` each."""
    from nvidia.dali import fn, pipeline_def, types

    jpegs = [pipe.shards.read(i) for i in samples]

    @pipeline_def(batch_size=len(jpegs), num_threads=1, device_id=None)
    def graph():
        return fn.decoders.image(fn.external_source(lambda: jpegs), output_type=types.RGB)

    p = graph()
    p.build()
    (out,) = p.run()
    return [np.array(out[k]) for k in range(len(jpegs))]


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_store_holds_what_the_backend_decodes_and_is_built_once(
    backend, cifar_dataset, tmp_path, log_lines
):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    samples = labeled_split(cifar_dataset)
    pipe = build(backend, cifar_dataset, AUG, tmp_path)
    store = pipe.labeled_crops.store if backend == "ffcv" else pipe.store
    if backend == "ffcv":
        want = ffcv_decode(cifar_dataset / "train.beton", samples)
    else:
        want = dali_decode(pipe, samples)
    pipe.close()
    assert np.array_equal(store.samples, samples)
    for got, ref in zip(store.images(samples), want, strict=True):
        np.testing.assert_array_equal(got, ref)
    assert sum("built" in m for m in log_lines()) == 1

    mtime = store.path.stat().st_mtime_ns
    build(backend, cifar_dataset, AUG, tmp_path).close()
    assert sum("built" in m for m in log_lines()) == 1 and "reusing" in log_lines()[-1]
    assert store.path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_labeled_views_are_the_images_of_their_indices_with_true_labels(
    backend, cifar_dataset, tmp_path
):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    truth = np.asarray(load_manifest(cifar_dataset).splits["train"].labels)
    pipe = build(backend, cifar_dataset, PLAIN, tmp_path, replace(DATA, n_supervised_views=1))
    store = pipe.labeled_crops.store if backend == "ffcv" else pipe.store
    batches = [b for _, b in zip(range(3), pipe, strict=False)]
    pipe.close()
    for b in batches:
        ix = b.labeled_indices.numpy()
        np.testing.assert_array_equal(b.labels.numpy(), truth[ix])
        classes, counts = np.unique(b.labels.numpy(), return_counts=True)
        assert len(classes) == DATA.classes_per_batch and (counts == DATA.images_per_class).all()
        view = b.labeled_views[0].permute(0, 2, 3, 1)  # [C*K, 32, 32, 3], 0..255
        refs = torch.from_numpy(np.stack(store.images(ix))).float()  # [C*K, 32, 32, 3]
        err = torch.minimum(
            (view - refs).abs().amax(dim=(1, 2, 3)), (view.flip(2) - refs).abs().amax(dim=(1, 2, 3))
        )  # [C*K]
        assert err.max() < 0.01, err  # the stored pixels themselves, whole (or mirrored)


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_labeled_views_differ_and_a_repeated_image_is_cropped_afresh(
    backend, cifar_dataset, tmp_path
):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    pipe = build(backend, cifar_dataset, AUG, tmp_path)
    batches = list(pipe)
    pipe.close()
    first: dict[int, torch.Tensor] = {}
    repeats = 0
    for b in batches:
        a, c = (v.flatten(1) for v in b.labeled_views)  # [C*K, D] each
        assert ((a - c).abs().amax(1) > 1e-3).all()  # an image's two views differ
        for i, sample in enumerate(b.labeled_indices.tolist()):
            if sample in first:
                assert (first[sample] - a[i]).abs().amax() > 1e-3
                repeats += 1
            else:
                first[sample] = a[i]
    assert repeats > 0  # 60 labeled images, 10 per step: images come back within the epoch
