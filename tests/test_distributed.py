"""Distributed training on CPU (gloo, 2 processes): torchrun end to end, and the rank rules.

- `torchrun --standalone --nproc-per-node 2` runs this file, which runs train.py's `main`
  unchanged and only records what each rank saw (`probe_main`): the samples of every step, the
  rank's own losses, and digests of its weights after resuming and at the end. One epoch on the
  CIFAR-10 subset, then `--resume` to two.
- `torch.multiprocessing.spawn` starts 2 gloo ranks that build the FFCV and DALI pipelines
  (shared and per-rank classes) and all_gather the samples of an epoch, then check DDP's
  gradients against one process on the double batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import ROOT, load_train  # ROOT on sys.path, train.py as a module

WORLD = 2
STEPS = 4  # per epoch: 300 images per rank // batch 64 (drop_last)
TRAIN_ARGS = [
    "--pipeline", "ffcv", "--labels", "10pct", "--device", "cpu", "--arch", "resnet18",
    "--hidden-dim", "32", "--out-dim", "16", "--head-layers", "2", "--large-size", "16",
    "--small-size", "8", "--n-small", "1", "--batch-size", "64", "--classes-per-batch", "5",
    "--images-per-class", "2", "--log-interval", "1", "--num-workers", "1",
    "--blur-p-large", "0", "--warmup-epochs", "1", "--base-lr", "0.5", "--seed", "3",
]  # fmt: skip
STRIDE_WARNING = "Grad strides do not match bucket view strides"


# ---------------------------------------------------------------- the torchrun probe (child)


def digests(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of every state tensor's values (layout-independent), by name."""
    out = {}
    for name, t in model.state_dict().items():
        data = t.detach().cpu().contiguous().numpy().tobytes()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def probe_main(argv: list[str]) -> int:
    """`torchrun ... tests/test_distributed.py PROBE_DIR TRAIN_ARGS...`: train.py's main, observed.

    Wraps `setup` (weights right after resuming), `Trainer.forward_losses` (samples and this
    rank's losses per step) and `Trainer.fit` (weights at the end); changes nothing they do.
    """
    probe_dir, train_args = Path(argv[0]), argv[1:]
    train = load_train()
    from runner import loop
    from runner.distributed import unwrap

    rec: dict = {"steps": []}
    setup, forward_losses, fit = train.setup, loop.Trainer.forward_losses, loop.Trainer.fit

    def probed_setup(args):
        trainer, pipeline, start_epoch = setup(args)
        rec["start"] = (start_epoch, trainer.step, digests(unwrap(trainer.model)))
        return trainer, pipeline, start_epoch

    def probed_forward_losses(self, batch, epoch):
        losses = forward_losses(self, batch, epoch)
        rec["steps"].append({
            "epoch": epoch, "step": self.step + 1, "indices": batch.indices.tolist(),
            "labeled": batch.labeled_indices.tolist(), "labels": batch.labels.tolist(),
            "l_unsup": losses.l_unsup.item(), "l_sup": losses.l_sup.item(),
        })  # fmt: skip
        return losses

    def probed_fit(self, pipeline, start_epoch=0):
        fit(self, pipeline, start_epoch)
        model = unwrap(self.model)
        rec["params"] = [name for name, _ in model.named_parameters()]
        rec["final"] = digests(model)

    train.setup = probed_setup
    loop.Trainer.forward_losses = probed_forward_losses
    loop.Trainer.fit = probed_fit
    status = train.main(train_args)
    torch.save(rec, probe_dir / f"rank{os.environ['RANK']}.pt")
    return status


# ---------------------------------------------------------------- the torchrun runs (parent)


def torchrun(probe_dir: Path, *args: str) -> subprocess.CompletedProcess:
    probe_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(WORLD), __file__, str(probe_dir), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def ranks(probe_dir: Path) -> list[dict]:
    return [torch.load(probe_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def runs(cifar_dataset, tmp_path_factory):
    """One epoch under torchrun, then `--resume --epochs 2`, with what each run left behind."""
    base = tmp_path_factory.mktemp("torchrun")
    out = base / "runs" / "ddp"
    args = [*TRAIN_ARGS, "--data", str(cifar_dataset), "--out", str(out)]
    first = torchrun(base / "probe1", *args, "--epochs", "1")
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    saved = {"epoch": state["epoch"], "step": state["step"]}
    saved["digests"] = digests_of_state(state["model"])
    first_metrics = (out / "metrics.jsonl").read_text()
    second = torchrun(base / "probe2", "--out", str(out), "--resume", "--epochs", "2")
    return {
        "out": out, "base": base, "first": first, "second": second, "saved": saved,
        "first_metrics": [json.loads(x) for x in first_metrics.splitlines()],
        "ranks1": ranks(base / "probe1"), "ranks2": ranks(base / "probe2"),
    }  # fmt: skip


def digests_of_state(state: dict) -> dict[str, str]:
    module = torch.nn.Module()
    module.state_dict = lambda: state  # digests() reads only state_dict()
    return digests(module)


def step_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("step ")]


def test_torchrun_trains_with_ddp_and_rank_0_alone_writes_one_run_folder(runs):
    out = runs["out"]
    assert [p.name for p in out.parent.iterdir()] == ["ddp"]
    written = sorted(p.relative_to(runs["base"]).as_posix() for p in runs["base"].rglob("*.pt"))
    probes = [f"probe{i}/rank{r}.pt" for i in (1, 2) for r in range(WORLD)]
    assert written == sorted(["runs/ddp/checkpoint.pt", *probes])  # one checkpoint, no copies
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for run in (runs["first"], runs["second"]):
        assert STRIDE_WARNING not in run.stderr  # channels-last before the DDP wrap
        assert run.stdout.count("run folder: ") == 1
    # Every step is logged once, by rank 0, to stdout and train.log.
    first, second = step_lines(runs["first"].stdout), step_lines(runs["second"].stdout)
    assert [line.split(" |")[0] for line in first + second] == [
        f"step {s} ep {(s - 1) // STEPS}" for s in range(1, 2 * STEPS + 1)
    ]
    logged = [line.split(" ", 1)[1] for line in (out / "train.log").read_text().splitlines()]
    assert [line for line in logged if line.startswith("step ")] == first + second
    assert "2 rank(s) on cpu" in runs["first"].stdout
    identity = json.loads((out / "dataset.json").read_text())  # what a resume checks
    assert identity["train_images"] == WORLD * 300 and identity["classes"] == 10


def test_torchrun_resume_loads_the_same_checkpoint_on_every_rank(runs):
    saved = runs["saved"]
    assert (saved["epoch"], saved["step"]) == (1, STEPS)
    for rank in runs["ranks2"]:
        start_epoch, step, weights = rank["start"]
        assert (start_epoch, step) == (1, STEPS)
        assert weights == saved["digests"]  # parameters and BatchNorm buffers
        assert rank["steps"][0]["epoch"] == 1 and rank["steps"][0]["step"] == STEPS + 1
    stdout = runs["second"].stdout
    assert f"at epoch 1, step {STEPS}" in stdout
    assert step_lines(stdout)[0].startswith(f"step {STEPS + 1} ep 1 |")
    recs = [json.loads(x) for x in (runs["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "l_unsup" in r] == list(range(1, 2 * STEPS + 1))
    state = torch.load(runs["out"] / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (2, 2 * STEPS)


def test_torchrun_ranks_end_with_identical_weights(runs):
    final = runs["out"] / "checkpoint.pt"
    saved = digests_of_state(torch.load(final, weights_only=False)["model"])
    r0, r1 = runs["ranks2"]
    params = r0["params"]
    assert params and all(r0["final"][n] == r1["final"][n] == saved[n] for n in params)


def test_torchrun_lr_and_logged_losses_come_from_the_global_batch(runs):
    recs = runs["first_metrics"]
    # Warm-up of one epoch ends at the peak: base_lr x (64 x 2 ranks) / 256.
    assert recs[STEPS - 1]["lr"] == pytest.approx(0.5 * 64 * WORLD / 256)
    # The logged loss is the mean of the rank losses (each over its own anchors).
    r0, r1 = runs["ranks1"]
    for rec, a, b in zip(recs, r0["steps"], r1["steps"], strict=True):
        assert rec["l_unsup"] == pytest.approx((a["l_unsup"] + b["l_unsup"]) / 2, rel=1e-5)
        assert rec["l_sup"] == pytest.approx((a["l_sup"] + b["l_sup"]) / 2, rel=1e-5)
        assert a["l_unsup"] != b["l_unsup"]  # the ranks saw different images


def test_torchrun_ranks_train_on_disjoint_images_and_shared_classes(runs):
    for r0, r1 in (runs["ranks1"], runs["ranks2"]):
        for a, b in zip(r0["steps"], r1["steps"], strict=True):
            assert sorted(a["labels"]) == sorted(b["labels"])  # the same C classes
            assert not set(a["labeled"]) & set(b["labeled"])
        for epoch in {s["epoch"] for s in r0["steps"]}:
            seen = [{i for s in r["steps"] if s["epoch"] == epoch for i in s["indices"]}
                    for r in (r0, r1)]  # fmt: skip
            assert len(seen[0]) == len(seen[1]) == STEPS * 64 and not seen[0] & seen[1]


def test_resume_with_another_number_of_ranks_is_refused(runs, capsys):
    before = (runs["out"] / "checkpoint.pt").read_bytes()
    assert load_train().main(["--out", str(runs["out"]), "--resume"]) == 2  # 1 rank, not 2
    err = capsys.readouterr().err
    assert f"is at step {2 * STEPS} after 2 epoch(s) ({STEPS} steps per epoch)" in err
    assert "1 rank(s) on this data make 9 per epoch" in err
    assert (runs["out"] / "checkpoint.pt").read_bytes() == before


# ------------------------------------------------------- pipelines and DDP under spawn (gloo)

PIPELINE_CASES = [(backend, per_rank) for backend in ("ffcv", "dali") for per_rank in (False, True)]
V, B, N, D_IN, D = 3, 4, 6, 10, 8


def pipeline_samples(data_dir: str, backend: str, per_rank: bool, rank: int) -> dict:
    """One epoch of samples (unlabeled, labeled, labels) of one rank's pipeline, `[steps, .]`."""
    from convert.manifest import load_manifest
    from convert.splits import resolve_split
    from pipelines.build import build_pipeline
    from pipelines.config import AugConfig, DataConfig

    data = DataConfig(data=data_dir, batch_size=32, classes_per_batch=5, images_per_class=2,
                      num_workers=1, per_rank_classes=per_rank)  # fmt: skip
    aug = AugConfig(n_large=2, large_size=8, n_small=0, small_size=8, blur_p_large=0)
    split = resolve_split(load_manifest(data_dir), "10pct", seed=0, data_dir=data_dir)
    labeled = np.asarray(split, dtype=np.int64)
    pipe = build_pipeline(backend, data_dir, data, aug, labeled, device="cpu", rank=rank,
                          world_size=WORLD, seed=7)  # fmt: skip
    try:
        pipe.set_epoch(1)
        batches = list(pipe)
    finally:
        pipe.close()
    return {
        key: torch.stack([getattr(b, key) for b in batches])
        for key in ("indices", "labeled_indices", "labels")
    }


def ddp_gradients(rank: int) -> list[torch.Tensor]:
    """This rank's DDP gradients of NT-Xent + SuNCEt for its half of `loss_inputs()`."""
    from torch.nn.parallel import DistributedDataParallel

    net, x_u, x_s, labels = loss_inputs()
    ddp = DistributedDataParallel(net)
    mine_u = x_u[:, rank * B : (rank + 1) * B]  # [V, B, D_IN]
    mine_s, mine_y = x_s[rank * N : (rank + 1) * N], labels[rank * N : (rank + 1) * N]
    loss_of(ddp, mine_u, mine_s, mine_y, gather=True).backward()
    return [p.grad for p in net.parameters()]


def loss_inputs():
    """A BatchNorm-free net and the global batch: `[V, 2B, D_IN]`, `[2N, D_IN]`, `[2N]`."""
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    net = torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.ReLU(), torch.nn.Linear(16, D))
    x_u = torch.randn(V, WORLD * B, D_IN, generator=gen)  # [V, 2B, D_IN]
    x_s = torch.randn(WORLD * N, D_IN, generator=gen)  # [2N, D_IN]
    labels = torch.tensor([2, 0, 2, 5, 0, 5, 5, 2, 0, 9, 9, 2])  # [2N], classes span ranks
    return net, x_u, x_s, labels


def loss_of(model, x_u, x_s, labels, gather: bool) -> torch.Tensor:
    """NT-Xent + SuNCEt with one forward over all inputs (as the trainer does under DDP)."""
    from model.losses import NTXentLoss, SuNCEtLoss

    n_u = x_u.shape[0] * x_u.shape[1]
    z = model(torch.cat([x_u.reshape(n_u, -1), x_s]))  # [V*B + N, D]
    z_u = z[:n_u].reshape(x_u.shape[0], x_u.shape[1], -1)  # [V, B, D]
    l_u = NTXentLoss(0.2, gather_distributed=gather)(z_u)
    return l_u + SuNCEtLoss(0.2, 0.1, gather_distributed=gather)(z[n_u:], labels)


def strided_gradients(sender: int) -> list[torch.Tensor]:
    """What rank `sender` sends back for each gathered part: values 100*sender + 10*part +
    0..11 in `[3, 4]`, laid out as the transpose of a contiguous tensor (dense, strided)."""
    parts = []
    for part in range(WORLD):
        g = torch.arange(12.0).reshape(3, 4) + 100 * sender + 10 * part  # [3, 4]
        parts.append(g.T.contiguous().T)  # same values, strides (1, 3)
    return parts


def strided_gather_gradient(rank: int) -> torch.Tensor:
    """This rank's input gradient through `_AllGather` when strided gradients come back."""
    from model.distributed import _AllGather

    x = torch.zeros(3, 4, requires_grad=True)
    torch.autograd.backward(_AllGather.apply(x), strided_gradients(rank))
    return x.grad


def _worker(rank: int, init_file: str, data_dir: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    result = {"grads": ddp_gradients(rank), "strided": strided_gather_gradient(rank)}
    for backend, per_rank in PIPELINE_CASES:
        result[backend, per_rank] = pipeline_samples(data_dir, backend, per_rank, rank)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(cifar_dataset, tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("spawn")
    out = tmp / "gathered.pt"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks
        mp.spawn(_worker, args=(str(tmp / "init"), str(cifar_dataset), str(out)), nprocs=WORLD)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_ranks_read_disjoint_unlabeled_images_within_an_epoch(spawned, backend):
    for per_rank in (False, True):
        r0, r1 = (r[backend, per_rank]["indices"].reshape(-1).tolist() for r in spawned)
        assert len(r0) == len(r1) == len(set(r0)) == len(set(r1)) == 9 * 32
        assert not set(r0) & set(r1)


def test_ffcv_and_dali_ranks_read_the_same_unlabeled_images(spawned):
    for r in spawned:
        assert torch.equal(r["ffcv", False]["indices"], r["dali", False]["indices"])


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_ranks_draw_the_same_classes_from_disjoint_images_by_default(
    spawned, backend, cifar_dataset
):
    from convert.manifest import load_manifest

    labels_of = torch.tensor(load_manifest(cifar_dataset).splits["train"].labels)
    r0, r1 = (r[backend, False] for r in spawned)
    for rank in (r0, r1):
        assert torch.equal(rank["labels"], labels_of[rank["labeled_indices"]])
    for step in range(r0["labels"].shape[0]):
        a, b = r0["labels"][step], r1["labels"][step]
        assert sorted(a.tolist()) == sorted(b.tolist()) and len(set(a.tolist())) == 5
        assert not set(r0["labeled_indices"][step].tolist()) & set(
            r1["labeled_indices"][step].tolist()
        )


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_per_rank_classes_gives_each_rank_its_own_classes(spawned, backend):
    r0, r1 = (r[backend, True]["labels"] for r in spawned)
    classes = [(set(a.tolist()), set(b.tolist())) for a, b in zip(r0, r1, strict=True)]
    assert all(len(a) == len(b) == 5 for a, b in classes)  # still C classes x K per rank
    assert sum(a != b for a, b in classes) >= len(classes) // 2


def test_gather_sums_strided_gradients_into_the_right_rows(spawned):
    for rank, result in enumerate(spawned):
        expected = sum(strided_gradients(sender)[rank] for sender in range(WORLD))
        assert torch.equal(result["strided"], expected)


def test_ddp_gradients_match_one_process_on_the_double_batch(spawned):
    net, x_u, x_s, labels = loss_inputs()
    loss_of(net, x_u, x_s, labels, gather=False).backward()
    for rank in spawned:
        for got, ref in zip(rank["grads"], net.parameters(), strict=True):
            torch.testing.assert_close(got, ref.grad)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--temperature", "0"], "error: --temperature: must be"),  # before the group starts
        (["--classes-per-batch", "999"], "error: --classes-per-batch 999"),  # by the split
        (["--pipeline", "ffcv", "--data", "nowhere"], "error: nowhere: dataset folder does not"),
    ],
)
def test_a_bad_setting_under_torchrun_is_one_line_from_rank_0(tmp_path, flags, says):
    from test_train import TINY

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(WORLD), "train.py", *TINY, *flags, "--out", str(tmp_path / "run")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if x.startswith(("error:", "[rank"))]
    assert len(lines) == 1 and lines[0].startswith(says), done.stderr[-3000:]


def test_non_finite_losses_under_torchrun_stop_every_rank_with_one_line(tmp_path):
    """The losses are the global batch's, so every rank stops at the same step; rank 0 alone
    says so."""
    from test_train import TINY

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(WORLD), "train.py", *TINY, "--temperature", "1e-40", "--max-nonfinite", "1",
           "--epochs", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [x for x in (done.stdout + done.stderr).splitlines() if "error:" in x]
    assert len(lines) == 1 and lines[0].startswith("error: stopped at step 1 (epoch 0)"), (
        done.stdout[-2000:] + done.stderr[-3000:]
    )


def rank_pid(rank: int, launcher: int) -> int | None:
    """The pid of torchrun's worker `rank` (a process whose environment holds RANK=rank and
    whose parent's parent is the launcher)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if (
            b"train.py" in cmdline
            and b"torch.distributed.run" not in cmdline
            and (f"RANK={rank}".encode() in env and f"TORCHELASTIC_AGENT_PID={launcher}".encode())
        ):
            return int(pid)
    return None


def test_a_rank_killed_mid_run_leaves_the_others_one_line_each_not_a_traceback(tmp_path):
    """kill -9 of rank 0: rank 1's next collective fails (Gloo: "Connection closed by peer")
    before torchrun's SIGTERM reaches it; it says so in one line, or ends quietly on the
    SIGTERM, never with a traceback through train.py."""
    import signal
    import time

    from test_train import TINY

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(WORLD), "train.py", *TINY, "--epochs", "500", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").is_file() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        pid = rank_pid(0, proc.pid)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        printed, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert 'train.py", line' not in printed, printed[-4000:]
    said = [x for x in printed.splitlines() if x.startswith("[rank 1] ")]
    assert all(x.startswith("[rank 1] error: lost the other ranks (") for x in said), said
    assert all("last checkpoint: " in x for x in said), said


def test_a_failed_check_is_said_by_rank_0_and_by_a_rank_whose_error_differs():
    from runner.distributed import RanksFailed

    same = ["bad option", "bad option"]
    assert [RanksFailed(same, r).report() for r in (0, 1)] == ["error: bad option", None]
    own = [None, "rank 1's folder is missing", None, "rank 1's folder is missing"]
    assert [RanksFailed(own, r).report() for r in range(4)] == [
        "error: rank 1 (and 1 more rank(s)): rank 1's folder is missing",
        "[rank 1] error: rank 1's folder is missing",
        None,
        "[rank 3] error: rank 1's folder is missing",
    ]
    differs = ["no labels.txt", "cannot read manifest.json"]
    assert RanksFailed(differs, 1).report() == "[rank 1] error: cannot read manifest.json"


if __name__ == "__main__":
    sys.exit(probe_main(sys.argv[1:]))
