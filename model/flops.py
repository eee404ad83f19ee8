"""Training compute per step, the paper's currency: FLOPs counted on a small forward pass."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

Shape = tuple[int, ...]  # (B, 3, S, S)

_CACHE: dict[tuple, int] = {}


def _flops_per_image(model: nn.Module, image_shape: Shape, probe_batch: int) -> float:
    """Forward FLOPs per image of one `(3, S, S)` view, measured on `probe_batch` images."""
    x = torch.zeros((probe_batch, *image_shape))  # [b, 3, S, S]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model([x])
    return counter.get_total_flops() / probe_batch


def train_flops_per_step(
    model: nn.Module,
    view_shapes: list[Shape],
    labeled_shapes: list[Shape] | None = None,
    probe_batch: int = 2,
) -> int:
    """Estimated training FLOPs of one step: 3 x the forward FLOPs (forward + backward).

    FLOPs count 2 per multiply-add (FlopCounterMode's convention): a ResNet-50 forward at
    224 px is ~8.2 GFLOPs (4.1 GMACs), so ~24.6 GFLOPs per 224-px image per training step.

    The forward runs on a CPU copy of the model in eval mode (no BatchNorm statistics are
    touched), once per distinct crop size with `probe_batch` images; FLOPs are linear in
    the batch, so the per-image count is scaled to every view's batch. Results are cached
    per (model class, parameter count, shapes).

    Args:
        model: a `SuNCEtModel` (takes a list of views).
        view_shapes: `(B, 3, S, S)` of every unlabeled view.
        labeled_shapes: `(N, 3, S, S)` of every labeled view, or None.
        probe_batch: images per view actually run.
    """
    shapes = [tuple(s) for s in list(view_shapes) + list(labeled_shapes or [])]
    n_params = sum(p.numel() for p in model.parameters())
    key = (type(model).__name__, n_params, probe_batch, tuple(shapes))
    if key not in _CACHE:
        # Limitation: the loss and the optimizer are not counted; both are O(B^2 D) or O(P),
        # small beside the backbone. Backward is taken as 2 x forward, the usual convention.
        probe = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
        per_image = {s[1:]: _flops_per_image(probe, s[1:], probe_batch) for s in shapes}
        fwd = sum(s[0] * per_image[s[1:]] for s in shapes)
        _CACHE[key] = int(round(3 * fwd))
    return _CACHE[key]
