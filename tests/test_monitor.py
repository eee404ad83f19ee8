"""The online monitor inside training: a tiny real-data run (CIFAR subset, FFCV) evaluates
before its first step and after every epoch, logs one line each time, writes eval records
that line up with the training records, plots them, and keeps them consistent on resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_train import load_train

# A tiny ResNet-18 on 16-px views of the real CIFAR subset: 600 train images, 9 steps/epoch.
TINY_FFCV = [
    "--pipeline", "ffcv", "--labels", "10pct", "--device", "cpu",
    "--arch", "resnet18", "--hidden-dim", "32", "--out-dim", "16", "--head-layers", "2",
    "--large-size", "16", "--n-small", "0", "--batch-size", "64", "--classes-per-batch", "5",
    "--images-per-class", "2", "--log-interval", "4", "--num-workers", "2",
    "--blur-p-large", "0", "--eval-size", "16", "--eval-resize", "16",
    "--monitor-every", "1", "--monitor-val-subset", "50",
]  # fmt: skip


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory, cifar_dataset):
    """One epoch, then resumed to two: the captured log of both calls and the run folder."""
    out = tmp_path_factory.mktemp("monitored") / "run"
    train = load_train()
    args = [*TINY_FFCV, "--data", str(cifar_dataset), "--out", str(out)]
    logs = []
    for extra in (["--epochs", "1"], ["--epochs", "2", "--resume"]):
        train.close_logging()
        assert train.main([*args, *extra]) == 0
        logs.append((out / "train.log").read_text())
    return out, logs


def test_monitor_evaluates_at_start_and_after_each_epoch_through_a_resume(monitored_run):
    run, _ = monitored_run
    recs = records(run)
    evals = [r for r in recs if r.get("event") == "eval"]
    assert [r["epoch"] for r in evals] == [-1, 0, 1]  # no duplicate start eval on resume
    assert [r["step"] for r in evals] == [0, 9, 18]
    assert evals[0]["images"] == evals[0]["flops"] == 0
    for r in evals:
        assert all(0 <= r[k] <= 100 for k in ("snn_top1", "snn_top5", "knn_top1", "knn_top5"))
        assert r["snn_top5"] >= r["snn_top1"] and r["eval_seconds"] > 0

    # Each eval carries the counts of the training record logged at the same step.
    train_at = {r["step"]: r for r in recs if "l_unsup" in r}
    for r in evals[1:]:
        assert (r["images"], r["flops"]) == (
            train_at[r["step"]]["images"],
            train_at[r["step"]]["flops"],
        )
    assert [r["step"] for r in recs] == sorted(r["step"] for r in recs)


def test_monitor_logs_one_eval_line_and_adds_an_accuracy_panel(monitored_run):
    run, logs = monitored_run
    assert "eval start | snn top1 " in logs[0] and "eval ep 0 | snn top1 " in logs[0]
    assert "eval ep 1 | snn top1 " in logs[1] and " | knn top1 " in logs[1]
    assert "monitor: SNN/kNN every 1 epoch(s) | bank 60 labeled images | 50 val images" in logs[0]
    with Image.open(run / "metrics.png") as png:
        assert png.size[1] == 3 * 3 * 80  # three 3-inch panels at 80 dpi: loss, LR, accuracy
    csv_header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "snn_top1" not in csv_header  # the CSV keeps one row per log step


def test_monitor_without_val_images_fails_before_training(cifar_dataset, tmp_path, capsys):
    train = load_train()
    synthetic = ["--pipeline", "synthetic", "--data", "none", "--monitor-every", "2"]
    assert train.main([*synthetic, "--out", str(tmp_path / "s")]) == 2
    assert "--monitor-every" in capsys.readouterr().err

    # A dataset converted without a val/ folder.
    no_val = tmp_path / "no-val"
    no_val.mkdir()
    shutil.copy(cifar_dataset / "train.beton", no_val)
    manifest = json.loads((cifar_dataset / "manifest.json").read_text())
    del manifest["splits"]["val"]
    (no_val / "manifest.json").write_text(json.dumps(manifest))
    args = [*TINY_FFCV, "--data", str(no_val), "--out", str(tmp_path / "r"), "--epochs", "1"]
    train.close_logging()
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "--monitor-every 1" in err and "no val split" in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
