"""NT-Xent and SuNCEt against plain loops that follow the papers, and across 2 processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.losses import NTXentLoss, SuNCEtLoss, suncet_total


def naive_ntxent(z: torch.Tensor, tau: float, n_large: int | None = None) -> float:
    """Multi-positive NT-Xent (SupCon L_out) as a double loop over anchors and keys; with
    `n_large`, two views are positives only if one of them is among the first n_large."""
    V, B, _ = z.shape
    n_large = V if n_large is None else n_large
    z = F.normalize(z.double(), dim=-1)
    items = [(v, b) for v in range(V) for b in range(B)]
    total = 0.0
    for v, b in items:
        sim = {k: float(z[v, b] @ z[k[0], k[1]]) / tau for k in items}
        denom = sum(math.exp(s) for k, s in sim.items() if k != (v, b))
        pos = [(w, b) for w in range(V) if w != v and min(v, w) < n_large]
        total += sum(-math.log(math.exp(sim[p]) / denom) for p in pos) / len(pos)
    return total / len(items)


def naive_suncet(z: torch.Tensor, labels: torch.Tensor, tau: float, eps: float = 0.0) -> float:
    """SuNCEt with optional label smoothing as a double loop; singleton anchors skipped."""
    z = F.normalize(z.double(), dim=-1)
    y = labels.tolist()
    classes = sorted(set(y))
    losses = []
    for i in range(len(y)):
        if y.count(y[i]) < 2:
            continue
        mass = dict.fromkeys(classes, 0.0)
        for j in range(len(y)):
            if j != i:
                mass[y[j]] += math.exp(float(z[i] @ z[j]) / tau)
        total = sum(mass.values())
        target = {c: eps / len(classes) + (1 - eps) * (c == y[i]) for c in classes}
        losses.append(-sum(target[c] * math.log(mass[c] / total) for c in classes))
    return sum(losses) / len(losses)


def simclr_textbook(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent as usually written: cross-entropy over 2B-1 candidates."""
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # [2B, D]
    sim = z @ z.T / tau  # [2B, 2B]
    sim.fill_diagonal_(float("-inf"))
    target = (torch.arange(2 * B) + B) % (2 * B)  # [2B]
    return F.cross_entropy(sim, target)


def stratified_labels(C: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """K copies of C random dataset class ids, shuffled: order carries no meaning."""
    classes = torch.randperm(1000, generator=gen)[:C]  # [C]
    labels = classes.repeat_interleave(K)  # [N]
    return labels[torch.randperm(C * K, generator=gen)]  # [N]


@pytest.mark.parametrize("V,B,tau", [(2, 3, 0.1), (2, 8, 0.5), (4, 5, 0.1), (8, 2, 0.2)])
def test_ntxent_matches_naive_loop(V, B, tau):
    z = torch.randn(V, B, 7, generator=torch.Generator().manual_seed(V * 10 + B))
    got = NTXentLoss(tau)(z)
    assert got.item() == pytest.approx(naive_ntxent(z, tau), rel=1e-5)


@pytest.mark.parametrize("V,n_large", [(8, 2), (4, 1), (3, 2), (2, 2), (5, 5)])
def test_ntxent_with_small_crops_matched_to_large_ones_matches_naive_loop(V, n_large):
    z = torch.randn(V, 4, 6, generator=torch.Generator().manual_seed(V + 7 * n_large))
    got = NTXentLoss(0.2, n_large=n_large)(z)
    assert got.item() == pytest.approx(naive_ntxent(z, 0.2, n_large), rel=1e-5)
    if V > n_large + 1:  # there are small-small pairs to leave out
        assert got.item() != pytest.approx(NTXentLoss(0.2)(z).item(), rel=1e-3)
    else:
        assert got.item() == pytest.approx(NTXentLoss(0.2)(z).item(), rel=1e-6)


def test_ntxent_two_views_equals_simclr_textbook():
    z = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    expected = simclr_textbook(z[0], z[1], 0.1)
    assert NTXentLoss(0.1)(z).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("C,K,tau", [(2, 2, 0.1), (3, 4, 0.1), (5, 3, 0.3), (10, 2, 0.05)])
def test_suncet_matches_naive_loop(C, K, tau):
    gen = torch.Generator().manual_seed(C * 100 + K)
    labels = stratified_labels(C, K, gen)
    z = torch.randn(C * K, 6, generator=gen)
    got = SuNCEtLoss(tau)(z, labels)
    assert got.item() == pytest.approx(naive_suncet(z, labels, tau), rel=1e-5)


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_suncet_label_smoothing_matches_naive_loop(eps):
    gen = torch.Generator().manual_seed(3)
    labels = stratified_labels(4, 3, gen)
    z = torch.randn(12, 6, generator=gen)
    got = SuNCEtLoss(0.1, label_smoothing=eps)(z, labels)
    assert got.item() == pytest.approx(naive_suncet(z, labels, 0.1, eps), rel=1e-5)


def test_suncet_is_invariant_to_sample_order():
    gen = torch.Generator().manual_seed(1)
    labels = stratified_labels(5, 4, gen)
    z = torch.randn(20, 8, generator=gen)
    perm = torch.randperm(20, generator=gen)
    loss = SuNCEtLoss(0.1, label_smoothing=0.1)
    assert loss(z[perm], labels[perm]).item() == pytest.approx(loss(z, labels).item(), rel=1e-6)


def test_suncet_several_views_concatenated_with_repeated_labels():
    gen = torch.Generator().manual_seed(2)
    labels = stratified_labels(3, 1, gen)  # K=1, but 2 supervised views -> each has a positive
    z = torch.randn(2, 3, 8, generator=gen)
    got = SuNCEtLoss(0.1)(z.reshape(6, 8), labels.repeat(2))
    assert got.item() == pytest.approx(naive_suncet(z.reshape(6, 8), labels.repeat(2), 0.1))


def test_suncet_excludes_singleton_classes_without_nan():
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(4), requires_grad=True)
    labels = torch.tensor([7, 7, 3, 3, 9])  # class 9 has no other member
    loss = SuNCEtLoss(0.1, label_smoothing=0.1)(z, labels)
    loss.backward()
    assert loss.item() == pytest.approx(naive_suncet(z.detach(), labels, 0.1, 0.1), rel=1e-5)
    assert torch.isfinite(z.grad).all()

    only_singletons = SuNCEtLoss(0.1)(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert only_singletons.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_stay_finite_with_large_logits(dtype):
    # Identical embeddings at t=0.01: every logit is 100, exp(100) overflows fp16 and fp32.
    z = torch.ones(2, 6, 16, dtype=dtype, requires_grad=True)
    l_u = NTXentLoss(0.01)(z)
    zs = torch.ones(8, 16, dtype=dtype, requires_grad=True)
    l_s = SuNCEtLoss(0.01, label_smoothing=0.1)(zs, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    (l_u + l_s).backward()
    assert l_u.item() == pytest.approx(math.log(11), rel=1e-5)  # uniform over 2B-1 = 11 keys
    assert torch.isfinite(l_s) and torch.isfinite(z.grad).all() and torch.isfinite(zs.grad).all()

    big = (torch.randn(2, 6, 16) * 1e4).to(dtype)  # norms far beyond fp16's range once squared
    assert torch.isfinite(NTXentLoss(0.01)(big))


def test_losses_compute_in_float32_under_autocast():
    gen = torch.Generator().manual_seed(6)
    z, zs = torch.randn(2, 8, 32, generator=gen), torch.randn(8, 32, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ref = NTXentLoss(0.05)(z), SuNCEtLoss(0.05)(zs, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = NTXentLoss(0.05)(z), SuNCEtLoss(0.05)(zs, labels)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r)  # a bf16 matmul would be off by ~1e-2


def test_suncet_total_never_modifies_unsupervised_loss():
    l_u, l_s = torch.tensor(2.0), torch.tensor(3.0)
    total = suncet_total(l_u, l_s, sup_weight=0.5, epoch=0, supervised_epochs=10)
    assert total.item() == 3.5 and l_u.item() == 2.0 and total is not l_u
    after = suncet_total(l_u, l_s, sup_weight=0.5, epoch=10, supervised_epochs=10)
    assert after.item() == 2.0 and after is not l_u
    assert suncet_total(l_u, None, 1.0, 0, 10).item() == 2.0


# ---- two processes (gloo on localhost) against one process with the 2x batch ----

V, B, N, D, TAU = 3, 4, 6, 8, 0.2


def _global_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    z_u = torch.randn(V, 2 * B, D, generator=gen)  # [V, 2B, D]
    z_s = torch.randn(2 * N, D, generator=gen)  # [2N, D]
    labels = torch.tensor([3, 1, 3, 8, 1, 8, 8, 3, 1, 5, 5, 3])  # [2N], classes span ranks
    return z_u, z_s, labels


def _losses_and_grads(z_u, z_s, labels, gather: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("unsup", "sup", "sum"):
        zu, zs = z_u.clone().requires_grad_(), z_s.clone().requires_grad_()
        l_u = NTXentLoss(TAU, gather_distributed=gather)(zu)
        l_s = SuNCEtLoss(TAU, label_smoothing=0.1, gather_distributed=gather)(zs, labels)
        loss = {"unsup": l_u, "sup": l_s, "sum": l_u + l_s}[name]
        loss.backward()
        out[name] = loss.detach()
        for key, x in ((name + "_gu", zu), (name + "_gs", zs)):
            out[key] = torch.zeros_like(x) if x.grad is None else x.grad
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    torch.set_num_threads(1)
    z_u, z_s, labels = _global_inputs()
    local = (
        z_u[:, rank * B : (rank + 1) * B],
        z_s[rank * N : (rank + 1) * N],
        labels[rank * N : (rank + 1) * N],
    )
    torch.save(_losses_and_grads(*local, gather=True), f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_gathered_losses_match_single_process_on_double_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref = _losses_and_grads(*_global_inputs(), gather=False)

    for name in ("unsup", "sup", "sum"):
        # The mean of the rank losses is the global loss ...
        mean = (ranks[0][name] + ranks[1][name]) / 2
        torch.testing.assert_close(mean, ref[name])
        # ... and each rank's input gradient is W=2 x the global one (DDP averages it back).
        gu = torch.cat([r[name + "_gu"] for r in ranks], dim=1) / 2  # [V, 2B, D]
        gs = torch.cat([r[name + "_gs"] for r in ranks]) / 2  # [2N, D]
        torch.testing.assert_close(gu, ref[name + "_gu"])
        torch.testing.assert_close(gs, ref[name + "_gs"])
