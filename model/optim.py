"""LARS with SimCLR's parameter groups, and the per-step learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import torch_optimizer
from torch import nn
from torch.optim import Optimizer

from model.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Splits trainable parameters into a decayed group and a no-decay group.

    Biases and every parameter with ndim <= 1 (all BatchNorm weights and biases, the
    downsample BatchNorms included) go to the group with weight_decay 0. torch-optimizer's
    LARS skips both weight decay and the layer-wise trust ratio for a group whose weight
    decay is 0 (`if weight_decay != 0:` in `LARS.step`), which is SimCLR's exclusion.

    Returns:
        Non-empty groups, each tagged with a "name" ("decay" or "no_decay").
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The linearly scaled peak LR: base_lr * global_batch / lr_batch_ref."""
    return cfg.base_lr * global_batch / cfg.lr_batch_ref


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> Optimizer:
    """Builds torch-optimizer's LARS over `param_groups`, at the peak LR.

    The trust coefficient is passed explicitly: torch-optimizer 0.3.0 defaults to 0.01 in
    code (its docstring says 0.001); SimCLR uses 0.001.
    """
    # Limitation: torch-optimizer's LARS tests tensors in Python (`if p_norm != 0 and
    # g_norm != 0`), a host sync per parameter per step on a GPU (~160 for a ResNet-50);
    # with weight_decay 0 everywhere LARS degenerates to plain SGD with momentum.
    return torch_optimizer.LARS(
        param_groups(model, cfg.weight_decay),
        lr=peak_lr(cfg, global_batch),
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        trust_coefficient=cfg.trust_coefficient,
    )


def lr_schedule(
    cfg: OptimConfig, steps_per_epoch: int, epochs: int, global_batch: int
) -> np.ndarray:
    """The LR of every step: linear warm-up to the peak, then cosine to `cfg.final_lr`.

    Warm-up step i (0-based) has peak * (i+1) / warmup_steps, so the first step moves and the
    last warm-up step is at the peak; the cosine part starts at the peak and ends exactly at
    final_lr on the last step. Index it by the global step (dino style).

    Returns:
        `[epochs * steps_per_epoch]` float64.
    """
    total = epochs * steps_per_epoch
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total)
    peak = peak_lr(cfg, global_batch)
    ramp = peak * np.arange(1, warmup + 1) / max(warmup, 1)  # [warmup]
    n = total - warmup
    t = np.arange(n) / max(n - 1, 1)  # [n], 0 -> 1
    cosine = cfg.final_lr + 0.5 * (peak - cfg.final_lr) * (1 + np.cos(math.pi * t))  # [n]
    return np.concatenate([ramp, cosine])


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Sets the LR of every parameter group (call once per step with `schedule[step]`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
