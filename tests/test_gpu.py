"""The CUDA paths: both pipelines delivering on the device (FFCV's views cut and augmented on
the device, DALI's `mixed` decode), AMP fp16 and bf16 training with channels-last, and the
benchmark's device-memory column. The whole module skips where torch sees no CUDA device.

Limitation: no GPU was lent to the session that wrote these tests, so they have not yet run;
the first session with a GPU must run them (`scripts/device_check.sh` does, with the GPU
benchmark) and fix what it finds.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from test_train import TINY, load_train  # noqa: E402

CUDA_TINY = [a if a != "cpu" else "cuda" for a in TINY]  # the synthetic run, on the GPU


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pipelines_deliver_channels_last_views_on_the_gpu_in_the_asked_dtype(
    cifar_dataset, backend, dtype
):
    pytest.importorskip({"ffcv": "ffcv", "dali": "nvidia.dali"}[backend])
    from convert.manifest import load_manifest
    from pipelines.build import build_pipeline
    from pipelines.config import AugConfig, DataConfig

    data = DataConfig(batch_size=32, classes_per_batch=5, images_per_class=2, num_workers=2)
    aug = AugConfig(n_large=2, large_size=32, n_small=2, small_size=16)
    n = load_manifest(cifar_dataset).splits["train"].num_samples
    p = build_pipeline(
        backend, str(cifar_dataset), data, aug, np.arange(n), device="cuda", dtype=dtype
    )
    try:
        p.set_epoch(0)
        b = next(iter(p))
    finally:
        p.close()
    assert len(b.unlabeled_views) == 4 and len(b.labeled_views) == 1
    for x in b.unlabeled_views + b.labeled_views:
        assert x.device.type == "cuda" and x.dtype == dtype
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(x.float()).all()
        assert -4 < x.float().mean().item() < 4  # normalised, not 0..255
    assert b.labels.device.type == "cuda" and b.labels.shape == (10,)
    assert b.labels.unique().numel() == 5


def test_ffcv_cuts_the_views_on_the_gpu_close_to_the_workers_cut(cifar_dataset):
    pytest.importorskip("ffcv")
    from dataclasses import replace

    from pipelines.config import AugConfig, DataConfig
    from pipelines.ffcv_ops import cut_on_device, unpack_rows
    from pipelines.ffcv_pipeline import FFCVPipeline

    data = DataConfig(batch_size=32, num_workers=2)
    aug = AugConfig(n_large=2, large_size=32, n_small=2, small_size=16)
    none = np.empty(0, dtype=np.int64)
    gpu = FFCVPipeline(str(cifar_dataset), data, aug, none, device="cuda")  # crops auto
    host = FFCVPipeline(str(cifar_dataset), replace(data, crops="host"), aug, none, device="cuda")
    assert gpu.unlabeled_decoder.cut == "device" and host.unlabeled_decoder.cut == "host"
    g_steps, h_steps = gpu.host_batches(), host.host_batches()
    try:
        g_rows, h_rows = next(g_steps)[0].cuda(), next(h_steps)[0].cuda()
        g_crops, g_index = cut_on_device(g_rows, gpu.unlabeled_decoder, [2, 2])
        h_crops, h_index = unpack_rows(h_rows, host.unlabeled_decoder, [2, 2])
    finally:
        g_steps.close()
        h_steps.close()
        gpu.close()
        host.close()
    assert torch.equal(g_index, h_index)
    for g, h in zip(g_crops, h_crops, strict=True):
        assert g.device.type == "cuda" and g.shape == h.shape
        assert (g - h.float() / 255).abs().mean().item() < 0.03  # interpolation only


def test_a_host_batch_reaches_the_gpu_before_its_pinned_buffer_is_refilled():
    """As FFCV's output slots: pinned, refilled on the CPU once a later batch is taken, while
    the compute stream is still busy with earlier steps."""
    from pipelines.common import HostToDevice

    upload = HostToDevice("cuda")
    host = torch.empty(1 << 24, dtype=torch.uint8).pin_memory()  # [16 MiB]
    a = torch.randn(4096, 4096, device="cuda")
    busy = torch.empty_like(a)
    for k in range(4):
        host.fill_(k)
        for _ in range(50):  # tens of ms of queued compute ahead of any copy on that stream
            torch.mm(a, a, out=busy)
        x = upload(host)
        host.fill_(255)  # the loader refills the slot
        assert x.device.type == "cuda" and bool((x == k).all()), k


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_amp_training_on_the_gpu_gives_finite_losses_and_a_checkpoint(tmp_path, precision):
    out = tmp_path / precision
    args = [*CUDA_TINY, "--precision", precision, "--epochs", "1", "--out", str(out)]
    assert load_train().main(args) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "l_unsup" in r]
    assert steps and all(np.isfinite(r["l_unsup"]) and np.isfinite(r["l_sup"]) for r in steps)
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (state["scaler"] is not None) == (precision == "fp16")  # GradScaler for fp16 only


def test_benchmark_on_the_gpu_reports_peak_device_memory(tmp_path):
    out = tmp_path / "bench"
    args = [*CUDA_TINY, "--out", str(out), "--benchmark", "--bench-warmup", "1"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert load_train().main([*args, "--bench-steps", "2"]) == 0
    result = json.loads((out / "benchmark.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    full = [r for name, r in rows.items() if name.startswith("full step")]
    model = [r for name, r in rows.items() if name.startswith("model alone")]
    assert full and model
    for r in full + model:
        assert r["device_mb"] is not None and r["device_mb"] > 0
