"""Encoder, projection head, multi-crop forward, FLOPs, and a tiny model that learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.config import LossConfig, ModelConfig, OptimConfig
from model.encoder import build_head, build_model
from model.flops import train_flops_per_step
from model.losses import NTXentLoss, SuNCEtLoss, suncet_total
from model.optim import build_optimizer

TINY = ModelConfig(arch="resnet18", small_stem=True, hidden_dim=64, out_dim=16)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    """One resnet18 small-stem model shared by the tests that only run forward passes."""
    return build_model(TINY)


def test_forward_returns_one_projection_per_view(tiny):
    model = tiny
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)]
    out = model(views + [torch.randn(6, 3, 16, 16)])
    assert [tuple(z.shape) for z in out] == [(4, 16), (4, 16), (4, 16), (6, 16)]
    assert model.feature_dim == 512
    assert model.features(torch.randn(2, 3, 16, 16)).shape == (2, 512)


def test_multicrop_forward_runs_backbone_once_per_crop_size(tiny):
    calls: list[tuple] = []
    hook = tiny.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    views = [torch.randn(3, 3, 16, 16)] * 2 + [torch.randn(3, 3, 8, 8)] * 4
    labeled = [torch.randn(5, 3, 16, 16)]  # same size as the large crops: same pass
    tiny(views + labeled)
    hook.remove()
    assert calls == [(11, 3, 16, 16), (12, 3, 8, 8)]


def test_grouped_forward_equals_per_view_forward_in_eval_mode(tiny):
    model = tiny.eval()
    views = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        grouped = model(views)
        single = [model([v])[0] for v in views]
    model.train()
    for a, b in zip(grouped, single, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_small_stem_is_3x3_stride1_without_maxpool(tiny):
    model = tiny
    conv = model.backbone.conv1
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, nn.Identity)
    assert isinstance(model.backbone.fc, nn.Identity)
    big = build_model(ModelConfig(arch="resnet18"))
    assert isinstance(big.backbone.maxpool, nn.MaxPool2d)


def test_default_model_is_resnet50_with_bn_mlp_head():
    model = build_model(ModelConfig())
    assert model.feature_dim == 2048
    kinds = [type(m).__name__ for m in model.head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert model.head[0].in_features == 2048 and model.head[-1].out_features == 128
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="vit_b_16"):
        build_model(ModelConfig(arch="vit_b_16"))


def test_flops_scale_with_batch_and_count_forward_and_backward(tiny):
    model = tiny
    one = train_flops_per_step(model, [(1, 3, 16, 16)])
    assert one == train_flops_per_step(model, [(1, 3, 16, 16)])  # cached
    many = train_flops_per_step(model, [(8, 3, 16, 16)] * 2, labeled_shapes=[(4, 3, 16, 16)])
    assert many == pytest.approx(20 * one, rel=1e-6)
    # resnet18 small stem at 16 px: ~0.14 GMAC backbone -> ~0.28 GFLOP forward, x3.
    assert 0.6e9 < one < 1.2e9


def tiny_cnn_model() -> nn.Module:
    """The SuNCEt model with a 2-conv backbone: the learning test runs in seconds on a CPU."""
    model = build_model(ModelConfig(arch="resnet18", channels_last=False))
    model.backbone = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),  # [B, 16, S, S]
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),  # [B, 32, S/2, S/2]
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # [B, 32]
    )
    model.feature_dim = 32
    model.head = build_head(32, 64, 16)
    return model


def test_tiny_model_learns_fixed_batches_with_lars():
    torch.manual_seed(0)
    model = tiny_cnn_model()
    opt = build_optimizer(model, OptimConfig(), 4096)  # SimCLR: LR 4.8, trust 0.001
    ntxent, suncet, lcfg = NTXentLoss(0.2), SuNCEtLoss(0.2), LossConfig()
    images = torch.randn(8, 3, 16, 16)  # [B, 3, S, S]
    labeled = torch.randn(6, 3, 16, 16)  # [N, 3, S, S], 3 classes x 2
    labels = torch.tensor([4, 9, 1, 4, 9, 1])
    noise = [0.1 * torch.randn(8, 3, 16, 16) for _ in range(2)]

    losses = []
    for _ in range(30):
        z1, z2, zs = model([images + noise[0], images + noise[1], labeled])
        l_u = ntxent(torch.stack([z1, z2]))  # [V=2, B, D] in
        l_s = suncet(zs, labels)
        loss = suncet_total(l_u, l_s, lcfg.sup_weight, 0, lcfg.supervised_epochs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
