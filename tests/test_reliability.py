"""Reliability (issue 8): bad data, a killed run, a full disk, through the real programs.

The cases other files already test are listed in the README's reliability table; this file holds
the rest: bad dataset files and split files through `train.py`, the converters' and the
trainer's command lines (one `error: ...` line, never a traceback), `kill -9` of a training
run on real data then `--resume`, a kill in the middle of a checkpoint write, and a full disk
at each write of an epoch's end.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import TINY, load_train, run_main

from convert import common
from convert.manifest import load_manifest
from runner import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]

# A tiny model on the real CIFAR subset (600 train images at 32 px): 4 steps of 128 an epoch,
# two 16-px views per image.
REAL = [
    "--labels", "10pct", "--device", "cpu", "--arch", "resnet18", "--hidden-dim", "32",
    "--out-dim", "16", "--head-layers", "2", "--large-size", "16", "--n-small", "0",
    "--batch-size", "128", "--classes-per-batch", "5",
    "--images-per-class", "2", "--log-interval", "1", "--num-workers", "2",
    "--blur-p-large", "0", "--seed", "3",
]  # fmt: skip


def train_real(data: Path, out: Path, *extra: str, pipeline: str = "ffcv") -> int:
    return load_train().main([*REAL, "--pipeline", pipeline, "--data", str(data), "--out",
                              str(out), *extra])  # fmt: skip


def one_error_line(err: str) -> str:
    """The single `error: ...` line of a program's stderr (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's complete lines (a line being written when read is left out)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def copy_dataset(src: Path, dest: Path) -> Path:
    """A dataset folder whose files can be damaged: folders made anew, every file symlinked
    (a symlinked folder would let `replace_file` damage the shared dataset), the manifest
    copied."""
    shutil.copytree(src, dest, copy_function=os.symlink)
    (dest / "manifest.json").unlink()
    shutil.copy(src / "manifest.json", dest / "manifest.json")
    return dest


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


# ----------------------------------------------------------------------------- bad data


def test_truncated_beton_stops_train_py_before_work_naming_the_file(
    cifar_dataset, tmp_path, capsys
):
    data = copy_dataset(cifar_dataset, tmp_path / "data")
    whole = (cifar_dataset / "train.beton").read_bytes()
    for cut in (len(whole) - 100, len(whole) // 2):  # the tail (FFCV's table) or half the file
        replace_file(data / "train.beton", whole[:cut])
        out = tmp_path / f"run{cut}"
        assert train_real(data, out, "--epochs", "1") == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(data / "train.beton") in line and "truncated" in line, line
        assert "imagenet_to_ffcv.py" in line  # what to do
        assert not (out / "config.json").exists()  # a failed start leaves no run to refuse


def test_truncated_files_stop_the_pipelines_and_eval_loaders_themselves(cifar_dataset, tmp_path):
    """Not only train.py: anything that builds a pipeline or an eval loader checks sizes."""
    from pipelines.config import AugConfig, DataConfig
    from pipelines.dali_pipeline import DALIPipeline
    from pipelines.errors import PipelineError
    from pipelines.eval_loader import CenterCropLoader
    from pipelines.ffcv_pipeline import FFCVPipeline

    data = copy_dataset(cifar_dataset, tmp_path / "data")
    for rel in ("train.beton", "val.beton", "shards/train-00000.tar"):
        whole = (cifar_dataset / rel).read_bytes()
        replace_file(data / rel, whole[:-100])  # FFCV reads a beton cut in its table silently
    cfg, aug = DataConfig(data=str(data), batch_size=32), AugConfig(large_size=16, n_small=0)
    for build in (
        lambda: FFCVPipeline(str(data), cfg, aug, [], device="cpu"),
        lambda: DALIPipeline(str(data), cfg, aug, [], device="cpu"),
        lambda: CenterCropLoader(data, "val", None, aug),
    ):
        with pytest.raises(PipelineError, match="truncated or from another conversion"):
            build()


def break_jpeg(beton: Path, sample: int) -> str:
    """Overwrites the JPEG start marker of `sample` in a (copied) .beton; returns its file."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    field = reader.metadata[f"f{list(reader.handlers).index('image')}"][sample]
    with open(beton, "r+b") as f:
        f.seek(int(field["data_ptr"]))
        assert f.read(2) == b"\xff\xd8"
        f.seek(int(field["data_ptr"]))
        f.write(b"\x00\x00")  # same size: the file checks cannot see it
    return load_manifest(beton.parent).splits[beton.stem].files[sample]


def test_a_jpeg_damaged_inside_a_beton_stops_every_ffcv_reader_naming_it(
    cifar_dataset, tmp_path, capsys
):
    """FFCV's decoders hand on garbage pixels for a JPEG that does not decode: the trainer's
    loaders (unlabeled and labeled streams, fine-tuning, centre crops) name it instead."""
    from pipelines.config import AugConfig, DataConfig
    from pipelines.errors import PipelineError
    from pipelines.eval_loader import CenterCropLoader, FinetuneLoader
    from pipelines.ffcv_pipeline import FFCVPipeline

    data = copy_dataset(cifar_dataset, tmp_path / "data")
    for rel in ("train.beton", "val.beton"):
        replace_file(data / rel, (cifar_dataset / rel).read_bytes())
    train_file, val_file = break_jpeg(data / "train.beton", 23), break_jpeg(data / "val.beton", 5)
    cfg = DataConfig(data=str(data), batch_size=32, classes_per_batch=5, images_per_class=2,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    aug = AugConfig(large_size=16, n_small=1, small_size=8)
    damaged = f"sample 23 ({train_file}): its JPEG does not decode"

    unlabeled = FFCVPipeline(str(data), cfg, aug, [], device="cpu")  # 23 is in the first batch
    with pytest.raises(PipelineError, match=re.escape(damaged)):
        list(unlabeled)
    unlabeled.close()
    with pytest.raises(PipelineError, match=re.escape(damaged)):  # building its labeled store
        FFCVPipeline(str(data), cfg, aug, sorted({23, *range(0, 600, 30)}), device="cpu")
    finetune = FinetuneLoader(data, "train", list(range(0, 64)), aug, batch_size=32)
    with pytest.raises(PipelineError, match=re.escape(damaged)):
        list(finetune)
    with pytest.raises(PipelineError, match=re.escape(f"sample 5 ({val_file}): its JPEG")):
        CenterCropLoader(data, "val", None, aug)
    assert len(list(CenterCropLoader(data, "val", list(range(6, 40)), aug))) == 1  # 5 not read

    # train.py meets it in the middle of an epoch (23 is not labeled): one line, status 1.
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{f}\n" for f in load_manifest(data).splits["train"].files[::30]))
    out = tmp_path / "run"
    assert train_real(data, out, "--labels", str(labels), "--batch-size", "32") == 1
    line = one_error_line(capsys.readouterr().out)  # the log (stdout) says it
    assert damaged in line and line.endswith(
        "last checkpoint: none; fix it and rerun with --resume"
    )


def test_converter_import_leaves_torch_threads_alone():
    """FFCV's compiler module sets torch's thread count to 1 for the whole process."""
    code = (
        "import torch; torch.set_num_threads(2)\n"
        "from convert import imagenet_to_ffcv; imagenet_to_ffcv._make_writer_class()\n"
        "import pipelines.ffcv_pipeline\n"
        "print(torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "2"


def test_metrics_cut_short_by_a_crash_do_not_block_resume(tmp_path):
    out = tmp_path / "run"
    assert run_main(out, "--epochs", "1") == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 1, "l_uns')  # a write cut short
    assert run_main(out, "--epochs", "2", "--resume") == 0
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]


def test_beton_of_another_dataset_stops_train_py_naming_the_file(cifar_dataset, tmp_path, capsys):
    data = copy_dataset(cifar_dataset, tmp_path / "data")
    replace_file(data / "train.beton", (cifar_dataset / "val.beton").read_bytes())
    assert train_real(data, tmp_path / "run", "--epochs", "1") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(data / "train.beton") in line and "another conversion" in line, line

    # A manifest from before sizes were recorded: the pipeline's own check still stops it.
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["formats"]["ffcv"]["sizes"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert train_real(data, tmp_path / "run2", "--epochs", "1") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "train.beton" in line and "different conversions" in line, line


def test_truncated_shard_stops_a_dali_run_naming_the_file(cifar_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(cifar_dataset / "manifest.json", data)
    shutil.copytree(cifar_dataset / "shards", data / "shards")
    shard = data / load_manifest(data).formats["dali"]["shards"]["train"][0]
    shard.write_bytes(shard.read_bytes()[:-5000])
    assert train_real(data, tmp_path / "run", "--epochs", "1", pipeline="dali") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(shard) in line and "truncated" in line and "imagenet_to_dali.py" in line, line


def test_split_file_naming_a_missing_image_stops_train_py(cifar_dataset, tmp_path, capsys):
    files = load_manifest(cifar_dataset).splits["train"].files
    split = tmp_path / "labeled.txt"
    split.write_text("\n".join([*files[:30], "airplane/not-there.jpg"]) + "\n")
    out = tmp_path / "run"
    assert train_real(cifar_dataset, out, "--labels", str(split), "--epochs", "1") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(split) in line and "airplane/not-there.jpg" in line and "remove" in line, line
    assert not (out / "checkpoint.pt").exists()


def test_resume_with_data_moved_or_of_another_dataset_says_which(
    cifar_dataset, cifar_tree, tmp_path, capsys
):
    """Moved: a resume without --data names the missing folder and asks for --data, and goes
    on with it. Another dataset, whose files the run's own labels.txt names are not in: the
    dataset check comes first, so the error says what is wrong (not to edit labels.txt)."""
    from convert import imagenet_to_ffcv

    out, first = tmp_path / "run", copy_dataset(cifar_dataset, tmp_path / "data")
    assert train_real(first, out, "--epochs", "1") == 0
    moved = first.rename(tmp_path / "moved")
    resume = [*REAL, "--pipeline", "ffcv", "--out", str(out), "--resume", "--epochs", "2"]
    capsys.readouterr()
    assert load_train().main(resume) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"error: --data {first}: no such folder (the run's dataset); if it has "
                    "moved, pass --data DIR where it is now")  # fmt: skip
    assert load_train().main([*resume, "--data", str(moved)]) == 0
    other = tmp_path / "other-tree" / "train"
    for folder in sorted((cifar_tree / "train").iterdir()):
        (other / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:20]:
            shutil.copy(f, other / folder.name / f"b-{f.name}")
    data = tmp_path / "other"
    imagenet_to_ffcv.main(
        ["--src", str(other.parent), "--out", str(data), "--max-resolution", "32"]
    )
    capsys.readouterr()
    assert train_real(data, out, "--epochs", "3", "--resume") == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --data {data}: not the dataset the run in {out} started on")
    assert "(200 training images in 10 classes, against 600 in 10" in line, line
    assert load_manifest(cifar_dataset).splits["train"].num_samples == 600


def test_missing_data_folder_is_one_error_line_from_the_command_line(tmp_path):
    missing = tmp_path / "no-such-dataset"
    cmd = [sys.executable, "train.py", *REAL, "--pipeline", "ffcv", "--data", str(missing)]
    cmd += ["--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert str(missing) in line and "does not exist" in line and "convert/" in line, line


def test_converter_command_line_bad_input_is_one_error_line(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tree / "a" / "x.jpg")
    cmd = [sys.executable, "convert/imagenet_to_dali.py", "--src", str(tree), "--out"]
    done = subprocess.run([*cmd, str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert str(tree / "b") in line and "empty class folder" in line and "remove" in line, line


def test_converter_errors_say_what_to_do(tmp_path):
    with pytest.raises(common.ConversionError, match=r"nowhere: source folder does not.*--src"):
        common.prepare_source(tmp_path / "nowhere")
    (tmp_path / "out").mkdir()
    with common.output_lock(tmp_path / "out"):
        with pytest.raises(common.ConversionError, match="another conversion.*wait"):
            with common.output_lock(tmp_path / "out"):
                pass


def test_corrupt_jpegs_are_counted_and_logged_skips(cifar_tree, tmp_path, caplog):
    """Real CIFAR JPEGs with a garbled header or a scan cut short: skipped, counted, logged."""
    tree = tmp_path / "tree"
    real = sorted((cifar_tree / "train" / "cat").iterdir())[:6]
    for cls in ("a", "b"):
        (tree / cls).mkdir(parents=True)
        for p in real[:3]:
            shutil.copy(p, tree / cls / p.name)
    data = real[3].read_bytes()
    (tree / "a" / "header.jpg").write_bytes(data[:2] + b"\x12" * 40 + data[42:])
    data = real[4].read_bytes()
    (tree / "b" / "scan.jpg").write_bytes(data[: data.find(b"\xff\xda") + 4])
    source = common.prepare_source(tree)
    reasons = dict(source.skipped)
    assert sorted(reasons) == ["a/header.jpg", "b/scan.jpg"]
    assert reasons["a/header.jpg"].startswith("not an image")
    assert reasons["b/scan.jpg"].startswith("truncated")
    assert source.splits["train"].counts(2) == [3, 3]
    assert "skipping a/header.jpg" in caplog.text and "skipping b/scan.jpg" in caplog.text


# ----------------------------------------------------------------------------- kill -9


def test_kill_9_at_a_random_step_then_resume_continues_the_same_run(cifar_dataset, tmp_path):
    """SIGKILL mid-epoch on real data, then --resume: the run goes on from the checkpoint's
    epoch with that epoch's data order and finishes with every step exactly once."""
    epochs, steps = 2, load_manifest(cifar_dataset).splits["train"].num_samples // 128
    seed = int(os.environ.get("SUNCET_KILL_SEED", random.SystemRandom().randrange(10**6)))
    # Any step after the first checkpoint except an epoch's last (then the kill lands in the
    # epoch's end; test_kill_during_a_checkpoint_write covers that on purpose).
    kill_at = random.Random(seed).choice([s for s in range(steps + 1, epochs * steps) if s % steps])
    why = f"SUNCET_KILL_SEED={seed}: SIGKILL after step {kill_at}"
    print(why)
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", *REAL, "--pipeline", "ffcv", "--data", str(cifar_dataset)]
    cmd += ["--epochs", str(epochs), "--out", str(out)]

    # 1. Start, wait for step `kill_at` in metrics.jsonl, SIGKILL.
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 400
        while max((r["step"] for r in records(out)), default=0) < kill_at:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"{why}: run ended first\n{(tmp_path / 'killed.log').read_text()}")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL

    # 2. The checkpoint is whole: the end of the epoch before the one killed.
    killed = records(out)
    state = ckpt.load_checkpoint(out / ckpt.LATEST)
    epoch = (kill_at - 1) // steps
    assert (state["epoch"], state["step"]) == (epoch, epoch * steps), why
    assert sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint.pt"], why

    # 3. Resume with the same command.
    done = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{why}\n{done.stdout}\n{done.stderr}"
    assert f"at epoch {epoch}, step {epoch * steps}" in done.stdout, why

    # 4. Every step once; the kept steps are the killed run's; the steps it ran again after the
    #    checkpoint see the same batches from the same weights (same losses, same epoch).
    final = records(out)
    assert [r["step"] for r in final] == list(range(1, epochs * steps + 1)), why
    assert final[: epoch * steps] == killed[: epoch * steps], why
    again = [r for r in killed if r["step"] > epoch * steps]
    assert again, why
    for old in again:
        new = final[old["step"] - 1]
        assert new["epoch"] == old["epoch"] == epoch, why
        assert new["l_unsup"] == pytest.approx(old["l_unsup"], rel=1e-5), why
        assert new["l_sup"] == pytest.approx(old["l_sup"], rel=1e-5), why
        assert new["lr"] == old["lr"], why
    state = ckpt.load_checkpoint(out / ckpt.LATEST)
    assert (state["epoch"], state["step"]) == (epochs, epochs * steps), why
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp")), why


DIE_IN_SECOND_CHECKPOINT = """
import os, runpy, signal, sys
import torch
from runner import checkpoint
torch.set_num_threads(int(sys.argv[1]))  # the test's own count: same float sums as in-process
real, calls = checkpoint._write, []
def write(obj, f):
    calls.append(1)
    if len(calls) == 2:  # 4 KB of epoch 1's checkpoint reach the disk, then the kill
        f.write(b"\\x80" * 4096); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real(obj, f)
checkpoint._write = write
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--out", str(out), "--epochs", "2"]
    threads = str(torch.get_num_threads())  # FFCV's import sets it to 1 in this process
    cmd = [sys.executable, "-c", DIE_IN_SECOND_CHECKPOINT, threads, *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr

    # The half-written file is the temporary; checkpoint.pt is epoch 0's, whole.
    assert (out / ".checkpoint.pt.tmp").stat().st_size == 4096
    state = ckpt.load_checkpoint(out / ckpt.LATEST)
    assert (state["epoch"], state["step"]) == (1, 2)
    killed = records(out)
    assert [r["step"] for r in killed] == [1, 2, 3, 4]  # epoch 1 was done but not saved

    # Resumed: epoch 1 again, from epoch 0's weights, on epoch 1's batches.
    assert run_main(out, "--epochs", "2", "--resume") == 0
    got = records(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4] and got[:2] == killed[:2]
    for a, b in zip(got[2:], killed[2:], strict=True):
        assert a["epoch"] == b["epoch"] == 1
        assert a["l_unsup"] == pytest.approx(b["l_unsup"], rel=1e-6), (a, b)
    assert ckpt.load_checkpoint(out / ckpt.LATEST)["epoch"] == 2
    assert not list(out.glob(".*.tmp"))


class Interrupted(Exception):
    pass


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, monkeypatch):
    import runner.loop

    out = tmp_path / "run"

    def die_before_the_checkpoint(self, epoch):
        raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(runner.loop.Trainer, "end_epoch", die_before_the_checkpoint)
        with pytest.raises(Interrupted):
            run_main(out, "--epochs", "2")
    assert not (out / ckpt.LATEST).exists() and [r["step"] for r in records(out)] == [1, 2]

    assert run_main(out, "--epochs", "2", "--resume") == 0
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]  # no step logged twice


def test_unreadable_checkpoint_on_resume_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(out, "--epochs", "1") == 0
    (out / ckpt.LATEST).write_bytes(b"PK\x03\x04 not a whole checkpoint")
    capsys.readouterr()
    assert run_main(out, "--epochs", "2", "--resume") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out / ckpt.LATEST) in line and "checkpoint-epNNNN.pt" in line, line
    assert "--force" in line


# ----------------------------------------------------------------------------- disk full


def full_disk_on(monkeypatch, target: object, name: str, nth: int) -> None:
    """Makes the `nth` call of `target.name` fail as a full disk does."""
    real, calls = getattr(target, name), []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, write)


@pytest.mark.parametrize(
    "where, nth, kept_epoch, says",
    [
        ("checkpoint", 2, 1, "(disk full)"),  # epoch 1's checkpoint.pt
        ("plot", 2, 2, "No space left"),  # epoch 1's plot, after its checkpoint
        ("metrics", 3, 1, "No space left"),  # step 3's line of metrics.jsonl
    ],
)
def test_full_disk_stops_the_run_keeping_the_last_checkpoint_and_says_so(
    tmp_path, monkeypatch, caplog, where, nth, kept_epoch, says
):
    from runner import metrics

    target = {"checkpoint": (ckpt, "_write"), "plot": (metrics, "plot")}.get(where)
    full_disk_on(monkeypatch, *(target or (metrics.MetricsLog, "append")), nth)
    out = tmp_path / "run"
    assert run_main(out, "--epochs", "3") == 1
    state = ckpt.load_checkpoint(out / ckpt.LATEST)
    assert state["epoch"] == kept_epoch
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], errors
    assert "checkpoint.pt" in errors[0] and ("intact" in errors[0] or "last" in errors[0])
    assert "rerun with --resume" in errors[0]  # what to do
    assert not list(out.glob(".*.tmp"))


def test_sigterm_during_training_names_the_last_checkpoint(tmp_path):
    """SIGTERM (torchrun stopping the other ranks, a scheduler's preemption) ends the run as
    Ctrl-C does: one line naming the last checkpoint, status 143, and --resume continues."""
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", *TINY, "--epochs", "50", "--out", str(out)]
    with open(tmp_path / "term.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (out / ckpt.LATEST).is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"run ended first\n{(tmp_path / 'term.log').read_text()}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    printed = (tmp_path / "term.log").read_text()
    assert f"terminated (SIGTERM); last checkpoint: {out / ckpt.LATEST}; rerun with --resume" in (
        printed
    )
    assert "Traceback" not in printed and f"run folder: {out.resolve()}" in printed
    assert run_main(out, "--epochs", "2", "--resume") == 0


BLOCKED_RANK = """
import os, sys, time
import torch.distributed as dist
sys.path.insert(0, os.getcwd())
from runner.sigterm import SigtermGuard

rank = int(os.environ["RANK"])
if rank == 0:
    SigtermGuard(grace=1.0, last_checkpoint=lambda: "ckpt-of-the-test").install()
dist.init_process_group("gloo", rank=rank, world_size=2)
if rank == 0:
    print("waiting", flush=True)
    dist.barrier()  # rank 1 never comes: blocked in C, where Python runs no handler
    print("left the barrier", flush=True)
else:
    time.sleep(120)
"""


def test_sigterm_ends_a_rank_blocked_in_a_collective_after_the_grace_period(tmp_path):
    """A rank blocked in a collective (its peer stopped) never runs Python's handler; the
    watcher ends it after the grace period with status 143 and a line naming the checkpoint,
    instead of waiting there for the sender's SIGKILL."""
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED_RANK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env={**env, "RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    try:
        assert procs[0].stdout.readline() == "waiting\n", procs[0].stderr.read()
        time.sleep(0.5)  # in the barrier
        start = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=60) == 143
        waited = time.monotonic() - start
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert "left the barrier" not in procs[0].stdout.read()
    assert "did not take it within 1 s" in err and "last checkpoint: ckpt-of-the-test" in err, err
    assert waited < 30, waited  # the grace period, not the peer's 120 s


SWALLOWED = """
import os, signal, sys, threading, time
sys.path.insert(0, os.getcwd())
from runner.sigterm import SigtermGuard

SigtermGuard(grace=0.5, stop_within=1.0).install()


class Slow:
    def __del__(self):  # the signal lands here: its Terminated is printed and dropped
        time.sleep(2)


threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
x = Slow()
del x
time.sleep(20)
print("still running", flush=True)
"""


def test_a_sigterm_lost_in_a_cleanup_still_ends_the_process(tmp_path):
    """A Terminated raised inside __del__ is dropped by Python; the watcher ends the process
    `stop_within` seconds after the signal was taken."""
    script = tmp_path / "swallowed.py"
    script.write_text(SWALLOWED)
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 143 and "still running" not in done.stdout, done
    assert "Exception ignored" in done.stderr, done.stderr  # what swallowed it
    assert "did not end within 1 s of taking it" in done.stderr, done.stderr
    assert time.monotonic() - start < 15


FORKED_CHILD = """
import os, signal, sys, time
sys.path.insert(0, os.getcwd())
from runner.sigterm import SigtermGuard

SigtermGuard(grace=0.5).install()
pid = os.fork()
if pid == 0:  # a worker that gets SIGTERM (a DataLoader terminating it), with the handler
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    except KeyboardInterrupt:
        os._exit(0)
    os._exit(1)
os.waitpid(pid, 0)
time.sleep(2)  # the parent's watcher would end it here, 0.5 s after the child's signal
print("parent alive", flush=True)
"""


def test_sigterm_to_a_forked_child_leaves_the_parent_alone(tmp_path):
    script = tmp_path / "fork.py"
    script.write_text(FORKED_CHILD)
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stdout == "parent alive\n", done.stderr


def test_sigterm_guard_puts_back_the_previous_handler_and_keeps_an_ignored_sigterm():
    from runner.sigterm import SigtermGuard, Terminated

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        guard = SigtermGuard()
        assert guard.install()
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
        os.kill(os.getpid(), signal.SIGTERM)  # a second one while the first is handled
        time.sleep(0.2)
        guard.uninstall()
        assert signal.getsignal(signal.SIGTERM) is mine

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        assert not SigtermGuard().install()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
