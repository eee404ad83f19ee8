"""Checkpoints: atomic writes, a full disk that keeps the previous one, exact resume."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from test_train import load_train, run_main

from runner import checkpoint as ckpt


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    import runner.loop

    # 1. Uninterrupted: 3 epochs.
    full = tmp_path / "full"
    assert run_main(full, "--epochs", "3") == 0

    # 2. The same run killed right after epoch 1's checkpoint (and mid-way into epoch 2's
    #    metrics), then resumed with the same command plus --resume.
    part = tmp_path / "part"
    original = runner.loop.Trainer.end_epoch

    def end_epoch_then_die(self, epoch):
        original(self, epoch)
        if epoch == 1:
            self.metrics.append({"step": 99, "l_unsup": 0.0})  # written after the checkpoint
            raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(runner.loop.Trainer, "end_epoch", end_epoch_then_die)
        with pytest.raises(Interrupted):
            run_main(part, "--epochs", "3")
    assert torch.load(part / "checkpoint.pt", weights_only=False)["epoch"] == 2
    assert run_main(part, "--epochs", "3", "--resume") == 0

    # 3. Same weights, optimizer state and logged losses.
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(part / "checkpoint.pt", weights_only=False)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (3, 6)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, s in a["optimizer"]["state"].items():
        for name, t in s.items():
            if torch.is_tensor(t):
                assert torch.equal(t, b["optimizer"]["state"][k][name]), (k, name)
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
    ra, rb = read(full), read(part)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]  # the stray step 99 is gone
    assert [r["l_unsup"] for r in ra] == [r["l_unsup"] for r in rb]


def tiny_state(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "epoch": int(value)}


def test_checkpoint_write_is_atomic_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.atomic_save(tiny_state(1.0), path)
    ckpt.atomic_save(tiny_state(2.0), path)
    assert torch.load(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_disk_full_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.atomic_save(tiny_state(1.0), path)

    def half_written_then_full(obj, f):
        f.write(b"\x00" * 1024)  # a partial file, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write", half_written_then_full)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.atomic_save(tiny_state(2.0), path)
    msg = str(err.value)
    assert "disk full" in msg and "previous checkpoint.pt is intact" in msg
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


class FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def test_a_real_torch_save_onto_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save's writer turns the failed write into a RuntimeError ("unexpected pos"):
    still a full disk, said as one, with no temporary left behind."""
    path = tmp_path / "checkpoint.pt"
    ckpt.atomic_save(tiny_state(1.0), path)
    monkeypatch.setattr(ckpt, "_write", lambda obj, f: torch.save(obj, FullDisk(f, 4096)))
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.atomic_save({"model": {"w": torch.zeros(100_000)}}, path)
    assert isinstance(err.value.__cause__, RuntimeError)  # what torch raised
    msg = str(err.value)
    assert "(disk full)" in msg and "previous checkpoint.pt is intact" in msg, msg
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_ctrl_c_or_sigterm_in_mid_write_stays_an_interruption(tmp_path, monkeypatch):
    """torch.save wraps the KeyboardInterrupt (or Terminated) that stopped its write in a
    RuntimeError: the caller still sees the interruption, and the previous file stands."""
    from runner.sigterm import Terminated

    path = tmp_path / "checkpoint.pt"
    ckpt.atomic_save(tiny_state(1.0), path)
    for stop in (KeyboardInterrupt, Terminated):

        class Stopped(FullDisk):
            def write(self, b, stop=stop) -> int:
                if len(b) > self.room:
                    raise stop()
                return super().write(b)

        monkeypatch.setattr(ckpt, "_write", lambda obj, f: torch.save(obj, Stopped(f, 4096)))
        with pytest.raises(stop):
            ckpt.atomic_save({"model": {"w": torch.zeros(100_000)}}, path)
        assert torch.load(path)["epoch"] == 1
        assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_full_disk_while_keeping_a_copy_says_the_checkpoint_itself_is_complete(
    tmp_path, monkeypatch
):
    path = ckpt.atomic_save(tiny_state(1.0), tmp_path / "checkpoint.pt")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.shutil, "copyfile", full)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.atomic_copy(path, tmp_path / ckpt.periodic_name(1))
    assert f"(disk full): [Errno 28] No space left on device; {path} (the same state) is " in (
        str(err.value)
    )


def test_a_checkpoint_damaged_in_place_is_refused_naming_it(tmp_path):
    """Bytes zeroed inside a checkpoint load silently with torch.load (wrong weights); the
    zip records' CRC-32 finds them."""
    path = tmp_path / "checkpoint.pt"
    ckpt.atomic_save({"model": {"w": torch.randn(100_000)}, "epoch": 1}, path)
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    torch.load(path)  # torch alone does not notice
    with pytest.raises(ckpt.CheckpointError, match=r"^--checkpoint: checkpoint .* is damaged"):
        ckpt.load_checkpoint(path, option="--checkpoint")


def test_disk_full_during_a_run_stops_it_with_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = ckpt._write

    def full_on_second(obj, f):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, f)

    monkeypatch.setattr(ckpt, "_write", full_on_second)
    assert run_main(out, "--epochs", "3") == 1
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1


def test_resume_loads_rng_states(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    expected = (torch.rand(2), np.random.rand(), random.random())
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(2), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]


def test_resume_refuses_a_changed_option(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(out, "--epochs", "1") == 0
    assert load_train().main(["--out", str(out), "--resume", "--batch-size", "4"]) == 2
    assert "error: --batch-size: data.batch_size is 8 in " in capsys.readouterr().err
    assert load_train().main(["--out", str(out), "--resume", "--pipeline", "ffcv"]) == 2
    assert "error: --pipeline: data.backend is 'synthetic' in " in capsys.readouterr().err


def test_resume_may_move_the_cutting_of_views(tmp_path):
    """--crops only says where the views are cut (a GPU run resumed on a CPU, say)."""
    out = tmp_path / "run"
    assert run_main(out, "--epochs", "1", "--crops", "device") == 0
    assert (
        load_train().main(["--out", str(out), "--resume", "--epochs", "2", "--crops", "host"]) == 0
    )
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["crops"] == "host"


def test_resume_with_another_epochs_names_the_lr_jump(tmp_path, caplog):
    from model.optim import lr_schedule
    from runner.config import load_json

    out = tmp_path / "run"
    assert run_main(out, "--epochs", "2") == 0  # 2 steps an epoch, batch 8
    assert load_train().main(["--out", str(out), "--resume", "--epochs", "4"]) == 0
    optim = load_json(out / "config.json").optim
    new, old = lr_schedule(optim, 2, 4, 8), lr_schedule(optim, 2, 2, 8)
    assert (
        f"--epochs 4: the run was set for 2 epochs; its LR schedule is recomputed for 4: step 5 "
        f"gets LR {new[4]:.4g}, where the old schedule gave none (it ended at {old[-1]:.4g})"
    ) in caplog.text
    config = (out / "config.json").read_bytes()
    assert load_train().main(["--out", str(out), "--resume", "--epochs", "3"]) == 0
    assert f"the run in {out} is at epoch 4 of 3: nothing left to train" in caplog.text
    assert (out / "config.json").read_bytes() == config  # a resume that does nothing writes nothing


def test_resume_checks_a_preset_against_the_run_and_never_applies_it(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert run_main(out, "--epochs", "1") == 0
    other, same = tmp_path / "other.toml", tmp_path / "same.toml"
    other.write_text('[model]\narch = "resnet34"\n')
    same.write_text('[model]\narch = "resnet18"\n[run]\nepochs = 9\n')  # epochs: resumable
    resume = ["--out", str(out), "--resume"]
    assert load_train().main([*resume, "--config", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--config {other}: sets model.arch = 'resnet34', but it is 'resnet18'" in err
    assert load_train().main([*resume, "--config", str(same), "--epochs", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["run"]["epochs"] == 2  # not the preset's
    caplog.clear()
    assert load_train().main([*resume, "--config", str(same)]) == 0  # a finished run
    assert (
        f"--config {same}: its run.epochs = 9 is not applied on --resume (the run keeps 2); "
        "pass --epochs to change it"
    ) in caplog.text
    assert load_train().main([*resume, "--force"]) == 2
    assert "--resume and --force: choose one" in capsys.readouterr().err


def test_a_resumed_run_trains_in_the_folder_its_config_was_read_from(tmp_path, caplog):
    """A run folder moved elsewhere, found by --out or by a preset's run.out: its config.json
    still names the old folder, which must not be where the run goes on."""
    from runner import config as rc

    train = load_train()
    moved = tmp_path / "moved"
    moved.mkdir()
    rc.save_json(rc.TrainConfig(run=rc.RunConfig(out=str(tmp_path / "original"))),
                 moved / train.CONFIG_JSON)  # fmt: skip
    preset = tmp_path / "preset.toml"
    preset.write_text(f'[run]\nout = "{moved}"\n')
    for argv in (["--out", str(moved)], ["--config", str(preset)]):
        notes: list[str] = []
        cfg = train.resolve_config(train.build_parser().parse_args([*argv, "--resume"]), notes)
        assert cfg.run.out == str(moved) and notes == [], (argv, notes)


def test_resume_on_another_dataset_is_refused_and_a_moved_copy_is_not(tmp_path, caplog):
    from convert.manifest import Manifest, SplitInfo

    train = load_train()

    def manifest_of(files: list[str]):
        split = SplitInfo(files=files, labels=[i % 2 for i in range(len(files))])
        return Manifest(["a", "b"], {"train": split})

    files = [f"{c}/{i}.jpg" for i in range(6) for c in "ab"]
    (tmp_path / train.DATASET_JSON).write_text(
        json.dumps(train.dataset_identity(manifest_of(files)))
    )
    train.check_same_dataset(tmp_path, manifest_of(list(files)), "/moved/copy")  # the same images
    other = [*files[:-1], "b/extra.jpg"]  # as many images, one of them another
    with pytest.raises(
        ValueError, match=r"^--data /other: not the dataset the run in .* started on"
    ):
        train.check_same_dataset(tmp_path, manifest_of(other), "/other")
    with pytest.raises(ValueError, match=r"\(13 training images in 2 classes, against 12 in 2"):
        train.check_same_dataset(tmp_path, manifest_of([*files, "a/x.jpg"]), "/other")

    (tmp_path / train.DATASET_JSON).unlink()  # a run from before the check: said, not refused
    train.check_same_dataset(tmp_path, manifest_of(other), "/other")
    assert "has no dataset.json (a run from before this check): --data /other is not" in (
        caplog.text
    )

    path = tmp_path / train.DATASET_JSON  # damaged: named, with what to do
    for damage in ("", '{"train_images": 12}', "[1, 2]"):
        path.write_text(damage)
        with pytest.raises(ValueError, match=rf"^--resume: cannot read {path} .* delete the"):
            train.check_same_dataset(tmp_path, manifest_of(files), "/data")
