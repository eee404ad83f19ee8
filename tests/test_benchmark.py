"""`train.py --benchmark`: its table and JSON, what it writes, and the sync-free training step
it relies on. Synthetic data and the tiny ResNet-18 of test_train; one run on real FFCV data.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from test_optim import HostReadProbe  # noqa: E402
from test_train import TINY, load_train, nan_after  # noqa: E402

BENCH = ["--benchmark", "--bench-warmup", "1", "--bench-steps", "2"]
RATES = ("steps_per_s", "images_per_s", "views_per_s", "labeled_per_s", "trained_images_per_s")


def check_rows(result: dict, loaders: list[str], pipeline: str) -> dict[str, dict]:
    """Every row the issue lists, with positive finite figures; returns them by kind/name."""
    rows = {r["name"]: r for r in result["rows"]}
    names = [f"loader alone: {n}" for n in loaders]
    names[0] += " (chosen)"
    model, full = "model alone: synthetic batch on cpu", f"full step: {pipeline}"
    assert list(rows) == [*names, model, full]
    for r in rows.values():
        assert r["skipped"] is None, r
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in (*RATES, "seconds", "host_rss_mb"))
        assert r["device_mb"] is None  # CPU: no device memory
    for name in (model, full):
        assert 0 < rows[name]["optimizer"] < 1 and 0 <= rows[name]["data_wait"] <= 1
    ratio = rows[full]["steps_per_s"] / rows[model]["steps_per_s"]
    assert rows[full]["over_model"] == pytest.approx(ratio)
    assert result["full_over_model"] == pytest.approx(ratio)
    return rows


@pytest.fixture(scope="module")
def bench_beside_a_run(tmp_path_factory):
    """A benchmark into a folder that already holds (the files of) a run."""
    out = tmp_path_factory.mktemp("bench") / "run"
    out.mkdir()
    kept = {"config.json": "{}\n", "checkpoint.pt": "weights", "metrics.jsonl": "{}\n"}
    for name, text in kept.items():
        (out / name).write_text(text)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        status = load_train().main([*TINY, "--out", str(out), *BENCH])
    return out, kept, before, status, stdout.getvalue()


def test_benchmark_json_holds_every_row_config_and_machine(bench_beside_a_run):
    out, _, _, status, _ = bench_beside_a_run
    assert status == 0
    result = json.loads((out / "benchmark.json").read_text())
    check_rows(result, ["synthetic"], "synthetic")
    assert result["config"]["data"]["batch_size"] == 8 and result["timed_steps"] == 2
    steps = {r["kind"]: r["steps"] for r in result["rows"]}
    assert steps == {"loader": 10, "model": 2, "full": 2}  # a loader row drains its prefetch
    assert {"device_name", "cpu_cores", "torch"} <= set(result["machine"])
    assert result["command"][:1] == ["train.py"] and "--benchmark" in result["command"]


def test_benchmark_prints_one_table_with_every_row(bench_beside_a_run):
    text = bench_beside_a_run[-1]
    head = "| measurement | steps/s | img/s | views/s | labeled img/s | data-wait | optimizer |"
    assert head in text
    for row in ("loader alone: synthetic (chosen)", "model alone:", "full step: synthetic"):
        assert f"| {row}" in text
    assert "full step / model alone: " in text and "optimizer share of the full step" in text


def test_benchmark_writes_only_its_json_and_needs_no_force(bench_beside_a_run):
    out, kept, before, status, _ = bench_beside_a_run
    assert status == 0  # a run in the folder is no reason to refuse
    assert {p.name for p in out.iterdir()} == {*kept, "benchmark.json"}
    for name, text in kept.items():
        assert (out / name).read_text() == text
        assert (out / name).stat().st_mtime_ns == before[name]


def test_benchmark_options_are_checked_before_any_work(tmp_path, capsys):
    train = load_train()
    assert (
        train.main([*TINY, "--out", str(tmp_path / "a"), "--benchmark", "--bench-steps", "0"]) == 2
    )
    assert "--bench-steps: must be >= 1" in capsys.readouterr().err
    for flag in ("--resume", "--force"):
        assert train.main([*TINY, "--out", str(tmp_path / "a"), "--benchmark", flag]) == 2
        assert f"--benchmark with {flag}: a benchmark leaves the run" in capsys.readouterr().err
    assert train.main([*TINY, "--out", str(tmp_path / "b"), "--bench-warmup", "3"]) == 2
    assert "--bench-warmup: only has a meaning with --benchmark" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_benchmark_all_times_ffcv_dali_and_the_baseline_on_real_data(cifar_dataset, tmp_path):
    pytest.importorskip("pipelines.ffcv_pipeline")
    pytest.importorskip("pipelines.dali_pipeline")
    out = tmp_path / "bench"
    args = [
        "--pipeline", "ffcv", "--data", str(cifar_dataset), "--labels", "10pct", "--device",
        "cpu", "--arch", "resnet18", "--hidden-dim", "32", "--out-dim", "16", "--head-layers",
        "2", "--large-size", "16", "--small-size", "8", "--n-small", "2", "--batch-size", "32",
        "--classes-per-batch", "5", "--images-per-class", "2", "--num-workers", "2",
        "--blur-p-large", "0", "--out", str(out), "--benchmark", "all", "--bench-warmup", "1",
        "--bench-steps", "2",
    ]  # fmt: skip
    assert load_train().main(args) == 0
    result = json.loads((out / "benchmark.json").read_text())
    rows = check_rows(result, ["ffcv", "dali", "torchvision/PIL baseline"], "ffcv")
    loader = rows["loader alone: ffcv (chosen)"]
    assert loader["unlabeled"] == 32 and loader["views"] == 32 * 4 and loader["labeled"] == 10
    assert [p.name for p in out.iterdir()] == ["benchmark.json"]


# --------------------------------------------------------- the sync-free training step


def tiny_trainer(tmp_path: Path, lag: int):
    """A set-up tiny trainer whose flags are read `lag` steps late (CUDA's way, on a CPU)."""
    from runner.loop import IntervalStats

    train = load_train()
    args = train.build_parser().parse_args([*TINY, "--out", str(tmp_path / "r"), "--epochs", "4"])
    trainer, pipeline, _ = train.setup(args)
    trainer.stats = IntervalStats(trainer.info.device, lag=lag)
    return trainer, next(iter(pipeline))


def test_training_step_reads_nothing_back_but_older_steps_flags(tmp_path):
    trainer, batch = tiny_trainer(tmp_path, lag=1)
    trainer.train_step(batch, 0)  # the first step (state, buffers) outside the probe
    trainer.step += 1
    for _ in range(3):
        with HostReadProbe() as probe:
            assert trainer.train_step(batch, 0) is None  # the verdict comes later
        trainer.step += 1
        assert [p.step for p in trainer.stats.pending] == [trainer.step]  # this one: unread
        outside = [r for r, c in zip(probe.reads, probe.callers, strict=True)
                   if "IntervalStats.ready" not in c]  # fmt: skip
        assert outside == [], outside
        assert probe.reads  # ... and the previous step's flag was read there


def test_deferred_nonfinite_step_moves_nothing_and_is_reported_late(tmp_path, monkeypatch, caplog):
    import runner.loop

    monkeypatch.setattr(runner.loop, "NTXentLoss", nan_after(1))  # step 1 good, then NaN
    trainer, batch = tiny_trainer(tmp_path, lag=1)
    trainer.train_step(batch, 0)
    trainer.step += 1
    params = [p.detach().clone() for p in trainer.model.parameters()]
    state = trainer.optimizer.state
    buffers = {k: v["momentum_buffer"].clone() for k, v in state.items()}
    assert buffers  # step 1 made momentum

    assert trainer.train_step(batch, 0) is None  # step 2: NaN, backward and step still run
    trainer.step += 1
    for a, b in zip(params, trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(state[k]["momentum_buffer"], v) for k, v in buffers.items())
    assert "non-finite" not in caplog.text and trainer.stats.nonfinite == 0

    trainer.resolve_flags(wait_all=True)  # a log step reads every queued flag
    assert "step 2 ep 0 | non-finite loss (l_unsup nan" in caplog.text
    assert trainer.stats.nonfinite == 1 and trainer.stats.ok_steps == 1
    assert trainer.stats.means()[0] is not None and math.isfinite(trainer.stats.means()[0])


@pytest.mark.parametrize("lag", [0, 1])
def test_a_skipped_step_leaves_batchnorm_statistics_as_they_were(tmp_path, lag):
    from torch import nn

    trainer, batch = tiny_trainer(tmp_path, lag=lag)
    trainer.train_step(batch, 0)
    trainer.step += 1
    norms = [m for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    before = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
              for m in norms]  # fmt: skip

    # An inf pixel: the forward fills the running statistics with inf / NaN, the loss is NaN.
    views = [v.clone() for v in batch.unlabeled_views]
    views[0][0, 0, 0, 0] = float("inf")
    trainer.train_step(batch._replace(unlabeled_views=views), 0)
    trainer.step += 1
    trainer.resolve_flags(wait_all=True)
    assert trainer.stats.nonfinite == 1
    for m, (mean, var, n) in zip(norms, before, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert torch.equal(m.num_batches_tracked, n)

    trainer.train_step(batch, 0)  # a good step after it updates them again
    assert not torch.equal(norms[0].running_mean, before[0][0])
    assert all(torch.isfinite(m.running_var).all() for m in norms)


def test_flags_are_read_by_step_count_so_every_rank_stops_at_the_same_step():
    from runner.loop import IntervalStats, PendingFlag

    class DoneEvent:  # a CUDA event whose copy has finished, on one rank and not another
        def query(self) -> bool:
            return True

        def synchronize(self) -> None:
            pass

    stats = IntervalStats(torch.device("cpu"), lag=2)
    read = []
    for step in range(1, 6):
        values = torch.tensor([step != 2, 1.0, 1.0])  # step 2 non-finite
        stats.pending.append(PendingFlag(step, 0, True, values, DoneEvent()))
        read.append([s for s, *_ in stats.ready()])
    assert read == [[], [], [1], [2], [3]]  # step s's flag after step s + lag, never sooner
    assert [s for s, _, ok, *_ in stats.ready(wait_all=True) if not ok] == []
    assert stats.ok_steps == 4 and stats.nonfinite == 0  # counts: finite reads only
