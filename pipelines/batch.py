"""The one batch type every pipeline hands to the trainer."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """One training step's data, already on the device, normalized and channels-last.

    Attributes:
        unlabeled_views: the large crops, then the small crops; each ``[B, 3, H, W]``.
            Row ``b`` of every view is the same source image.
        labeled_views: one tensor per supervised view, each ``[C*K, 3, H, W]``.
        labels: dataset class ids of the labeled images, ``[C*K]`` int64.
        indices: dataset sample indices of the unlabeled images, ``[B]`` int64.
        labeled_indices: dataset sample indices of the labeled images, ``[C*K]`` int64.
    """

    unlabeled_views: list[torch.Tensor]
    labeled_views: list[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    labeled_indices: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.unlabeled_views[0].shape[0]

    @property
    def n_labeled(self) -> int:
        return self.labels.shape[0]
