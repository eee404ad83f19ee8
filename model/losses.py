"""NT-Xent (SimCLR, multi-positive for multi-crop) and SuNCEt as small modules.

Shape letters used across `model/`:
    B  images in the (per-rank) unlabeled batch
    V  views per image
    C  classes in the labeled batch, K images per class, N = C*K labeled embeddings
    D  projection dim
    W  world size; primed letters (B', N') are the gathered, all-rank sizes: B' = W*B

Both losses compute similarities in float32 (safe under fp16/bf16 autocast), normalise with
log-sum-exp and never read a tensor back to the host. With `gather_distributed=True` the
anchors are this rank's rows and the keys are every rank's rows (gathered with gradients):
each rank's loss is the mean over its own anchors, so the mean of the rank losses is the
global loss, and the gradient reaching a rank's inputs is W times the global loss's; DDP's
gradient averaging divides that W back out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.distributed import gather_cat, gather_views, rank_and_world

NEG_INF = float("-inf")


class NTXentLoss(nn.Module):
    """NT-Xent over V views per image; the other views of an image are its positives.

    For anchor a and its positives P(a): mean_a mean_{p in P(a)} -log(e^{s_ap/t} / sum_{k!=a}
    e^{s_ak/t}) with cosine similarities s (SupCon's L_out). With V=2 this is SimCLR's NT-Xent.
    By default P(a) is all V-1 other views (VISSL's multi-crop SimCLR: two small crops of an
    image are positives too); with `n_large` set, a pair needs one of the first `n_large`
    views (the large crops): a small crop's positives are the large crops only, a large
    crop's all the others (SwAV's and PAWS's use of small crops).

    Args:
        temperature: t.
        gather_distributed: contrast against every rank's embeddings (see module docstring).
        n_large: None (every pair), or how many of the leading views are large crops.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        gather_distributed: bool = False,
        n_large: int | None = None,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if n_large is not None and n_large < 1:
            raise ValueError(f"n_large must be >= 1 (or None for every pair), got {n_large}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.n_large = n_large

    def forward(self, z: Tensor) -> Tensor:
        """Returns the scalar loss for projections `z` of shape `[V, B, D]`."""
        if z.dim() != 3 or z.shape[0] < 2:
            raise ValueError(f"expected z of shape [V>=2, B, D], got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):  # autocast would undo .float()
            return self._loss(z)

    def _loss(self, z: Tensor) -> Tensor:
        V, B, _ = z.shape

        # 1. Normalise in float32; keys are all ranks' embeddings, anchors this rank's.
        z = F.normalize(z.float(), dim=-1)  # [V, B, D]
        offset = 0
        keys = z
        if self.gather_distributed:
            rank, _ = rank_and_world()
            keys = gather_views(z)  # [V, B', D]
            offset = rank * B
        Bk = keys.shape[1]

        # 2. Similarities of every anchor (v, b) to every key (v', b').
        logits = z.reshape(V * B, -1) @ keys.reshape(V * Bk, -1).T / self.temperature  # [VB, VB']

        # 3. Masks from index arithmetic: self = same view and image, positive = same image.
        a_img = torch.arange(B, device=z.device).repeat(V) + offset  # [VB]
        a_view = torch.arange(V, device=z.device).repeat_interleave(B)  # [VB]
        k_img = torch.arange(Bk, device=z.device).repeat(V)  # [VB']
        k_view = torch.arange(V, device=z.device).repeat_interleave(Bk)  # [VB']
        same_img = a_img[:, None] == k_img[None, :]  # [VB, VB']
        is_self = same_img & (a_view[:, None] == k_view[None, :])  # [VB, VB']
        is_pos = same_img & ~is_self  # [VB, VB'], V-1 per row
        n_pos = V - 1
        if self.n_large is not None and self.n_large < V:
            with_large = (a_view < self.n_large)[:, None] | (k_view < self.n_large)[None, :]
            is_pos = is_pos & with_large  # [VB, VB']
            n_pos = torch.where(a_view < self.n_large, V - 1, self.n_large)  # [VB]

        # 4. Log-softmax over all keys but self, averaged over each anchor's positives.
        logits = logits.masked_fill(is_self, NEG_INF)  # [VB, VB']
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # [VB, VB']
        per_anchor = -torch.where(is_pos, log_prob, 0.0).sum(dim=1) / n_pos  # [VB]
        return per_anchor.mean()


class SuNCEtLoss(nn.Module):
    """Supervised neighbourhood-component contrastive loss on a labeled batch.

    For embedding i: -log(sum_{j!=i, y_j=y_i} e^{s_ij/t} / sum_{j!=i} e^{s_ij/t}), averaged
    over i. With label smoothing e, the target puts (1-e) on the true class and e/C' on each
    of the C' classes present, and the loss is -sum_c t_c log p_c with p_c = class mass /
    total mass (over j != i).

    An embedding whose class has no other member in the (gathered) batch has an undefined
    loss (only possible with K=1 and one supervised view); it is left out of the mean by a
    mask, and a batch where every embedding is such gives 0. With `gather_distributed`, each
    rank averages over its own valid anchors, so the mean of the rank losses is the global
    mean only when every rank has as many valid anchors (always, unless K=1 with one view).

    Args:
        temperature: t.
        label_smoothing: e in [0, 1).
        gather_distributed: contrast against every rank's embeddings (see module docstring).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        label_smoothing: float = 0.0,
        gather_distributed: bool = False,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.temperature = temperature
        self.label_smoothing = label_smoothing
        self.gather_distributed = gather_distributed

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """Returns the scalar loss for embeddings `z [N, D]` with class ids `labels [N]`.

        Several supervised views: concatenate them along N and repeat the labels.
        """
        if z.dim() != 2 or labels.shape != z.shape[:1]:
            raise ValueError(f"expected z [N, D], labels [N]; got {z.shape}, {labels.shape}")
        with torch.autocast(z.device.type, enabled=False):  # autocast would undo .float()
            return self._loss(z, labels)

    def _loss(self, z: Tensor, labels: Tensor) -> Tensor:
        N = z.shape[0]

        # 1. Normalise in float32; keys are all ranks' embeddings, anchors this rank's.
        z = F.normalize(z.float(), dim=-1)  # [N, D]
        keys, key_labels, offset = z, labels, 0
        if self.gather_distributed:
            rank, _ = rank_and_world()
            keys = gather_cat(z)  # [N', D]
            key_labels = gather_cat(labels)  # [N']
            offset = rank * N
        Nk = keys.shape[0]

        # 2. Similarities, self excluded.
        idx = torch.arange(N, device=z.device) + offset  # [N]
        is_self = idx[:, None] == torch.arange(Nk, device=z.device)[None, :]  # [N, N']
        logits = (z @ keys.T / self.temperature).masked_fill(is_self, NEG_INF)  # [N, N']
        log_total = torch.logsumexp(logits, dim=1)  # [N]

        # 3. Name each class by the first key that holds it (no unique(): no host sync).
        key_rep = (key_labels[:, None] == key_labels[None, :]).int().argmax(dim=1)  # [N']
        anchor_rep = (labels[:, None] == key_labels[None, :]).int().argmax(dim=1)  # [N]
        present = key_rep == torch.arange(Nk, device=z.device)  # [N'], one True per class

        # 4. Log class mass per anchor, in log space: scatter the max, then sum exp.
        rep = key_rep.expand(N, Nk)  # [N, N']
        cmax = torch.full_like(logits, NEG_INF).scatter_reduce(
            1, rep, logits, "amax", include_self=False
        )  # [N, N'], column r = class represented by key r
        cmax = torch.where(torch.isfinite(cmax), cmax, 0.0).detach()  # [N, N'], a shift only
        shifted = (logits - cmax.gather(1, rep)).exp()  # [N, N'], self -> 0
        mass = torch.zeros_like(logits).scatter_add(1, rep, shifted)  # [N, N']
        nonempty = mass > 0  # [N, N']; log(0) is kept out of autograd (its grad is NaN)
        log_mass = torch.where(nonempty, mass, 1.0).log() + cmax  # [N, N']
        log_p = torch.where(nonempty, log_mass - log_total[:, None], NEG_INF)  # [N, N']

        # 5. Cross-entropy against the (smoothed) target over the classes present.
        eps = self.label_smoothing
        n_present = present.sum()  # [] (stays on the device)
        own = anchor_rep[:, None] == torch.arange(Nk, device=z.device)[None, :]  # [N, N']
        target = torch.where(present, eps / n_present, 0.0) + (1 - eps) * own  # [N, N']
        per_anchor = -torch.where(target > 0, target * log_p, 0.0).sum(dim=1)  # [N]

        # 6. Drop anchors whose class has no other member (their own mass is empty).
        valid = nonempty.gather(1, anchor_rep[:, None]).squeeze(1)  # [N]
        per_anchor = torch.where(valid, per_anchor, 0.0)  # [N]
        return per_anchor.sum() / valid.sum().clamp(min=1)


def suncet_total(
    l_unsup: Tensor,
    l_sup: Tensor | None,
    sup_weight: float,
    epoch: int,
    supervised_epochs: int,
) -> Tensor:
    """Returns a new tensor l_unsup + sup_weight * l_sup (l_unsup alone once epoch >= N).

    Never adds in place, so a logged `l_unsup` keeps its own value.

    Args:
        l_unsup: the NT-Xent loss.
        l_sup: the SuNCEt loss, or None when it was not computed.
        sup_weight: weight of the supervised term; 0 gives plain SimCLR.
        epoch: the current epoch (0-based).
        supervised_epochs: SuNCEt is added during epochs [0, supervised_epochs).
    """
    if l_sup is None or sup_weight == 0 or epoch >= supervised_epochs:
        return l_unsup.clone()
    return l_unsup + sup_weight * l_sup
