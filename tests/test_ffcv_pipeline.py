"""The FFCV backend on the real CIFAR-10 subset (10 classes x 60, stored at 32 px).

FFCV compiles per process, so the module shares one pipeline (`pipe`) and builds the other
view configurations once each; crops are 32 / 16 px to keep the tests fast on a CPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from convert.manifest import load_manifest
from pipelines.common import epoch_order
from pipelines.config import AugConfig, DataConfig
from pipelines.errors import PipelineError
from pipelines.ffcv_ops import cut_on_device, row_boxes, unpack_rows
from pipelines.ffcv_pipeline import FFCVPipeline

DATA = DataConfig(batch_size=64, classes_per_batch=5, images_per_class=2, num_workers=2)
AUG = AugConfig(n_large=2, large_size=32, n_small=6, small_size=16)


def labeled_split(data_dir, per_class: int = 6) -> np.ndarray:
    """The first `per_class` training images of each class, sorted."""
    labels = np.asarray(load_manifest(data_dir).splits["train"].labels)
    picks = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def all_views(batch) -> list[torch.Tensor]:
    """A batch's unlabeled views, then its labeled ones."""
    return batch.unlabeled_views + batch.labeled_views


@pytest.fixture(scope="module")
def pipe(cifar_dataset):
    p = FFCVPipeline(
        str(cifar_dataset), DATA, AUG, labeled_split(cifar_dataset), device="cpu", seed=3
    )
    yield p
    p.close()


@pytest.fixture(scope="module")
def epoch1(pipe):
    pipe.set_epoch(1)
    return list(pipe)


def test_batches_have_configured_views_shapes_and_layout(pipe, epoch1):
    b = epoch1[0]
    sizes = [32, 32] + [16] * 6
    assert [v.shape for v in b.unlabeled_views] == [(64, 3, s, s) for s in sizes]
    assert [v.shape for v in b.labeled_views] == [(10, 3, 32, 32)]
    for v in all_views(b):
        assert v.dtype == torch.float32 and v.device.type == "cpu"
        assert v.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(v).all()
    assert b.indices.shape == (64,) and b.indices.dtype == torch.int64
    assert b.labels.shape == (10,) and b.labeled_indices.shape == (10,)


def test_every_view_of_an_image_differs(epoch1):
    b = epoch1[0]
    for group in (b.unlabeled_views[:2], b.unlabeled_views[2:]):
        flat = torch.stack([v.reshape(64, -1) for v in group], 1)  # [B, V, D]
        dist = torch.cdist(flat, flat)  # [B, V, V]
        off = ~torch.eye(len(group), dtype=torch.bool)
        assert (dist[:, off] > 1e-3).all()


def test_epoch_visits_each_image_once(pipe, epoch1):
    seen = torch.cat([b.indices for b in epoch1]).numpy()
    assert len(epoch1) == len(pipe) == 600 // 64
    assert len(np.unique(seen)) == len(seen) == len(pipe) * 64
    assert seen.min() >= 0 and seen.max() < 600


def test_labeled_batches_hold_c_classes_times_k(epoch1):
    for b in epoch1:
        classes, counts = np.unique(b.labels.numpy(), return_counts=True)
        assert len(classes) == DATA.classes_per_batch
        assert (counts == DATA.images_per_class).all()


def test_labeled_stream_follows_sampler_and_manifest(pipe, cifar_dataset, epoch1):
    labels = np.asarray(load_manifest(cifar_dataset).splits["train"].labels)
    expected = pipe.labeled_batches(1)  # [steps, C*K]
    allowed = set(labeled_split(cifar_dataset).tolist())
    for step, b in enumerate(epoch1):
        got = b.labeled_indices.numpy()
        assert np.array_equal(got, expected[step])
        assert set(got.tolist()) <= allowed
        assert np.array_equal(b.labels.numpy(), labels[got])


def test_three_epochs_give_the_same_number_of_batches(pipe):
    counts = []
    for epoch in (4, 5, 6):
        pipe.set_epoch(epoch)
        counts.append(sum(1 for _ in pipe))
    assert counts == [len(pipe)] * 3


def test_same_seed_and_epoch_give_identical_batches(pipe, epoch1):
    pipe.set_epoch(1)
    again = next(iter(pipe))
    first = epoch1[0]
    assert torch.equal(again.indices, first.indices)
    assert torch.equal(again.labeled_indices, first.labeled_indices)
    for a, b in zip(all_views(again), all_views(first), strict=True):
        assert torch.equal(a, b)
    pipe.set_epoch(2)
    other = next(iter(pipe))
    assert not torch.equal(other.indices, first.indices)


@pytest.fixture(scope="module")
def device_cut(cifar_dataset):
    """The same pipeline as `pipe` with the views cut where the batches go (a GPU run's way),
    here on the CPU."""
    data = replace(DATA, crops="device")
    p = FFCVPipeline(
        str(cifar_dataset), data, AUG, labeled_split(cifar_dataset), device="cpu", seed=3
    )
    yield p
    p.close()


def test_auto_cuts_on_the_workers_for_a_cpu_run_and_the_log_says_where(
    pipe, device_cut, cifar_dataset, caplog
):
    assert pipe.unlabeled_decoder.cut == pipe.labeled_decoder.cut == "host"
    assert device_cut.unlabeled_decoder.cut == device_cut.labeled_decoder.cut == "device"
    with caplog.at_level("INFO"):
        for crops in ("auto", "device"):
            data = replace(DATA, crops=crops)
            none = np.empty(0, dtype=np.int64)
            FFCVPipeline(str(cifar_dataset), data, AUG, none, device="cpu").close()
    ready = [r.getMessage() for r in caplog.records if "pipeline ready" in r.getMessage()]
    assert "(views cut by the workers)" in ready[0] and "(views cut on the device)" in ready[1]


def test_device_cut_gives_the_workers_crops_up_to_interpolation(pipe, device_cut):
    """Same boxes either way: the crops differ only by the resize (OpenCV area vs roi_align)."""
    counts = [AUG.n_large, AUG.n_small]
    for p in (pipe, device_cut):
        p.set_epoch(1)
    host, dev = pipe.host_batches(), device_cut.host_batches()
    (h_rows, h_lab), (d_rows, d_lab) = next(host), next(dev)
    try:
        for decoders, rows, n in (
            ((pipe.unlabeled_decoder, device_cut.unlabeled_decoder), (h_rows, d_rows), counts),
            ((pipe.labeled_decoder, device_cut.labeled_decoder), (h_lab, d_lab), [1]),
        ):
            h_crops, h_index = unpack_rows(rows[0], decoders[0], n)
            d_crops, d_index = cut_on_device(rows[1], decoders[1], n)
            assert torch.equal(h_index, d_index)
            for a, b in zip(h_crops, d_crops, strict=True):
                assert a.shape == b.shape and b.dtype == torch.float32
                assert 0 <= b.min() and b.max() <= 1
                diff = (a.float() / 255 - b).abs().mean(dim=(1, 2, 3))  # [n*B]
                # interpolation only (most at tiny CIFAR boxes blown up to 16 or 32 px)
                assert diff.median() < 0.03 and diff.max() < 0.1, diff
                wrong = (a.float() / 255 - b.roll(1, 0)).abs().mean(dim=(1, 2, 3))
                assert wrong.median() > 3 * diff.median()  # another image's crop is far off
    finally:
        host.close()
        dev.close()


def test_device_cut_rows_hold_the_views_region_its_edge_and_in_bounds_boxes(device_cut):
    dec = device_cut.unlabeled_decoder
    assert dec.plane == (33, 33)  # CIFAR's 32 px, plus the repeated edge
    device_cut.set_epoch(0)
    steps = device_cut.host_batches()
    rows, _ = next(steps)
    steps.close()
    b, n_views = rows.shape[0], len(dec.view_size)
    plane = rows[:, : 33 * 33 * 3].view(b, 33, 33, 3)
    raw = rows[:, dec.box_offset : dec.box_offset + 16 * n_views + 8].contiguous()
    rh, rw = raw.view(torch.int32).view(b, -1)[:, -2:].unbind(-1)  # the region's size, [B]
    boxes = row_boxes(rows, dec)  # [B, V, 4], in plane coordinates
    i, j, h, w = boxes.unbind(-1)
    assert (i >= 0).all() and (j >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (i + h <= rh[:, None]).all() and (j + w <= rw[:, None]).all()
    assert (rh <= 32).all() and (rw <= 32).all() and (rw < 32).any()  # some regions are parts
    assert len({tuple(x) for x in boxes.reshape(-1, 4).tolist()}) > b  # boxes vary
    for k in range(b):  # the region's last column and row, repeated once beyond it
        y, x = int(rh[k]), int(rw[k])
        assert torch.equal(plane[k, :y, x], plane[k, :y, x - 1])
        assert torch.equal(plane[k, y, : x + 1], plane[k, y - 1, : x + 1])


def test_device_cut_batches_match_the_contract(pipe, device_cut, epoch1):
    device_cut.set_epoch(1)
    got, want = next(iter(device_cut)), epoch1[0]
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.labels, want.labels)
    for a, b in zip(all_views(got), all_views(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert a.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(a).all()


def test_both_streams_of_both_cuts_share_one_compiled_kernel(cifar_dataset):
    # In a fresh process (a signature compiled or loaded elsewhere would blur the count), a
    # pipeline per cut, both streams on: the labeled stream calls the kernel the FFCV loader
    # compiled (or loaded from numba's cache), with the same argument types, so each kernel
    # holds one signature; a second one would be seconds of compilation in every new process.
    child = f"""
import numpy as np
from dataclasses import replace
from pipelines import ffcv_ops
from pipelines.config import AugConfig, DataConfig
from pipelines.ffcv_pipeline import FFCVPipeline
data = {DATA!r}
for crops in ("host", "device"):
    p = FFCVPipeline({str(cifar_dataset)!r}, replace(data, crops=crops), {AUG!r},
                     np.arange(0, 600, 3), device="cpu")
    b = next(iter(p))
    assert len(b.labeled_views) == 1
print("signatures", len(ffcv_ops._multicrop_kernel.signatures),
      len(ffcv_ops._image_kernel.signatures))
"""
    out = subprocess.run(
        [sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("signatures")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    assert lines[-1] == "signatures 1 1"


def test_torch_thread_count_is_left_alone(pipe, epoch1):
    before = torch.get_num_threads()
    pipe.set_epoch(0)
    next(iter(pipe))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("n_large", "n_small", "labeled"), [(2, 0, False), (2, 10, True)], ids=["2x0-unlabeled", "2x10"]
)
def test_view_counts_follow_config(cifar_dataset, n_large, n_small, labeled):
    aug = replace(AUG, n_large=n_large, n_small=n_small)
    split = labeled_split(cifar_dataset) if labeled else np.array([], dtype=np.int64)
    p = FFCVPipeline(str(cifar_dataset), DATA, aug, split, device="cpu")
    b = next(iter(p))
    assert [v.shape[-1] for v in b.unlabeled_views] == [32] * n_large + [16] * n_small
    if labeled:
        assert len(b.labeled_views) == DATA.n_supervised_views
    else:
        assert b.labeled_views == [] and b.labels.numel() == 0
    p.close()


def test_delivered_images_are_those_of_their_index(cifar_dataset, cifar_tree):
    """Full-image crops, no augmentation but flips: each view matches its index's JPEG."""
    aug = replace(
        AUG, n_large=1, n_small=0, large_scale=(1.0, 1.0), color_p=0, gray_p=0, blur_p_large=0
    )
    aug = replace(aug, mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))  # back to 0..255
    data = replace(DATA, batch_size=16)
    p = FFCVPipeline(str(cifar_dataset), data, aug, np.array([], dtype=np.int64), device="cpu")
    b = next(iter(p))
    p.close()

    files = load_manifest(cifar_dataset).splits["train"].files
    view = b.unlabeled_views[0].permute(0, 2, 3, 1)  # [16, 32, 32, 3], 0..255
    refs = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(cifar_tree / "train" / files[i]).convert("RGB")))
            for i in b.indices.tolist()
        ]
    ).float()  # [16, 32, 32, 3]
    err = torch.minimum(
        (view - refs).abs().mean(dim=(1, 2, 3)), (view.flip(2) - refs).abs().mean(dim=(1, 2, 3))
    )  # [16]
    assert err.max() < 8, err  # JPEG re-encoding noise only
    shuffled = (view - refs.roll(1, 0)).abs().mean(dim=(1, 2, 3))  # [16]: wrong images
    assert shuffled.min() > err.max()


def test_epoch_order_splits_ranks_disjointly():
    parts = [epoch_order(101, 0, 3, r, 4) for r in range(4)]
    assert all(len(p) == 26 for p in parts)  # ceil(101 / 4), padded
    flat = np.concatenate(parts)
    assert set(flat.tolist()) == set(range(101))
    assert len(np.unique(flat)) == 101  # only the 3 padding entries repeat
    assert np.array_equal(epoch_order(101, 0, 3, 1, 4), parts[1])
    assert not np.array_equal(epoch_order(101, 0, 4, 1, 4), parts[1])


def test_missing_beton_is_a_clear_error(cifar_dataset, tmp_path):
    shutil.copy(cifar_dataset / "manifest.json", tmp_path / "manifest.json")
    with pytest.raises(
        PipelineError, match=r"train.beton: (no such file|missing).*imagenet_to_ffcv"
    ):
        FFCVPipeline(str(tmp_path), DATA, AUG, np.array([0]), device="cpu")


def test_beton_of_another_conversion_is_a_clear_error(cifar_dataset, tmp_path):
    shutil.copy(cifar_dataset / "train.beton", tmp_path / "train.beton")
    manifest = json.loads((cifar_dataset / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    train["labels"] = train["labels"][1:] + train["labels"][:1]  # same count, other labels
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="labels differ from manifest"):
        FFCVPipeline(str(tmp_path), DATA, AUG, np.array([0]), device="cpu")

    train["labels"], train["files"] = train["labels"][:-1], train["files"][:-1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="599"):
        FFCVPipeline(str(tmp_path), DATA, AUG, np.array([0]), device="cpu")
