"""Evaluation end to end on the real CIFAR subset: the centre-crop loader, evaluate.py and
finetune.py on a tiny saved checkpoint, and the online monitor.

A tiny ResNet-18 (small stem) on 8-px views keeps the forward passes cheap on a CPU; FFCV
compiles each centre-crop loader once per loader (a few seconds), so tests share them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # evaluate.py and finetune.py sit at the root
    sys.path.insert(0, str(ROOT))

SIDE = 8  # evaluation and crop side of the tiny model
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def load_script(name: str):
    """A root-level script (evaluate.py, finetune.py) as a module."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def tiny_config(data_dir: Path):
    from model.config import ModelConfig
    from runner import config as rc

    cfg = rc.TrainConfig()
    aug = replace(
        cfg.aug, large_size=SIDE, eval_size=SIDE, eval_resize=SIDE, mean=CIFAR_MEAN, std=CIFAR_STD
    )
    model = ModelConfig(arch="resnet18", small_stem=True, hidden_dim=64, out_dim=32)
    data = replace(cfg.data, data=str(data_dir), labels="10pct")
    return replace(cfg, aug=aug, model=model, data=data)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a small, shared CPU two threads can run 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cifar_dataset) -> Path:
    """A run folder as train.py leaves it: checkpoint.pt (random weights) and labels.txt."""
    from convert.manifest import load_manifest
    from convert.splits import resolve_split, write_split
    from model.encoder import build_model
    from runner import config as rc
    from runner.checkpoint import save_checkpoint

    run = tmp_path_factory.mktemp("evalrun")
    cfg = tiny_config(cifar_dataset)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(run, model=model, optimizer=opt, scaler=None, epoch=1, step=3,
                    config=rc.to_dict(cfg))  # fmt: skip
    manifest = load_manifest(cifar_dataset)
    write_split(run / "labels.txt", manifest, resolve_split(manifest, "10pct", seed=0))
    return run


def test_center_crop_loader_yields_requested_samples_in_order_with_true_labels(cifar_dataset):
    from PIL import Image

    from convert.manifest import load_manifest
    from pipelines.config import AugConfig
    from pipelines.eval_loader import CenterCropLoader

    manifest = load_manifest(cifar_dataset)
    aug = AugConfig(eval_size=24, eval_resize=32, mean=CIFAR_MEAN, std=CIFAR_STD)
    order = np.array([599, 3, 250, 17, 42, 0, 311])  # any order, a tail batch of 3
    loader = CenterCropLoader(cifar_dataset, "train", order, aug, batch_size=4)
    batches = list(loader)

    assert [b.images.shape[0] for b in batches] == [4, 3] and len(loader) == 2
    images = torch.cat([b.images for b in batches])  # [7, 3, 24, 24]
    assert images.shape == (7, 3, 24, 24) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.cat([b.indices for b in batches]).tolist() == order.tolist()
    true = [manifest.splits["train"].labels[i] for i in order]
    assert torch.cat([b.labels for b in batches]).tolist() == true

    # The centre 24 px of the stored 32-px image (CIFAR images are 32 x 32: no resize).
    files = manifest.splits["train"].files
    pixels = (
        images * torch.tensor(CIFAR_STD)[:, None, None] + torch.tensor(CIFAR_MEAN)[:, None, None]
    )
    for k in (0, 6):
        src = Image.open(Path(manifest.source) / "train" / files[order[k]]).convert("RGB")
        ref = torch.from_numpy(np.array(src)[4:28, 4:28]).permute(2, 0, 1).float() / 255
        # JPEG decoders differ slightly (libjpeg-turbo vs PIL's): compare loosely.
        assert (pixels[k] - ref).abs().mean() < 0.03


def test_evaluate_command_writes_snn_and_knn_top1_top5(tiny_run, cifar_dataset, capsys):
    evaluate = load_script("evaluate")
    out = tiny_run / "eval.json"
    args = ["--checkpoint", str(tiny_run / "checkpoint.pt"), "--embedding", "all"]
    assert evaluate.main([*args, "--out", str(out), "--batch-size", "64"]) == 0

    record = json.loads(out.read_text())
    assert record["n_labeled"] == 60 and record["n_val"] == 100  # 10% of 10 x 60; 10 x 10
    assert record["epoch"] == 1 and record["data"] == str(cifar_dataset)
    assert record["bank_classes"] == 10
    for name in ("backbone", "head"):
        accs = record["results"][name]
        assert set(accs) == {"snn_top1", "snn_top5", "knn_top1", "knn_top5"}
        assert all(0 <= v <= 100 for v in accs.values())
        assert accs["snn_top5"] >= accs["snn_top1"]
    assert "snn_top1" in capsys.readouterr().out


def test_results_a_full_disk_refuses_are_said_not_written(tmp_path, capsys, monkeypatch):
    import errno

    import runner.metrics

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner.metrics, "write_json", full)
    record = {"n_labeled": 1, "results": {"backbone": {"snn_top1": 50.0}}}
    assert load_script("evaluate").save_results(record, tmp_path / "eval.json") == 1
    err = capsys.readouterr().err
    assert err == (f"error: results not written to {tmp_path / 'eval.json'} (No space left on "
                   "device); they are printed above\n")  # fmt: skip


def test_evaluate_gives_full_accuracy_when_the_bank_holds_the_queries(tiny_run, cifar_dataset):
    """Labeled set = every val image's twin: with the val split as its own bank, each query's
    nearest neighbour is itself, so kNN top-1 (k=1) is 100% through the whole command path."""
    from evaluate import load_run
    from pipelines.eval_loader import CenterCropLoader
    from runner.monitor import NeighbourConfig, embed, neighbour_accuracy

    cfg, model, _ = load_run(tiny_run / "checkpoint.pt")
    val = embed(model, CenterCropLoader(cifar_dataset, "val", None, cfg.aug, batch_size=64))
    nb = NeighbourConfig(snn_temperature=0.001, knn_k=1)
    acc = neighbour_accuracy(val.backbone, val.labels, val.backbone, val.labels, 10, cfg=nb)
    assert acc["knn_top1"] == 100.0 and acc["snn_top1"] == 100.0


def test_evaluate_reports_a_missing_split_file(tiny_run, tmp_path, capsys):
    evaluate = load_script("evaluate")
    lonely = tmp_path / "checkpoint.pt"
    lonely.write_bytes((tiny_run / "checkpoint.pt").read_bytes())
    assert evaluate.main(["--checkpoint", str(lonely)]) == 2
    assert "labels.txt" in capsys.readouterr().err


def test_a_missing_or_unreadable_checkpoint_is_named_by_its_option(tiny_run, tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    for script in ("evaluate", "finetune"):
        main = load_script(script).main
        for path, says in (
            (tmp_path / "none.pt", "no checkpoint at"),
            (tmp_path / "notes.pt", "cannot read"),
        ):
            assert main(["--checkpoint", str(path)]) == 2
            err = capsys.readouterr().err
            assert f"--checkpoint: {says}" in err and str(path) in err, (script, err)
            assert "--resume" not in err and "--force" not in err, (script, err)


@pytest.mark.parametrize(
    "script, extra, says",
    [
        ("evaluate", ["--snn-temperature", "0"], "--snn-temperature"),
        ("evaluate", ["--snn-temperature", "nan"], "--snn-temperature"),
        ("finetune", ["--lr", "inf"], "--lr"),
        ("evaluate", ["--knn-temperature", "-1"], "--knn-temperature"),
        ("evaluate", ["--knn-k", "0"], "--knn-k"),
        ("evaluate", ["--batch-size", "0"], "--batch-size"),
        ("finetune", ["--momentum", "2"], "--momentum"),
        ("finetune", ["--lr", "0"], "--lr"),
        ("finetune", ["--epochs", "0"], "--epochs"),
        ("finetune", ["--weight-decay", "-1"], "--weight-decay"),
        ("finetune", ["--seed", "-1"], "--seed"),
        ("finetune", ["--seed", str(2**63)], "--seed"),
    ],
)
def test_bad_evaluation_options_fail_before_work_naming_the_option(
    tiny_run, script, extra, says, capsys
):
    main = load_script(script).main
    assert main(["--checkpoint", str(tiny_run / "checkpoint.pt"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err


def test_an_out_that_is_a_folder_or_below_a_file_fails_before_work(tiny_run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for script in ("evaluate", "finetune"):
        for out, says in ((tmp_path, "is a folder"), (tmp_path / "file" / "r.json", "is a file")):
            args = ["--checkpoint", str(tiny_run / "checkpoint.pt"), "--out", str(out)]
            assert load_script(script).main(args) == 2
            err = capsys.readouterr().err
            assert f"--out {out}: " in err and says in err, (script, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no .tmp left


def test_an_out_that_cannot_be_written_fails_before_work(
    tiny_run, tmp_path, monkeypatch, capsys, unwritable
):
    """A read-only run folder (the default results file is written beside the checkpoint) or
    an --out in /proc: one line naming --out and the path, status 2, before the checkpoint is
    even read, not after a 30-epoch fine-tune whose results would then exist only on stdout."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((tiny_run / "checkpoint.pt").read_bytes())
    unwritable(run)
    for script in ("evaluate", "finetune"):
        module = load_script(script)
        monkeypatch.setattr(module, "load_run", lambda *a, **k: pytest.fail("work started"))
        ckpt = ["--checkpoint", str(run / "checkpoint.pt")]
        assert module.main(ckpt) == 2
        err = capsys.readouterr().err
        default = run / f"{'eval' if script == 'evaluate' else 'finetune'}-checkpoint.json"
        assert err.startswith(f"error: --out {default} (the default, beside the checkpoint): ")
        assert "cannot write there (Read-only file system); pass --out FILE" in err, err
        assert len(err.splitlines()) == 1, err

        out = Path("/proc/suncet-test-results.json")  # not even root creates files there
        assert module.main([*ckpt, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}: cannot write there ("), err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]  # no probe left


def test_finetune_that_diverges_fails_naming_the_epoch_and_lr(tiny_run, tmp_path, capsys):
    finetune = load_script("finetune")
    out = tmp_path / "ft.json"
    args = ["--checkpoint", str(tiny_run / "checkpoint.pt"), "--out", str(out), "--epochs", "2"]
    assert finetune.main([*args, "--batch-size", "20", "--lr", "1e6"]) == 1
    err = capsys.readouterr().err
    assert "error: fine-tuning diverged in epoch" in err and "lower --lr (now 1e+06)" in err
    assert not out.exists()  # no result written as if it were one


def test_finetune_learns_the_labeled_images_above_chance(tiny_run):
    finetune = load_script("finetune")
    out = tiny_run / "finetune.json"
    args = ["--checkpoint", str(tiny_run / "checkpoint.pt"), "--out", str(out)]
    assert finetune.main([*args, "--epochs", "8", "--batch-size", "20", "--lr", "0.02"]) == 0

    record = json.loads(out.read_text())
    assert record["n_labeled"] == 60 and record["n_val"] == 100
    assert len(record["history"]) == 8
    assert record["history"][-1]["loss"] < record["history"][0]["loss"]
    assert record["labeled"]["top1"] > 30.0  # chance is 10%
    assert 0 <= record["val"]["top1"] <= record["val"]["top5"] <= 100


def test_monitor_returns_snn_and_knn_metrics(tiny_run, cifar_dataset):
    from evaluate import load_run
    from runner.monitor import OnlineMonitor

    cfg, model, _ = load_run(tiny_run / "checkpoint.pt")
    labeled = np.arange(0, 600, 10)
    monitor = OnlineMonitor(str(cifar_dataset), None, labeled, cfg.aug, "cpu", val_subset=50)
    model.train()
    for _ in range(2):  # loaders are reused across calls
        metrics = monitor.evaluate(model)
        assert {"snn_top1", "snn_top5", "knn_top1"} <= set(metrics)
        assert all(0 <= metrics[k] <= 100 for k in ("snn_top1", "snn_top5", "knn_top1"))
    assert model.training  # put back in the mode it was in
    assert monitor.val_loader.num_samples == 50
    assert np.bincount(monitor.val_loader.labels.numpy()).tolist() == [5] * 10


def test_a_relative_dataset_folder_of_the_run_asks_for_data(tmp_path, monkeypatch):
    import argparse

    evaluate = load_script("evaluate")
    cfg = tiny_config(Path("data/cifar10"))  # as train.py stores a relative --data
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="relative to where train.py ran .* pass --data DIR"):
        evaluate.data_folder(argparse.Namespace(data=None), cfg)
    (tmp_path / "data" / "cifar10").mkdir(parents=True)  # run from the run's own folder
    assert evaluate.data_folder(argparse.Namespace(data=None), cfg) == "data/cifar10"
    assert evaluate.data_folder(argparse.Namespace(data="/d"), cfg) == "/d"


def test_a_moved_absolute_dataset_folder_of_the_run_asks_for_data(tmp_path, capsys):
    """The run's data folder (an absolute path in its config) moved away: say so, naming it,
    and ask for --data; not "convert ... first"."""
    from model.encoder import build_model
    from runner import config as rc
    from runner.checkpoint import save_checkpoint

    gone = tmp_path / "moved-away"
    cfg = tiny_config(gone)
    model = build_model(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, model=model, optimizer=opt, scaler=None, epoch=1, step=3,
                    config=rc.to_dict(cfg))  # fmt: skip
    for script in ("evaluate", "finetune"):
        assert load_script(script).main(["--checkpoint", str(tmp_path / "checkpoint.pt")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: the run's dataset folder {gone} ") and err.count("\n") == 1
        assert "does not exist" in err and "pass --data DIR" in err, (script, err)
        assert "convert" not in err, (script, err)


def test_a_split_missing_classes_is_warned_about(tiny_run, cifar_dataset, tmp_path, caplog):
    from convert.manifest import load_manifest

    train = load_manifest(cifar_dataset).splits["train"]
    two = [f for f, y in zip(train.files, train.labels, strict=True) if y < 2][::10]
    (tmp_path / "two.txt").write_text("".join(f + "\n" for f in two))
    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(tiny_run / "checkpoint.pt"), "--labels", str(tmp_path / "two.txt")]
    knn = ["--method", "knn", "--knn-k", str(len(two) + 1)]
    assert load_script("evaluate").main([*args, "--out", str(out), *knn]) == 0
    assert json.loads(out.read_text())["bank_classes"] == 2
    assert "the labeled split holds 2 of the 10 classes" in caplog.text
    assert f"--knn-k {len(two) + 1}: the bank holds {len(two)} images" in caplog.text

    caplog.clear()
    out = tmp_path / "finetune.json"
    assert load_script("finetune").main([*args, "--out", str(out), "--epochs", "1"]) == 0
    assert json.loads(out.read_text())["labeled_classes"] == 2
    assert "holds 2 of the 10 classes: val images of the others are never right (the new head" in (
        caplog.text
    )


def test_ctrl_c_or_sigterm_during_evaluation_or_finetuning_is_one_line(
    tiny_run, monkeypatch, capsys
):
    from runner.sigterm import Terminated

    for script, work in (("evaluate", "evaluate"), ("finetune", "finetune")):
        module = load_script(script)
        for stop, status, what in ((KeyboardInterrupt, 130, "interrupted"),
                                   (Terminated, 143, "terminated (SIGTERM)")):  # fmt: skip

            def stopped(args, stop=stop):
                raise stop()

            monkeypatch.setattr(module, work, stopped)
            args = ["--checkpoint", str(tiny_run / "checkpoint.pt")]
            assert module.main(args) == status, script
            assert capsys.readouterr().err == f"{what}; no results written\n", script
