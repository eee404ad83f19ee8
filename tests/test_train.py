"""The program end to end: command line, run folder, log line, metrics, plot, non-finite losses.

Synthetic data and a tiny ResNet-18 (16-px views) keep these on a CPU in seconds.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `runner` until the editable install is refreshed (see report)
    sys.path.insert(0, str(ROOT))

# A tiny model on tiny synthetic views: one epoch is 2 steps of 8 images.
TINY = [
    "--pipeline", "synthetic", "--data", "none", "--labels", "1pct", "--device", "cpu",
    "--arch", "resnet18", "--hidden-dim", "32", "--out-dim", "16", "--head-layers", "2",
    "--large-size", "16", "--small-size", "8", "--n-small", "1", "--batch-size", "8",
    "--classes-per-batch", "4", "--images-per-class", "2", "--log-interval", "1",
    "--warmup-epochs", "1", "--base-lr", "0.5", "--seed", "3",
]  # fmt: skip


def load_train():
    """train.py as a module (it sits at the repository root, outside the packages)."""
    if "train" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["train"] = module
        spec.loader.exec_module(module)
    return sys.modules["train"]


def run_main(out: Path, *extra: str) -> int:
    return load_train().main([*TINY, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert run_main(out, "--epochs", "2", "--checkpoint-every", "1") == 0
    return out


def test_run_folder_holds_config_split_checkpoints_metrics_and_plot(finished_run):
    names = {p.name for p in finished_run.iterdir()}
    assert {"config.json", "labels.txt", "checkpoint.pt", "checkpoint-ep0001.pt"} <= names
    assert {"checkpoint-ep0002.pt", "metrics.jsonl", "metrics.csv", "metrics.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert (finished_run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((finished_run / "config.json").read_text())
    assert saved["data"]["batch_size"] == 8 and saved["run"]["epochs"] == 2


def test_metrics_jsonl_has_the_logged_keys_and_cumulative_counts(finished_run):
    lines = (finished_run / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    keys = {"step", "epoch", "l_unsup", "l_sup", "l_total", "lr", "img_per_s", "data_wait"}
    assert keys | {"images", "flops", "nonfinite"} <= set(recs[0])
    for r in recs:
        assert r["l_total"] == pytest.approx(r["l_unsup"] + r["l_sup"], rel=1e-5)
        assert r["l_unsup"] != r["l_total"]  # the total is never aliased into a part
    assert recs[-1]["images"] == 4 * (8 + 8)  # 4 steps x (8 unlabeled + C*K labeled)
    assert 0 < recs[0]["flops"] < recs[-1]["flops"]


def test_log_line_follows_the_house_format():
    from runner.metrics import format_line

    rec = dict(step=1200, epoch=3, l_unsup=5.123, l_sup=2.31, lr=0.48, img_per_s=11850.2,
               data_wait=0.031)  # fmt: skip
    line = "step 1200 ep 3 | l_unsup 5.12 l_sup 2.31 | lr 4.80e-01 | 11850 img/s | data-wait 3%"
    assert format_line(rec) == line
    assert "l_sup off" in format_line({**rec, "l_sup": None, "sup_active": False})


def test_run_folder_refuses_overwrite_without_resume_or_force(finished_run, capsys):
    before = (finished_run / "checkpoint.pt").stat().st_mtime_ns
    assert run_main(finished_run, "--epochs", "2") == 2
    assert "--resume" in capsys.readouterr().err
    assert (finished_run / "checkpoint.pt").stat().st_mtime_ns == before


def test_a_folder_another_run_trains_in_is_refused_even_with_resume_or_force(tmp_path, capsys):
    train = load_train()
    out = tmp_path / "run"
    assert run_main(out, "--epochs", "1") == 0
    before = (out / "checkpoint.pt").stat().st_mtime_ns
    with open(out / train.RUN_LOCK, "a+") as held:  # as a live run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.truncate(0)
        held.write("pid 4242 on node7\n")
        held.flush()
        for extra in ([], ["--resume"], ["--force"]):
            assert run_main(out, "--epochs", "1", *extra) == 2
            assert "a run is training there (pid 4242 on node7)" in capsys.readouterr().err
        assert (out / "checkpoint.pt").stat().st_mtime_ns == before  # untouched
    assert run_main(out, "--epochs", "2", "--resume") == 0  # the lock is gone with its process


def test_a_filesystem_without_locks_does_not_stop_a_run(tmp_path, monkeypatch):
    train = load_train()

    def no_locks(f, op):
        raise OSError(37, "No locks available")  # ENOLCK, as on some network mounts

    monkeypatch.setattr(train.fcntl, "flock", no_locks)
    assert run_main(tmp_path / "run", "--epochs", "1") == 0
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_out_that_is_a_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file", tmp_path / "file" / "run"):
        assert run_main(bad, "--epochs", "1") == 2
        err = capsys.readouterr().err
        assert f"--out {bad}:" in err and "Traceback" not in err


def test_out_that_cannot_be_written_is_one_error_line_before_any_work(tmp_path, capsys, unwritable):
    """/proc, and a run folder as on a read-only mount: train.py, --benchmark (which writes
    benchmark.json at the end) and a resume are refused before any work."""
    for extra in ([], ["--benchmark"]):
        assert run_main(Path("/proc"), "--epochs", "1", *extra) == 2
        err = capsys.readouterr().err
        assert "error: --out /proc: cannot write there (" in err and "Traceback" not in err, err
    out = tmp_path / "run"
    assert run_main(out, "--epochs", "1") == 0
    unwritable(out)
    assert run_main(out, "--epochs", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert f"error: --out {out}: cannot write there (Read-only file system)" in err, err


def test_a_write_failing_at_the_start_of_a_run_is_one_error_line(tmp_path, capsys, monkeypatch):
    import errno

    train = load_train()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run/labels.txt"))

    monkeypatch.setattr(train, "save_labels", full)
    assert run_main(tmp_path / "run", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno 28] No space left on device: ") and "labels.txt" in err
    assert "Traceback" not in err


def test_ctrl_c_during_training_is_one_line_naming_the_last_checkpoint(
    tmp_path, capsys, monkeypatch
):
    from runner.loop import Trainer

    def interrupted(self, pipeline, start_epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    assert run_main(tmp_path / "run", "--epochs", "1") == 130
    log = (tmp_path / "run" / "train.log").read_text()
    assert "interrupted; last checkpoint: none yet; rerun with --resume" in log
    assert "Traceback" not in log + capsys.readouterr().err


def test_sigterm_during_a_benchmark_says_so(tmp_path, capsys, monkeypatch):
    import runner.benchmark
    from runner.sigterm import Terminated

    def terminated(*args, **kwargs):
        raise Terminated

    monkeypatch.setattr(runner.benchmark, "run_benchmark", terminated)
    assert run_main(tmp_path / "run", "--benchmark") == 143
    err = capsys.readouterr().err
    assert err == "terminated (SIGTERM) during the benchmark (no benchmark.json written)\n", err


def test_force_replaces_the_previous_run(tmp_path):
    out = tmp_path / "run"
    assert run_main(out, "--epochs", "1", "--checkpoint-every", "1") == 0
    (out / "eval-checkpoint.json").write_text("{}")  # results of the old run's checkpoint
    assert run_main(out, "--epochs", "1", "--checkpoint-every", "0", "--force") == 0
    assert not (out / "checkpoint-ep0001.pt").exists()
    assert not (out / "eval-checkpoint.json").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # 2 steps, not 4


def test_force_that_fails_its_checks_leaves_the_previous_run_as_it_was(
    tmp_path, monkeypatch, capsys
):
    from pipelines.errors import PipelineError

    out = tmp_path / "run"
    assert run_main(out, "--epochs", "1", "--checkpoint-every", "1") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".run.lock"}

    def bad_data(*args, **kwargs):
        raise PipelineError("data/x/train.beton: sample 23: its JPEG does not decode")

    monkeypatch.setattr(load_train(), "build_data", bad_data)
    assert run_main(out, "--epochs", "2", "--force") == 2
    assert "sample 23" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".run.lock"}
    assert after == before  # config, split, checkpoints, metrics, plot and train.log


def nan_after(n_good: int):
    """An NTXentLoss stand-in whose loss turns NaN after `n_good` calls."""
    from model.losses import NTXentLoss

    class Flaky(NTXentLoss):
        calls = 0

        def forward(self, z):
            Flaky.calls += 1
            loss = super().forward(z)
            return loss * float("nan") if Flaky.calls > n_good else loss

    return Flaky


def test_nonfinite_loss_skips_update_and_stops_after_max_in_a_row(tmp_path, monkeypatch, caplog):
    import runner.loop

    out = tmp_path / "run"
    monkeypatch.setattr(runner.loop, "NTXentLoss", nan_after(2))  # epoch 0 is 2 good steps
    status = run_main(out, "--epochs", "3", "--max-nonfinite", "2")
    assert status == 1
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and state["step"] == 2  # the last good checkpoint is kept
    text = caplog.text
    assert "step 3 ep 1 | non-finite loss" in text and "update skipped" in text
    assert "stopped at step 4" in text and "2 non-finite losses in a row" in text
    assert "last good checkpoint: " in text and "checkpoint.pt" in text


def test_nonfinite_step_leaves_weights_untouched(tmp_path, monkeypatch):
    import runner.loop

    train = load_train()
    monkeypatch.setattr(runner.loop, "NTXentLoss", nan_after(0))
    args = train.build_parser().parse_args([*TINY, "--out", str(tmp_path / "r"), "--epochs", "1"])
    trainer, pipeline, _ = train.setup(args)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    momentum_before = len(trainer.optimizer.state)
    batch = next(iter(pipeline))
    assert trainer.train_step(batch, epoch=0) is False
    for a, b in zip(before, trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(trainer.optimizer.state) == momentum_before == 0


def test_once_suncet_is_off_the_pipeline_draws_no_labeled_batch(tmp_path, monkeypatch):
    from pipelines.synthetic import SyntheticPipeline

    asked, seen = [], []
    set_epoch, batch = SyntheticPipeline.set_epoch, SyntheticPipeline._batch

    def record_epoch(self, epoch, labeled=True):
        asked.append((epoch, labeled))
        set_epoch(self, epoch, labeled)

    def record_batch(self, step):
        b = batch(self, step)
        seen.append((self.epoch, len(b.labeled_views), b.n_labeled))
        return b

    monkeypatch.setattr(SyntheticPipeline, "set_epoch", record_epoch)
    monkeypatch.setattr(SyntheticPipeline, "_batch", record_batch)
    out = tmp_path / "run"
    assert run_main(out, "--epochs", "2", "--supervised-epochs", "1") == 0
    assert asked == [(0, True), (1, False)]
    assert seen == [(0, 1, 8), (0, 1, 8), (1, 0, 0), (1, 0, 0)]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["l_sup"] is None) for r in recs] == [(0, 0), (0, 0), (1, 1), (1, 1)]
    assert recs[-1]["images"] == 2 * (8 + 8) + 2 * 8  # the labeled images of epoch 0 only


def test_train_py_runs_from_the_command_line(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--out", str(out), "--epochs", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == f"run folder: {out.resolve()}"
    assert any(line.startswith("step 2 ep 0 | l_unsup ") for line in lines), done.stdout
    assert "img/s | data-wait" in done.stdout


def test_train_runs_end_to_end_on_real_ffcv_data(cifar_dataset, tmp_path):
    pytest.importorskip("pipelines.ffcv_pipeline")
    pytest.importorskip("convert.splits")
    out = tmp_path / "ffcv"
    args = [
        "--pipeline", "ffcv", "--data", str(cifar_dataset), "--labels", "10pct", "--device",
        "cpu", "--arch", "resnet18", "--hidden-dim", "32", "--out-dim", "16",
        "--large-size", "16", "--small-size", "8", "--n-small", "2", "--batch-size", "64",
        "--classes-per-batch", "5", "--images-per-class", "2", "--epochs", "1",
        "--log-interval", "2", "--num-workers", "2", "--blur-p-large", "0",
        "--out", str(out),
    ]  # fmt: skip
    assert load_train().main(args) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs and all(r["l_unsup"] > 0 and r["l_sup"] >= 0 for r in recs)
    assert (out / "labels.txt").is_file() and (out / "checkpoint.pt").is_file()


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path, caplog):
    assert run_main(tmp_path / "a", "--epochs", "1") == 0  # TINY warms up for 1 epoch
    assert "--warmup-epochs 1 >= --epochs 1: the LR rises for the whole run" in caplog.text
    caplog.clear()
    assert run_main(tmp_path / "b", "--epochs", "2") == 0
    assert "--warmup-epochs" not in caplog.text and "--final-lr" not in caplog.text
    assert run_main(tmp_path / "c", "--epochs", "2", "--final-lr", "10") == 0  # peak: 0.5 x 8/256
    assert "--final-lr 10 is above the peak LR 0.01562 (--base-lr x global batch" in caplog.text
