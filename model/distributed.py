"""Gathering embeddings across ranks with gradients, for the contrastive losses.

Every helper is the identity when torch.distributed is not initialised or the world is 1.
Gradients flow back through the gather: rank r's input receives the sum over ranks of the
gradients that reach its rows (a reduce-scatter), see `model/losses.py` for the scaling.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """Returns (rank, world size); (0, 1) outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_cat(x: Tensor) -> Tensor:
    """Concatenates `x [n, ...]` from every rank along dim 0, in rank order: `[W*n, ...]`.

    Floating tensors keep their autograd graph; integer tensors (labels) are gathered
    without one. Every rank must pass the same shape.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    if not x.is_floating_point():
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # [W*n, ...]

    return torch.cat(_AllGather.apply(x))  # [W*n, ...]


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    torch.distributed.nn.functional.all_gather is deprecated (a FutureWarning per call), and
    on gloo (measured, torch 2.14.1) it scrambles gradients that arrive dense but strided
    (e.g. the transpose of a contiguous tensor): its backward scatters contiguous data into
    `empty_like` copies of the strided gradients. The replacement the warning names lives in
    the private `torch.distributed._functional_collectives`. This version makes every buffer
    contiguous.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        # Limitation: an all_reduce of every rank's full gradient stands in for a
        # reduce-scatter (gloo has none): W x the traffic, negligible for [B, D] embeddings.
        g = torch.stack([gr.contiguous() for gr in grads])  # [W, n, ...]
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_views(z: Tensor) -> Tensor:
    """Gathers `[V, B, D]` along the image axis: `[V, W*B, D]`, images unique across ranks.

    Image b of rank r becomes image r*B + b, so NT-Xent's positives stay within an image.
    """
    _, world = rank_and_world()
    if world == 1:
        return z
    g = gather_cat(z.transpose(0, 1).contiguous())  # [W*B, V, D]
    return g.transpose(0, 1)  # [V, W*B, D]
