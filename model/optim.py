"""LARS with SimCLR's parameter groups, and the per-step learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch_optimizer
from torch import Tensor, nn
from torch.optim import Optimizer

from model.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Splits trainable parameters into a decayed group and a no-decay group.

    Biases and every parameter with ndim <= 1 (all BatchNorm weights and biases, the
    downsample BatchNorms included) go to the group with weight_decay 0. LARS skips both
    weight decay and the layer-wise trust ratio for a group whose weight decay is 0
    (torch-optimizer's `if weight_decay != 0:` in `LARS.step`, kept by `SyncFreeLARS`),
    which is SimCLR's exclusion.

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


class SyncFreeLARS(torch_optimizer.LARS):
    """torch-optimizer's LARS update, computed without a single host read of a tensor.

    The parent tests norms in Python (`if p_norm != 0 and g_norm != 0`), a host sync per
    parameter on a GPU. Here the trust ratio of every parameter of a group is computed at
    once on the device (`torch._foreach_norm`) and `torch.where` picks ratio or 1, as in
    timm's `optim/lars.py`; the update is the parent's: for a group with weight decay `wd`,
    `d = (g + wd * p) * tc * |p| / (|g| + wd * |p| + eps)` where both norms are non-zero and
    `d = g` elsewhere; `buf = m * buf + d` (the first step's `buf = d`); `p -= lr * buf`
    (Nesterov: `p -= lr * (d + m * buf)`).

    `step(finite=flag)` takes a device-side bool `[]`: where it is False the step leaves every
    parameter and momentum buffer exactly as it was (the direction is zeroed with
    `torch.where`, momentum factor 1, LR 0), so a non-finite loss needs no host decision.
    Under a `torch.amp.GradScaler` (`_step_supports_amp_scaling`) the scaler hands over
    `grad_scale` and `found_inf` instead of reading `found_inf` itself: the gradients are
    unscaled here and `found_inf` gates the step like the flag, so fp16 needs no sync either.

    Momentum buffers start at zero (`0 * m + d == d`: the parent's first step, exactly).
    """

    _step_supports_amp_scaling = True  # GradScaler.step: sets grad_scale / found_inf, no sync

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        # Limitation: dampening must be 0; zero-started buffers give the parent's first step
        # (`buf = d`, undamped) only without it (SimCLR and this project use none).
        if any(g["dampening"] != 0 for g in self.param_groups):
            raise ValueError("SyncFreeLARS: dampening must be 0")

    @torch.no_grad()
    def step(self, closure=None, finite: Tensor | None = None):
        """One update; `finite` (bool `[]` on the device, default True) gates it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ok = self._gate(finite)
        scale = getattr(self, "grad_scale", None)  # set by GradScaler.step, else absent
        inv_scale = None if scale is None else scale.double().reciprocal().float()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._group_step(group, params, ok, inv_scale)
        return loss

    def _gate(self, finite: Tensor | None) -> Tensor | None:
        """True where the step may update: the loss flag and GradScaler's `found_inf == 0`."""
        found_inf = getattr(self, "found_inf", None)
        ok = None if finite is None else finite.bool()
        if found_inf is not None:
            ok = found_inf == 0 if ok is None else ok & (found_inf == 0)
        return ok

    def _group_step(
        self, group: dict, params: list[Tensor], ok: Tensor | None, inv_scale: Tensor | None
    ) -> None:
        grads = [p.grad for p in params]
        if inv_scale is not None:
            torch._foreach_mul_(grads, inv_scale)  # unscaled in place, as GradScaler.unscale_
        wd, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]

        # 1. Direction: the trust-ratio-scaled, decayed gradient where both norms are non-zero.
        d = grads
        if wd != 0:
            w = torch.stack(torch._foreach_norm(params))  # [P]
            g = torch.stack(torch._foreach_norm(grads))  # [P]
            adapt = (w != 0) & (g != 0)  # [P]
            ratio = w / (g + w * wd + group["eps"]) * group["trust_coefficient"]  # [P]
            d = torch._foreach_mul(params, torch.where(adapt, wd, 0.0).unbind())  # wd * p
            torch._foreach_add_(d, grads)  # g + wd * p
            torch._foreach_mul_(d, torch.where(adapt, ratio, 1.0).unbind())

        # 2. A skipped step: no direction (in place; NaN * 0 would stay NaN), momentum
        #    factor 1, LR 0. No more temporaries than the parent: on a CPU they cost most.
        if ok is not None:
            skip = ~ok  # []
            for x in d:  # the decayed direction, or the no-decay group's gradients
                x.masked_fill_(skip, 0.0)

        # 3. Momentum, then the parameters.
        update = d
        if momentum != 0:
            bufs = [self._momentum_buffer(p) for p in params]
            torch._foreach_mul_(bufs, momentum if ok is None else torch.where(ok, momentum, 1.0))
            torch._foreach_add_(bufs, d)
            update = torch._foreach_add(d, bufs, alpha=momentum) if group["nesterov"] else bufs
        if ok is None:
            torch._foreach_add_(params, update, alpha=-lr)
        else:
            step_lr = torch.where(ok, -lr, 0.0)  # []
            torch._foreach_addcmul_(params, update, [step_lr] * len(params))

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The linearly scaled peak LR: base_lr * global_batch / lr_batch_ref."""
    return cfg.base_lr * global_batch / cfg.lr_batch_ref


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> Optimizer:
    """Builds `SyncFreeLARS` over `param_groups`, at the peak LR.

    The trust coefficient is passed explicitly: torch-optimizer 0.3.0 defaults to 0.01 in
    code (its docstring says 0.001); SimCLR uses 0.001. With weight_decay 0 everywhere LARS
    degenerates to plain SGD with momentum.
    """
    return SyncFreeLARS(
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
