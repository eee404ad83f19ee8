"""The class-stratified sampler (pipelines/sampler.py) on its own: numpy only, no loader.

Ranks are simulated by building one sampler per rank (rank=0/1, world_size=2); no process
group is needed, since a sampler's batches are a pure function of its arguments.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipelines.sampler import StratifiedSampler


def split(counts: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A labeled split where class c has counts[c] images: (indices, labels), sorted by index.

    Indices are sparse (not 0..L-1) and the classes interleaved, so that a sampler mixing up
    positions, indices and labels would show.
    """
    labels = np.repeat(np.arange(len(counts)), counts)
    labels = np.random.default_rng(seed).permutation(labels)  # [L]
    indices = 1000 + 3 * np.arange(len(labels))  # [L]
    return indices, labels


def sampler(counts: list[int], c: int, k: int, **kw) -> StratifiedSampler:
    indices, labels = split(counts)
    return StratifiedSampler(indices, labels, c, k, **kw)


def classes_of(labels_row: np.ndarray, k: int) -> np.ndarray:
    """The class of each K-group of a batch row, ``[C]``."""
    return labels_row[::k]


def test_every_batch_holds_c_distinct_classes_times_k():
    counts = [7, 3, 12, 5, 9, 4, 6, 8, 2, 10]
    s = sampler(counts, c=4, k=2)
    indices, labels = split(counts)
    label_of = dict(zip(indices.tolist(), labels.tolist(), strict=True))
    ix, lab = s.epoch_batches(epoch=0, n_batches=200)  # [200, 8]
    assert ix.shape == lab.shape == (200, 8) and ix.dtype == lab.dtype == np.int64
    for row, row_labels in zip(ix, lab, strict=True):
        classes, per_class = np.unique(row_labels, return_counts=True)
        assert len(classes) == 4 and (per_class == 2).all()
        assert (row_labels.reshape(4, 2) == row_labels[::2, None]).all()  # grouped by class
        assert [label_of[i] for i in row.tolist()] == row_labels.tolist()  # true labels


def test_each_cycle_visits_every_class_once_in_a_fresh_order():
    s = sampler([6] * 12, c=4, k=2)  # 3 batches per cycle
    _, lab = s.epoch_batches(epoch=0, n_batches=30)  # 10 cycles
    orders = []
    for cycle in range(10):
        order = np.concatenate([classes_of(r, 2) for r in lab[3 * cycle : 3 * cycle + 3]])
        assert sorted(order.tolist()) == list(range(12))
        orders.append(tuple(order.tolist()))
    assert len(set(orders)) == 10  # reshuffled every cycle


def test_classes_left_over_by_a_cycle_wait_for_a_later_one():
    s = sampler([5] * 10, c=4, k=1)  # 2 batches use 8 classes; 2 wait for the next cycle
    _, lab = s.epoch_batches(epoch=0, n_batches=600)
    for cycle in range(300):
        order = lab[2 * cycle : 2 * cycle + 2].reshape(-1)
        assert len(np.unique(order)) == 8
    seen = Counter(lab.reshape(-1).tolist())  # 2,400 draws over 10 classes
    assert max(seen.values()) - min(seen.values()) < 0.15 * 240


def test_a_class_deals_all_its_images_before_repeating_one():
    s = sampler([6] * 12 + [7] * 12, c=8, k=2)  # each class is visited once per 3 batches
    ix, lab = s.epoch_batches(epoch=0, n_batches=3 * 40)
    for c, n in [(0, 6), (13, 7)]:
        drawn = ix[lab == c].reshape(-1, 2)  # [visits, K], in visit order
        per_pass = n // 2  # visits served by one shuffled deck
        for start in range(0, len(drawn) - per_pass + 1, per_pass):
            deck = drawn[start : start + per_pass].reshape(-1)
            assert len(np.unique(deck)) == len(deck)  # no repeat inside a deck
        assert len(np.unique(drawn)) == n  # every image gets its turn


def test_one_image_class_repeats_its_image_k_times():
    indices, labels = split([1, 5, 5, 5])
    lone = int(indices[labels == 0][0])
    s = StratifiedSampler(indices, labels, 4, 3)
    ix, lab = s.epoch_batches(epoch=2, n_batches=50)
    for row, row_labels in zip(ix, lab, strict=True):
        assert (row[row_labels == 0] == lone).all() and (row_labels == 0).sum() == 3
        for c in (1, 2, 3):
            assert len(np.unique(row[row_labels == c])) == 3  # enough images: no repeat


def test_k_larger_than_a_class_uses_each_image_as_evenly_as_possible():
    indices, labels = split([3, 8, 8])
    small = set(indices[labels == 0].tolist())
    s = StratifiedSampler(indices, labels, 3, 5)
    ix, lab = s.epoch_batches(epoch=0, n_batches=40)
    for row, row_labels in zip(ix, lab, strict=True):
        uses = Counter(row[row_labels == 0].tolist())
        assert set(uses) == small and sorted(uses.values()) == [1, 2, 2]
        for c in (1, 2):
            assert len(np.unique(row[row_labels == c])) == 5


def ranks(counts: list[int], c: int, k: int, **kw) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rank 0's and rank 1's batches of one epoch, world size 2."""
    return [sampler(counts, c, k, rank=r, world_size=2, **kw).epoch_batches(1, 60) for r in (0, 1)]


def test_ranks_sharing_classes_draw_the_same_classes_from_disjoint_images():
    (ix0, lab0), (ix1, lab1) = ranks([8] * 10, c=5, k=2)
    np.testing.assert_array_equal(lab0, lab1)  # the same classes in the same slots
    for a, b in zip(ix0, ix1, strict=True):
        assert not set(a.tolist()) & set(b.tolist())


def test_ranks_sharing_a_small_class_repeat_across_ranks_not_within_one():
    counts = [3, 1, 8]  # class 0: K <= 3 < K * world; class 1: one image
    (ix0, lab0), (ix1, lab1) = ranks(counts, c=3, k=2)
    np.testing.assert_array_equal(lab0, lab1)
    for step in range(len(ix0)):
        mine = [ix[step][lab[step] == 0] for ix, lab in ((ix0, lab0), (ix1, lab1))]
        assert all(len(np.unique(m)) == 2 for m in mine)  # distinct inside each rank
        assert len(np.unique(np.concatenate(mine))) == 3  # all three images in the step
        lone = [ix[step][lab[step] == 1] for ix, lab in ((ix0, lab0), (ix1, lab1))]
        assert len(np.unique(np.concatenate(lone))) == 1


def test_per_rank_classes_give_each_rank_its_own_classes():
    (ix0, lab0), (ix1, lab1) = ranks([6] * 20, c=5, k=2, per_rank_classes=True)
    same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(lab0, lab1, strict=True)]
    assert sum(same) < 0.1 * len(same)
    for lab in (lab0, lab1):
        assert all(len(np.unique(r)) == 5 for r in lab)


def test_batches_are_a_pure_function_of_seed_and_epoch():
    def batches(seed: int, epoch: int) -> np.ndarray:
        return sampler([5] * 8, c=4, k=2, seed=seed).epoch_batches(epoch, 20)[0]

    np.testing.assert_array_equal(batches(3, 1), batches(3, 1))
    assert not np.array_equal(batches(3, 1), batches(3, 2))
    assert not np.array_equal(batches(3, 1), batches(4, 1))


def test_many_batches_never_run_dry():
    indices, labels = split([2, 1, 3])
    s = StratifiedSampler(indices, labels, 3, 2)
    ix, lab = s.epoch_batches(epoch=0, n_batches=5000)
    assert ix.shape == (5000, 6)
    assert (np.sort(lab, axis=1) == [0, 0, 1, 1, 2, 2]).all()
    assert set(ix.reshape(-1).tolist()) == set(indices.tolist())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(classes_per_batch=5), "classes_per_batch=5 exceeds the 4 classes"),
        (dict(images_per_class=0), "at least 1"),
        (dict(rank=2, world_size=2), "rank 2"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    indices, labels = split([3, 3, 3, 3])
    args = dict(classes_per_batch=2, images_per_class=2) | kwargs
    with pytest.raises(ValueError, match=message):
        StratifiedSampler(indices, labels, **args)


def test_indices_and_labels_of_different_lengths_are_a_clear_error():
    with pytest.raises(ValueError, match="same length"):
        StratifiedSampler(np.arange(5), np.zeros(4, np.int64), 1, 1)


def test_a_last_batch_of_one_image_is_refused_naming_the_option():
    from pipelines.common import steps_per_epoch
    from pipelines.errors import PipelineError

    assert steps_per_epoch(601, 40, 1, drop_last=True) == 15
    assert steps_per_epoch(602, 40, 1, drop_last=False) == 16  # a last batch of 2 is kept
    assert steps_per_epoch(162, 40, 2, drop_last=False) == 3  # 81 a rank: 1 each, 2 in all
    with pytest.raises(PipelineError, match=r"^--no-drop-last with --batch-size 40: .* 1 image"):
        steps_per_epoch(601, 40, 1, drop_last=False)
