"""Process group from torchrun's environment, rank helpers, and the DDP wrap."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them; (0, 1, 0) without torchrun."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    return rank, world, local


# Collectives wait this long before a rank gives up (NCCL's default is 10 minutes): the other
# ranks wait at a barrier while rank 0 alone evaluates (`--monitor-every`) and writes the
# checkpoint, which on a 10% ImageNet bank or a slow shared filesystem can pass 10 minutes.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def init_distributed(device: str) -> DistInfo:
    """Joins the process group (NCCL on CUDA, Gloo on CPU) when WORLD_SIZE > 1."""
    rank, world, local = env_world()
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        kwargs = {"device_id": dev} if device == "cuda" else {}
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT, **kwargs
        )
    return DistInfo(rank, world, local, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_agree(flag: bool, info: DistInfo) -> bool:
    """True only if `flag` is true on every rank (one tiny all-reduce; host sync)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class RanksFailed(Exception):
    """A step that every rank ran failed on some: each rank's error message (None where it
    passed), so that each error is reported once (`report`)."""

    def __init__(self, messages: list[str | None], rank: int):
        super().__init__(next(m for m in messages if m is not None))
        self.messages, self.rank = messages, rank

    def report(self) -> str | None:
        """This rank's line, or None: rank 0 says its own error (or names a rank that failed
        where it passed); another rank speaks only where its error differs from rank 0's."""
        mine, first = self.messages[self.rank], self.messages[0]
        if self.rank == 0:
            if first is not None:
                return f"error: {first}"
            failed = [r for r, m in enumerate(self.messages) if m is not None]
            more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
            return f"error: rank {failed[0]}{more}: {self.messages[failed[0]]}"
        if mine is None or mine == first:
            return None
        return f"[rank {self.rank}] error: {mine}"


def agree(step: Callable[[], T], info: DistInfo, errors: tuple[type[BaseException], ...]) -> T:
    """Runs `step` on every rank; if it raised one of `errors` on any rank, every rank raises
    `RanksFailed` (one all-gather of the messages), so that no rank goes on to wait in a
    collective for one that stopped. Alone, the error itself is raised."""
    try:
        result, problem = step(), None
    except errors as e:
        if not info.distributed:
            raise
        result, problem = None, e
    if not info.distributed:
        return result
    messages: list[str | None] = [None] * info.world_size
    dist.all_gather_object(messages, None if problem is None else str(problem))
    if any(m is not None for m in messages):
        raise RanksFailed(messages, info.rank) from problem
    return result


# What a collective raises when the group breaks: torch's DistError family (NCCL), or Gloo's
# RuntimeError naming its transport ("[.../gloo/transport/tcp/pair.cc:561] Connection closed
# by peer ... typically caused by a remote worker crashing").
_GROUP_FAILURE = re.compile(r"gloo|nccl|ProcessGroup|c10d|Connection (closed|reset)", re.I)


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is the process group failing (a rank that stopped, the network, a
    collective that timed out) rather than an error of this rank's own."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and bool(_GROUP_FAILURE.search(str(e)))


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `t` over all ranks (one all-reduce); `t` itself alone.

    Every rank must call it at the same point with the same shape.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    total = t.detach().clone()
    dist.all_reduce(total)  # SUM: gloo has no AVG
    return total / dist.get_world_size()


def wrap_model(model: nn.Module, info: DistInfo, channels_last: bool) -> nn.Module:
    """Moves the model to its device, channels-last first, then SyncBatchNorm + DDP.

    Channels-last is applied before the wrap so DDP's buckets match the parameters' layout.
    """
    model = model.to(info.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not info.distributed:
        return model
    if info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Limitation: on CPU (Gloo) BatchNorm stays per-rank; torch's SyncBatchNorm accepts only
    # GPU inputs, so CPU multi-process runs normalise with each rank's own batch statistics.
    ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
