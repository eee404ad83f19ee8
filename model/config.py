"""Configuration sections owned by the model: network, losses, optimizer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet50"  # resnet18 | resnet34 | resnet50 | ...
    small_stem: bool = False  # 3x3 stride-1 stem without max-pool, for 32 px images
    hidden_dim: int = 2048  # projection head widths
    out_dim: int = 128
    head_layers: int = 3
    channels_last: bool = True


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 0.1  # NT-Xent tau
    small_pairs: bool = True  # NT-Xent positives: every pair of views (VISSL's multi-crop
    #   SimCLR); --no-small-pairs: pairs with a large crop only (SwAV, PAWS)
    sup_temperature: float = 0.1  # SuNCEt tau
    label_smoothing: float = 0.0
    supervised_epochs: int = 1000  # SuNCEt is added for the first N epochs only
    sup_weight: float = 1.0  # 0 turns the run into plain SimCLR


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 0.3  # LR = base_lr * global_batch / lr_batch_ref (0.3 x 4096/256 = 4.8)
    lr_batch_ref: int = 256
    final_lr: float = 0.0
    warmup_epochs: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coefficient: float = 0.001
