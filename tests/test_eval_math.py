"""SNN and weighted kNN against plain loops; top-k accuracy on known cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.evaluation import knn_predict, snn_predict, topk_accuracy


def naive_snn(query, bank, labels, C, tau):
    q, b = F.normalize(query.double(), dim=1), F.normalize(bank.double(), dim=1)
    out = torch.zeros(len(q), C, dtype=torch.float64)
    for i in range(len(q)):
        w = [math.exp(float(q[i] @ b[m]) / tau) for m in range(len(b))]
        for m in range(len(b)):
            out[i, labels[m]] += w[m] / sum(w)
    return out


def naive_knn(query, bank, labels, C, k, tau):
    q, b = F.normalize(query.double(), dim=1), F.normalize(bank.double(), dim=1)
    out = torch.zeros(len(q), C, dtype=torch.float64)
    for i in range(len(q)):
        sims = sorted(((float(q[i] @ b[m]), m) for m in range(len(b))), reverse=True)[:k]
        for s, m in sims:
            out[i, labels[m]] += math.exp(s / tau)
    return out


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(13, 5, generator=gen),
        torch.randn(30, 5, generator=gen),
        torch.randint(0, 4, (30,), generator=gen),
    )


def test_snn_matches_naive_loop_and_sums_to_one(data):
    query, bank, labels = data
    probs = snn_predict(query, bank, labels, num_classes=4, temperature=0.1, chunk_size=4)
    expected = naive_snn(query, bank, labels, 4, 0.1)
    torch.testing.assert_close(probs.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(1), torch.ones(13))


def test_knn_matches_naive_loop(data):
    query, bank, labels = data
    scores = knn_predict(query, bank, labels, num_classes=4, k=5, temperature=0.07, chunk_size=5)
    expected = naive_knn(query, bank, labels, 4, 5, 0.07)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-3)


def test_chunking_does_not_change_predictions(data):
    query, bank, labels = data
    a = knn_predict(query, bank, labels, 4, k=7, chunk_size=2)
    b = knn_predict(query, bank, labels, 4, k=7, chunk_size=1000)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_separable_embeddings_give_full_top1():
    C, per = 6, 10
    centers = torch.eye(C, 16) * 10  # [C, F]
    gen = torch.Generator().manual_seed(1)
    bank_labels = torch.arange(C).repeat_interleave(per)  # [M]
    bank = centers[bank_labels] + torch.randn(C * per, 16, generator=gen)  # [M, F]
    q_labels = torch.arange(C).repeat(4)  # [Q]
    query = centers[q_labels] + torch.randn(len(q_labels), 16, generator=gen)  # [Q, F]
    for scores in (
        snn_predict(query, bank, bank_labels, C),
        knn_predict(query, bank, bank_labels, C, k=5),
    ):
        assert topk_accuracy(scores, q_labels, ks=(1,))[1] == 100.0


def test_topk_accuracy_counts_hits_within_k():
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]])
    labels = torch.tensor([0, 1, 2])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3)
    assert acc[2] == pytest.approx(200 / 3)
    assert acc[5] == 100.0  # k beyond C counts as C
