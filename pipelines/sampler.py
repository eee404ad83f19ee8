"""Class-stratified sampling of the labeled split: every batch holds C classes x K images."""

from __future__ import annotations

import numpy as np


class StratifiedSampler:
    """Draws class-stratified batches of labeled sample indices that never run dry.

    Classes are visited in a shuffled order, C at a time; when fewer than C unused classes
    remain the order is reshuffled (a new cycle; with C not dividing the number of classes the
    few left over wait for a later cycle, so every class is visited equally often on average).
    Inside a class, images are dealt from a shuffled deck that is reshuffled when it runs out,
    so an image repeats only when its class has fewer images than a step needs (K, or K x world
    size when ranks share classes). A class with fewer than that deals one shuffled deck
    cyclically (each image floor or ceil of need / n times), so each rank's K images of it are
    distinct whenever the class has at least K.

    With ``per_rank_classes=False`` (default) every rank draws the same classes on a step and
    takes its own K-slice of the same deck, so ranks see disjoint images whenever a class has
    at least K x world images. With ``per_rank_classes=True`` each rank draws its own classes.
    Seeds derive from (seed, epoch) and, for per-rank classes, the global rank.

    Args:
        indices: labeled dataset sample indices, ``[L]``.
        labels: their class ids, ``[L]``.
        classes_per_batch: C.
        images_per_class: K.
        rank: global rank of this process.
        world_size: number of ranks.
        per_rank_classes: give each rank its own classes.
        seed: base seed of the run.
    """

    def __init__(
        self,
        indices: np.ndarray,
        labels: np.ndarray,
        classes_per_batch: int,
        images_per_class: int,
        rank: int = 0,
        world_size: int = 1,
        per_rank_classes: bool = False,
        seed: int = 0,
    ) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if indices.shape != labels.shape or indices.ndim != 1:
            raise ValueError("indices and labels must be 1-D arrays of the same length")
        self.classes = np.unique(labels)
        if classes_per_batch > len(self.classes):
            raise ValueError(
                f"classes_per_batch={classes_per_batch} exceeds the {len(self.classes)} classes "
                "of the labeled split; lower --classes-per-batch"
            )
        if classes_per_batch < 1 or images_per_class < 1:
            raise ValueError("classes_per_batch and images_per_class must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1} (world_size={world_size})")
        self.by_class = {int(c): indices[labels == c] for c in self.classes}
        self.label_of = dict(zip(indices.tolist(), labels.tolist(), strict=True))
        self.C, self.K = classes_per_batch, images_per_class
        self.rank, self.world_size = rank, world_size
        self.per_rank_classes = per_rank_classes
        self.seed = seed

    @property
    def batch_size(self) -> int:
        return self.C * self.K

    def _rng(self, epoch: int) -> np.random.Generator:
        key = [self.seed, epoch, 0x5C]
        if self.per_rank_classes:
            key.append(self.rank)
        return np.random.default_rng(key)

    def epoch_batches(self, epoch: int, n_batches: int) -> tuple[np.ndarray, np.ndarray]:
        """The labeled batches of one epoch for this rank.

        Returns:
            (indices, labels), each ``[n_batches, C*K]`` int64; each row is C classes x K images
            grouped by class.
        """
        rng = self._rng(epoch)
        share = 1 if self.per_rank_classes else self.world_size
        slot = 0 if self.per_rank_classes else self.rank
        need = self.K * share  # images of one class consumed per step, all ranks together

        class_order = rng.permutation(self.classes)
        class_pos = 0
        decks = {c: rng.permutation(ix) for c, ix in self.by_class.items()}
        deck_pos = dict.fromkeys(decks, 0)

        out = np.empty((n_batches, self.C * self.K), dtype=np.int64)
        for step in range(n_batches):
            if class_pos + self.C > len(class_order):
                class_order = rng.permutation(self.classes)
                class_pos = 0
            chosen = class_order[class_pos : class_pos + self.C]
            class_pos += self.C
            for j, c in enumerate(chosen.tolist()):
                drawn = self._deal(rng, decks, deck_pos, c, need)  # [need]
                mine = drawn[slot * self.K : (slot + 1) * self.K]  # [K], this rank's slice
                out[step, j * self.K : (j + 1) * self.K] = mine
        labels = np.vectorize(self.label_of.__getitem__, otypes=[np.int64])(out)
        return out, labels

    def _deal(self, rng, decks, deck_pos, c, need) -> np.ndarray:
        """Deals `need` images of class c, ``[need]``: distinct unless the class has fewer than
        `need`; then any `K` consecutive ones are distinct while the class has at least K."""
        deck, pos = decks[c], deck_pos[c]
        n = len(deck)
        if n >= need:
            if pos + need > n:  # reshuffle: start a fresh deck
                deck = decks[c] = rng.permutation(deck)
                pos = 0
            deck_pos[c] = pos + need
            return deck[pos : pos + need]
        # Fewer images than needed: one shuffled deck dealt round and round (with replacement
        # only as far as it must: each image floor or ceil of need / n times).
        return np.resize(rng.permutation(deck), need)  # [need]
