"""The training step and the epoch loop: losses, skipped non-finite steps, logging, checkpoints.

One step: one forward of `[labeled views..., large views..., small views...]` (the model runs
its backbone once per crop size), NT-Xent over the unlabeled projections `[V, B, D]`, SuNCEt
over the labeled projections with the labels repeated per supervised view, and
`suncet_total` of the two. Loss sums stay on the device and are read only on log steps; each
step's finite flag gates its update on the device and is read by the host late (IntervalStats).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.losses import NTXentLoss, SuNCEtLoss, suncet_total
from model.optim import set_lr
from pipelines.batch import Batch
from runner import checkpoint as ckpt
from runner import metrics
from runner.config import TrainConfig, to_dict
from runner.distributed import DistInfo, barrier, mean_over_ranks, unwrap

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the message names the last good checkpoint."""


@dataclass
class StepLosses:
    """One step's losses, still on the device; `l_sup` is None once SuNCEt is off."""

    l_unsup: Tensor
    l_sup: Tensor | None
    total: Tensor


class PendingFlag(NamedTuple):
    """A step's finite flag and losses on their way to the host, `[3]`: flag, l_unsup, l_sup."""

    step: int
    epoch: int
    sup: bool  # whether the step had an l_sup
    values: Tensor  # [3] on the host (pinned, filled by a non-blocking copy on CUDA)
    event: object | None  # the CUDA event after that copy; None on a CPU


class IntervalStats:
    """Device-side loss sums and host-side timing of one log interval, and the step flags
    (finite loss or not) that the host has yet to read.

    Args:
        device: where the losses live.
        lag: steps a flag stays unread (default 2 on CUDA, 0 elsewhere). On CUDA a step's
            flag and losses go to pinned host memory by a non-blocking copy and are read
            `lag` steps later (or on a log step), long after the GPU has passed them: the GPU
            never waits for the host. On a CPU reading costs nothing, so it is immediate.

    Flags are read by step count alone, never "as soon as the copy is done": every rank
    then reads (and stops on `max_nonfinite`) at the same step, whatever its own timing; a
    rank that stopped one step before the others would leave them in a collective.
    """

    def __init__(self, device: torch.device, lag: int | None = None):
        self.device = device
        self.lag = (2 if device.type == "cuda" else 0) if lag is None else lag
        self.pending: deque[PendingFlag] = deque()
        self.reset()

    def reset(self) -> None:
        zero = lambda: torch.zeros((), device=self.device)
        self.sum_unsup, self.sum_sup, self.sum_total = zero(), zero(), zero()
        self.ok_steps = 0  # read flags of finite steps (their losses are in the sums)
        self.sup_steps = 0
        self.nonfinite = 0
        self.images = 0
        self.wait = 0.0
        self.start = time.perf_counter()

    def add(self, losses: StepLosses, finite: Tensor) -> None:
        """Adds a step's losses where `finite` (bool `[]`); the counts follow when it is read."""
        keep = lambda x: torch.where(finite, x.detach(), 0.0)  # []
        self.sum_unsup += keep(losses.l_unsup)
        self.sum_total += keep(losses.total)
        if losses.l_sup is not None:
            self.sum_sup += keep(losses.l_sup)

    def push(self, step: int, epoch: int, finite: Tensor, losses: StepLosses) -> None:
        """Queues step `step`'s flag and losses for the host, without waiting for them."""
        sup = losses.l_sup is not None
        l_sup = losses.l_sup if sup else losses.l_unsup
        values = torch.stack([finite, losses.l_unsup.detach(), l_sup.detach()]).float()  # [3]
        event = None
        if self.device.type == "cuda":
            host = torch.empty(3, pin_memory=True)  # [3]
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self.pending.append(PendingFlag(step, epoch, sup, values, event))

    def ready(self, wait_all: bool = False) -> list[tuple[int, int, bool, float, float | None]]:
        """Reads the queued flags that are due (all with `wait_all`), oldest first, and counts
        the finite ones; returns `(step, epoch, finite, l_unsup, l_sup or None)` of each."""
        out = []
        while self.pending:
            p = self.pending[0]
            if not (wait_all or len(self.pending) > self.lag):
                break
            if p.event is not None:
                p.event.synchronize()  # `lag` steps old: done long ago
            ok, l_unsup, l_sup = p.values.tolist()
            self.pending.popleft()
            self.ok_steps += bool(ok)
            self.sup_steps += bool(ok) and p.sup
            out.append((p.step, p.epoch, bool(ok), l_unsup, l_sup if p.sup else None))
        return out

    def means(self) -> tuple[float | None, float | None, float | None]:
        """Reads the sums back (the interval's one host sync), averaged over the ranks.

        Each rank's losses are over its own anchors (`model/losses.py`), so the mean over
        ranks is the global batch's loss; every rank has the same step counts.
        """
        n = max(self.ok_steps, 1)
        sums = torch.stack([self.sum_unsup, self.sum_sup, self.sum_total])  # [3]
        sums = mean_over_ranks(sums).tolist()
        l_unsup = sums[0] / n if self.ok_steps else None
        l_sup = sums[1] / self.sup_steps if self.sup_steps else None
        l_total = sums[2] / n if self.ok_steps else None
        return l_unsup, l_sup, l_total


class NormStats:
    """The BatchNorm running statistics of a model, left as they were by a skipped step.

    A forward updates `running_mean` / `running_var` before the loss is known. A step skipped
    for a non-finite loss must leave them as they were: an inf or NaN there stays for good,
    and every eval-mode use (the monitor, evaluate.py, finetune.py) would read it. `save`
    before the forward, `keep_where(finite)` after the backward: a few kernels on the device,
    no host read (the flag is the same on every rank, so the ranks' statistics stay equal).
    Where the host reads the flag at once (a CPU), only a skipped step calls `keep_where`.
    """

    def __init__(self, model: nn.Module):
        self.groups: dict[torch.dtype, list[Tensor]] = {}
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for b in (m.running_mean, m.running_var, m.num_batches_tracked):
                    if b is not None:
                        self.groups.setdefault(b.dtype, []).append(b)
        self.saved: dict[torch.dtype, Tensor] = {}

    @staticmethod
    def _flat(buffers: list[Tensor]) -> Tensor:
        return torch.cat([b.reshape(-1) for b in buffers])  # [sum of numels]

    @torch.no_grad()
    def save(self) -> None:
        self.saved = {dtype: self._flat(bufs) for dtype, bufs in self.groups.items()}

    @torch.no_grad()
    def keep_where(self, finite: Tensor) -> None:
        """Keeps the forward's updates where `finite` (bool `[]`), else restores `save`'s."""
        for dtype, bufs in self.groups.items():
            kept = torch.where(finite, self._flat(bufs), self.saved[dtype])  # [sum of numels]
            parts = kept.split([b.numel() for b in bufs])
            torch._foreach_copy_(bufs, [v.view(b.shape) for v, b in zip(parts, bufs, strict=True)])


class Trainer:
    """Owns the model, optimizer and schedule of a run and drives its epochs.

    Args:
        cfg: the resolved config.
        model: the model, already on its device (DDP-wrapped when distributed).
        optimizer: from `model.optim.build_optimizer`.
        schedule: LR of every global step, `[epochs * steps_per_epoch]`.
        info: rank, world size, device.
        run_dir: the run folder (rank 0 writes into it).
        flops_per_step: training FLOPs of one rank's step, `{sup_active: flops}`.
        monitor: an `OnlineMonitor` (rank 0's; None elsewhere or when off), run before
            training and after every `run.monitor_every` epochs and the last.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: np.ndarray,
        info: DistInfo,
        run_dir: str | Path,
        flops_per_step: dict[bool, int] | None = None,
        monitor=None,
    ):
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.schedule, self.info = schedule, info
        self.run_dir = Path(run_dir)
        self.flops_per_step = flops_per_step or {True: 0, False: 0}
        self.monitor = monitor
        gather = info.distributed
        n_large = None if cfg.loss.small_pairs else cfg.aug.n_large
        self.ntxent = NTXentLoss(cfg.loss.temperature, gather_distributed=gather, n_large=n_large)
        self.suncet = SuNCEtLoss(
            cfg.loss.sup_temperature, cfg.loss.label_smoothing, gather_distributed=gather
        )
        precision, device = cfg.run.precision, info.device
        self.amp_dtype = AMP_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.metrics = metrics.MetricsLog(self.run_dir, enabled=info.is_main)
        self.step = 0  # global steps done
        self.images = 0  # source images processed, all ranks
        self.flops = 0  # estimated training FLOPs, all ranks
        self.nonfinite_run = 0  # consecutive non-finite steps
        self.last_checkpoint: Path | None = None
        self.t0 = time.perf_counter()
        self.stats = IntervalStats(device)
        self.norm_stats = NormStats(model)

    # ----------------------------------------------------------------------------- one step

    def sup_active(self, epoch: int) -> bool:
        loss = self.cfg.loss
        return loss.sup_weight != 0 and epoch < loss.supervised_epochs

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def forward_losses(self, batch: Batch, epoch: int) -> StepLosses:
        """One forward pass over every view, then both losses (on this rank's anchors)."""
        # 1. Labeled views next to the large views, so all large crops share a backbone pass.
        sup = self.sup_active(epoch)
        labeled = list(batch.labeled_views) if sup else []
        views = [*labeled, *batch.unlabeled_views]
        with self.autocast():
            z = self.model(views)  # len(views) x [B_v, D]
        z_labeled, z_unlabeled = z[: len(labeled)], z[len(labeled) :]

        # 2. NT-Xent over the unlabeled views of each image (gathered inside the loss).
        l_unsup = self.ntxent(torch.stack(z_unlabeled))  # [V, B, D] -> []

        # 3. SuNCEt over the labeled views; labels repeat once per supervised view.
        l_sup = None
        if sup:
            z_sup = torch.cat(z_labeled)  # [n_sup * C*K, D]
            y_sup = batch.labels.repeat(len(z_labeled))  # [n_sup * C*K]
            l_sup = self.suncet(z_sup, y_sup)  # []

        # 4. A new tensor for the total: the logged parts keep their own values.
        loss = self.cfg.loss
        total = suncet_total(l_unsup, l_sup, loss.sup_weight, epoch, loss.supervised_epochs)
        return StepLosses(l_unsup, l_sup, total)

    def train_step(self, batch: Batch, epoch: int) -> bool | None:
        """Forward, backward and update; False when the loss was non-finite, None while unread.

        No host sync per step: the step's finite flag (agreed by all ranks on the device)
        gates the update on the device (`SyncFreeLARS.step(finite=)`; under fp16 GradScaler's
        `found_inf` as well), so a non-finite loss moves no weight, no momentum buffer and no
        BatchNorm running statistic (`NormStats`). The
        host reads the flag and the losses later (`IntervalStats.ready`) to warn, count and
        stop (`on_nonfinite`), at the latest on the next log step. On CUDA that is after this
        step is queued, so this returns None; on a CPU the read is immediate and free, so a
        non-finite loss skips backward and the update altogether and this returns False.
        """
        set_lr(self.optimizer, float(self.schedule[self.step]))
        self.norm_stats.save()
        losses = self.forward_losses(batch, epoch)
        finite = _all_ranks_agree(torch.isfinite(losses.total), self.info)  # [] bool
        self.stats.push(self.step + 1, epoch, finite, losses)
        if self.stats.lag == 0 and not self.resolve_flags():
            self.norm_stats.keep_where(finite)  # restores them
            return False

        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(losses.total).backward()
            self.scaler.step(self.optimizer, finite=finite)
            self.scaler.update()
        else:
            losses.total.backward()
            self.optimizer.step(finite=finite)
        self.stats.add(losses, finite)
        if self.stats.lag == 0:  # read already: finite, nothing to restore
            return True
        self.norm_stats.keep_where(finite)  # after backward, which reads the running stats
        self.resolve_flags()  # earlier steps' flags, while the GPU runs this one
        return None

    def resolve_flags(self, wait_all: bool = False) -> bool | None:
        """Acts on the step flags the host can read now (every queued one with `wait_all`);
        returns the last verdict read (None: nothing was due)."""
        verdict = None
        for step, epoch, ok, l_unsup, l_sup in self.stats.ready(wait_all):
            if ok:
                self.nonfinite_run = 0
            else:
                self.on_nonfinite(step, epoch, l_unsup, l_sup)
            verdict = ok
        return verdict

    def on_nonfinite(self, step: int, epoch: int, l_unsup: float, l_sup: float | None) -> None:
        """Logs skipped step `step` (values read late); stops after `max_nonfinite` in a row."""
        self.nonfinite_run += 1
        self.stats.nonfinite += 1
        limit = self.cfg.run.max_nonfinite
        parts = f"l_unsup {l_unsup:.4g}" + ("" if l_sup is None else f" l_sup {l_sup:.4g}")
        if self.info.is_main:
            log.warning(
                "step %d ep %d | non-finite loss (%s): update skipped (%d in a row, stop at %d)",
                step,
                epoch,
                parts,
                self.nonfinite_run,
                limit,
            )
        if self.nonfinite_run >= limit:
            kept = self.last_checkpoint or "none (no epoch finished)"
            raise NonFiniteLossError(
                f"stopped at step {step} (epoch {epoch}): {limit} non-finite losses in a row "
                f"(--max-nonfinite {limit}); last good checkpoint: {kept}"
            )

    # ------------------------------------------------------------------------- one epoch

    def step_images(self, batch: Batch, sup: bool) -> int:
        """Images the model processed this step, all ranks: the labeled batch only while
        SuNCEt is on (with it off, `fit` asks the pipeline for no labeled stream)."""
        return (batch.batch_size + (batch.n_labeled if sup else 0)) * self.info.world_size

    def train_epoch(self, pipeline, epoch: int) -> None:
        """Runs one epoch of `pipeline` (already `set_epoch`-ed), logging every interval."""
        n_steps = len(pipeline)
        bar = self.progress(n_steps, epoch)
        batches = iter(pipeline)
        self.stats.reset()
        for i in range(n_steps):
            # 1. Next batch; the time blocked here is the data-wait.
            t = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            self.stats.wait += time.perf_counter() - t

            # 2. Step, counting images and FLOPs whether or not the update happened.
            self.train_step(batch, epoch)
            self.step += 1
            sup = self.sup_active(epoch)
            images = self.step_images(batch, sup)
            self.stats.images += images
            self.images += images
            self.flops += self.flops_per_step[sup] * self.info.world_size

            # 3. Log on interval steps and at the end of the epoch.
            if self.step % self.cfg.run.log_interval == 0 or i == n_steps - 1:
                rec = self.log_interval(epoch, sup)
                if bar is not None:
                    bar.set_postfix_str(f"l_unsup {metrics.fmt_num(rec['l_unsup'], '.3f')}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    def progress(self, n_steps: int, epoch: int):
        """A tqdm bar on rank 0 when stdout is a terminal; None otherwise."""
        if not (self.info.is_main and sys.stdout.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=n_steps, desc=f"ep {epoch}", leave=False, dynamic_ncols=True)

    def log_interval(self, epoch: int, sup: bool) -> dict:
        """Reads the interval's loss sums (the only host read of losses) and logs one line."""
        self.resolve_flags(wait_all=True)  # the interval's flags, counted before its means
        s = self.stats
        l_unsup, l_sup, l_total = s.means()
        elapsed = max(time.perf_counter() - s.start, 1e-9)
        rec = {
            "step": self.step,
            "epoch": epoch,
            "l_unsup": l_unsup,
            "l_sup": l_sup,
            "l_total": l_total,
            "sup_active": sup,
            "lr": float(self.schedule[self.step - 1]),
            "img_per_s": s.images / elapsed,
            "data_wait": min(s.wait / elapsed, 1.0),
            "nonfinite": s.nonfinite,
            "images": self.images,
            "flops": self.flops,
            "time": time.perf_counter() - self.t0,
        }
        if self.info.is_main:
            log.info(metrics.format_line(rec))
            self.metrics.append(rec)
        s.reset()
        return rec

    # ------------------------------------------------------------------------ the run

    def fit(self, pipeline, start_epoch: int = 0) -> None:
        """Epochs `start_epoch .. epochs-1`; a checkpoint and a plot after each.

        A run that starts at step 0 starts with an empty metrics.jsonl (records left by a
        first epoch that never reached a checkpoint are stale) and, with a monitor, is
        evaluated once before its first step.
        """
        if self.step == 0:
            self.metrics.truncate_after(-1)
            if self.monitor is not None and self.info.is_main:
                self.evaluate(epoch=-1)
        barrier()
        for epoch in range(start_epoch, self.cfg.run.epochs):
            pipeline.set_epoch(epoch, labeled=self.sup_active(epoch))  # none once SuNCEt is off
            self.train_epoch(pipeline, epoch)
            self.end_epoch(epoch)

    def monitor_due(self, epoch: int) -> bool:
        """Whether the monitor runs after `epoch`: every `monitor_every` epochs and the last."""
        done, every = epoch + 1, self.cfg.run.monitor_every
        if self.monitor is None:
            return False
        return (every > 0 and done % every == 0) or done == self.cfg.run.epochs

    def evaluate(self, epoch: int) -> dict:
        """Runs the monitor (rank 0), logs one line and appends the record to metrics.jsonl.

        Outside every log interval, so its time is not in any img/s.
        """
        rec = {"event": "eval", "step": self.step, "epoch": epoch, "images": self.images,
               "flops": self.flops}  # fmt: skip
        rec.update(self.monitor.evaluate(self.model))
        rec["time"] = time.perf_counter() - self.t0
        log.info(metrics.format_eval_line(rec))
        self.metrics.append(rec)
        return rec

    def end_epoch(self, epoch: int) -> None:
        """Rank 0 evaluates (when due), then writes checkpoint.pt (and every N epochs a kept
        copy) and the plot; the other ranks wait at the barrier."""
        done = epoch + 1
        every = self.cfg.run.checkpoint_every
        if self.info.is_main:
            # Before the checkpoint: a run resumed from an older one drops this record.
            if self.monitor_due(epoch):
                self.evaluate(epoch)
            self.last_checkpoint = ckpt.save_checkpoint(
                self.run_dir,
                model=unwrap(self.model),
                optimizer=self.optimizer,
                scaler=self.scaler,
                epoch=done,
                step=self.step,
                config=to_dict(self.cfg),
                keep=every > 0 and done % every == 0,
            )
            metrics.plot(self.metrics.read(), self.run_dir / metrics.PLOT)
            self.metrics.write_csv()
            log.info(
                "epoch %d done | %d images | %.3e FLOPs | %.0f s | saved %s",
                epoch,
                self.images,
                self.flops,
                time.perf_counter() - self.t0,
                self.last_checkpoint.name,
            )
        barrier()
        self.last_checkpoint = self.run_dir / ckpt.LATEST  # every rank can name it in an error

    def resume_from(self, state: dict) -> int:
        """Loads a checkpoint into this trainer; returns the epoch to start with."""
        epoch, self.step = ckpt.restore(
            state, model=unwrap(self.model), optimizer=self.optimizer, scaler=self.scaler
        )
        self.last_checkpoint = self.run_dir / ckpt.LATEST
        self.metrics.truncate_after(self.step)
        done = self.metrics.read()
        if done:
            self.images, self.flops = done[-1]["images"], done[-1]["flops"]
        return epoch


def _all_ranks_agree(flag: Tensor, info: DistInfo) -> Tensor:
    """`flag` (bool `[]`) AND-ed over all ranks by one all-reduce on the device: no host read."""
    if not info.distributed:
        return flag
    t = flag.to(torch.int32)  # []
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.bool()
