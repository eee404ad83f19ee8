"""ResNet backbone and the SuNCEt/SimCLR projection head, with one backbone pass per crop size.

Shape letters are defined in `model/losses.py`; here also F = backbone feature width, H = head
hidden width, S = crop side.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from model.config import ModelConfig

# The torchvision ResNet family (what `build_backbone` accepts for --arch).
ARCHS = tuple(
    sorted(
        name
        for name in torchvision.models.list_models(module=torchvision.models)
        if name.startswith(("resnet", "wide_resnet", "resnext"))
    )
)


def check_arch(arch: str) -> None:
    """Raises ValueError naming --arch unless `arch` is one of `ARCHS`."""
    if arch not in ARCHS:
        raise ValueError(f"--arch: unknown {arch!r}; choose from {', '.join(ARCHS)}")


def build_backbone(arch: str = "resnet50", small_stem: bool = False) -> tuple[nn.Module, int]:
    """Builds a randomly initialised torchvision ResNet without its classifier.

    Args:
        arch: a torchvision ResNet name (resnet18, resnet34, resnet50, ...).
        small_stem: a 3x3 stride-1 stem conv and no max-pool, for 32-px images (CIFAR).

    Returns:
        The backbone (its `fc` replaced by `Identity`) and its feature width F.
    """
    check_arch(arch)
    net = torchvision.models.get_model(arch, weights=None)  # never downloads: weights=None
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    if small_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net, feature_dim


def build_head(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 3) -> nn.Sequential:
    """Builds the projection MLP: (layers - 1) x [Linear-BN-ReLU], then a final Linear.

    With layers=3 this is the official SuNCEt head (Linear-BN-ReLU, Linear-BN-ReLU, Linear).
    Linears followed by BatchNorm carry no bias (BN's shift makes it redundant).
    """
    if layers < 1:
        raise ValueError(f"head_layers must be >= 1, got {layers}")
    blocks: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim)]
        blocks.append(nn.ReLU(inplace=True))
        width = hidden_dim
    blocks.append(nn.Linear(width, out_dim))
    return nn.Sequential(*blocks)


def size_groups(views: list[Tensor]) -> list[list[int]]:
    """Groups view indices by spatial size, in order of first appearance.

    Views of one size share a group even when not adjacent, so `unlabeled + labeled` views
    cost one backbone pass per crop size.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[-2:]), []).append(i)
    return list(groups.values())


class SuNCEtModel(nn.Module):
    """Backbone + projection head; `forward` maps a list of views to a list of projections.

    Attributes:
        backbone: the ResNet trunk, `[B, 3, S, S] -> [B, F]`.
        head: the projection MLP, `[B, F] -> [B, D]`.
        feature_dim: F.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(cfg.arch, cfg.small_stem)
        self.head = build_head(self.feature_dim, cfg.hidden_dim, cfg.out_dim, cfg.head_layers)
        self.channels_last = cfg.channels_last

    def features(self, x: Tensor) -> Tensor:
        """Backbone features for evaluation, `[B, 3, S, S] -> [B, F]`."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # [B, 3, S, S]
        return self.backbone(x)  # [B, F]

    def forward(self, views: list[Tensor]) -> list[Tensor]:
        """Projects every view, running the backbone once per crop size.

        Args:
            views: V tensors `[B_v, 3, S_v, S_v]`; views of equal S are batched together.

        Returns:
            V projections `[B_v, D]`, in the order of `views`.
        """
        # 1. One backbone pass per size group (BatchNorm statistics are per group).
        groups = size_groups(views)
        feats: list[Tensor] = [None] * len(views)  # type: ignore[list-item]
        for idx in groups:
            x = torch.cat([views[i] for i in idx])  # [sum B_v, 3, S, S]
            f = self.features(x)  # [sum B_v, F]
            for i, fi in zip(idx, f.split([views[i].shape[0] for i in idx]), strict=True):
                feats[i] = fi  # [B_v, F]

        # 2. One head pass over all views, so the head's BatchNorm sees every view.
        z = self.head(torch.cat(feats))  # [sum_v B_v, D]
        return list(z.split([v.shape[0] for v in views]))  # V x [B_v, D]


def build_model(cfg: ModelConfig) -> SuNCEtModel:
    """Builds the model, in channels-last memory format when `cfg.channels_last`."""
    model = SuNCEtModel(cfg)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
