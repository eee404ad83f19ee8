"""Evaluation maths on features: soft nearest neighbours (SNN), weighted kNN, top-k accuracy.

Letters: Q queries, M labeled bank entries, F feature width, C classes (num_classes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _chunks(query: Tensor, chunk_size: int) -> Iterator[Tensor]:
    """Splits `[Q, F]` into L2-normalised float32 chunks `[q, F]`."""
    for q in query.split(chunk_size):
        yield F.normalize(q.float(), dim=-1)  # [q, F]


def snn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Soft nearest-neighbour class probabilities (SuNCEt's/PAWS' SNN classifier).

    p(c | q) = sum_{m: y_m = c} softmax_m(cos(q, bank_m) / t).

    Returns:
        `[Q, num_classes]` probabilities (rows sum to 1).
    """
    bank = F.normalize(bank.float(), dim=-1)  # [M, F]
    onehot = F.one_hot(bank_labels.long(), num_classes).float()  # [M, C]
    out = []
    for q in _chunks(query, chunk_size):
        weights = torch.softmax(q @ bank.T / temperature, dim=1)  # [q, M]
        out.append(weights @ onehot)  # [q, C]
    return torch.cat(out)  # [Q, C]


def knn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted kNN class scores (InstDisc / DINO): the k most similar bank entries vote
    with weight exp(cos / t).

    Returns:
        `[Q, num_classes]` unnormalised scores.
    """
    bank = F.normalize(bank.float(), dim=-1)  # [M, F]
    k = min(k, bank.shape[0])
    out = []
    for q in _chunks(query, chunk_size):
        sims, idx = (q @ bank.T).topk(k, dim=1)  # [q, k], [q, k]
        weights = (sims / temperature).exp()  # [q, k]
        scores = torch.zeros(q.shape[0], num_classes, device=q.device)  # [q, C]
        out.append(scores.scatter_add(1, bank_labels[idx].long(), weights))  # [q, C]
    return torch.cat(out)  # [Q, C]


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each k (k larger than C counts as C).

    Returns:
        `{k: accuracy}`; reading the values is a host sync (evaluation only).
    """
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # [Q, kmax]
    hit = top == labels[:, None]  # [Q, kmax]
    return {k: 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}
