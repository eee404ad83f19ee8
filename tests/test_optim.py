"""LARS parameter groups, the trust coefficient, and the warm-up + cosine schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_optimizer

from model.config import ModelConfig, OptimConfig
from model.encoder import build_model
from model.optim import build_optimizer, lr_schedule, param_groups, peak_lr, set_lr


@pytest.fixture(scope="module")
def resnet50():
    return build_model(ModelConfig())


def test_no_decay_group_holds_every_bias_and_1d_parameter(resnet50):
    groups = {g["name"]: g for g in param_groups(resnet50, weight_decay=1e-6)}
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 1e-6 and groups["no_decay"]["weight_decay"] == 0

    names = dict(resnet50.named_parameters())
    assert not decay & no_decay and decay | no_decay == {id(p) for p in names.values()}
    for name, p in names.items():
        if p.ndim <= 1 or name.endswith("bias"):
            assert id(p) in no_decay, name
        else:
            assert id(p) in decay, name
    assert id(names["backbone.layer1.0.downsample.1.weight"]) in no_decay
    assert id(names["head.6.bias"]) in no_decay  # the last Linear's bias


def test_lars_uses_configured_trust_coefficient_and_scaled_lr(resnet50):
    cfg = OptimConfig()
    opt = build_optimizer(resnet50, cfg, global_batch=4096)
    assert isinstance(opt, torch_optimizer.LARS)
    assert peak_lr(cfg, 4096) == pytest.approx(4.8)  # SimCLR: 0.3 x 4096 / 256
    for g in opt.param_groups:
        assert g["trust_coefficient"] == 0.001 and g["momentum"] == 0.9
        assert g["lr"] == pytest.approx(4.8)
    set_lr(opt, 0.5)
    assert all(g["lr"] == 0.5 for g in opt.param_groups)


def test_lars_adapts_decayed_weights_and_leaves_no_decay_group_plain_sgd():
    w = torch.nn.Parameter(torch.full((4, 4), 2.0))  # ||w|| = 8
    b = torch.nn.Parameter(torch.ones(4))
    groups = [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}]
    opt = torch_optimizer.LARS(groups, lr=1.0, trust_coefficient=0.001)
    w.grad, b.grad = torch.ones(4, 4), torch.ones(4)  # ||g|| = 4
    opt.step()
    ratio = 0.001 * 8 / (4 + 8 * 0.1 + 1e-8)  # trust ratio of the decayed group
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 2.0 - ratio * (1 + 0.1 * 2)))
    torch.testing.assert_close(b.detach(), torch.zeros(4))  # b - lr * g: no adaptation


def test_schedule_warms_up_linearly_then_decays_to_final_lr():
    cfg = OptimConfig(base_lr=0.3, lr_batch_ref=256, warmup_epochs=2, final_lr=0.001)
    lr = lr_schedule(cfg, steps_per_epoch=10, epochs=12, global_batch=512)
    assert lr.shape == (120,)
    np.testing.assert_allclose(lr[:20], 0.6 * np.arange(1, 21) / 20)  # warm-up ends at peak
    assert lr[0] > 0 and lr[19] == pytest.approx(0.6) and lr[20] == pytest.approx(0.6)
    assert lr[-1] == pytest.approx(0.001)
    assert lr.max() == pytest.approx(0.6)
    assert np.all(np.diff(lr[20:]) <= 0)
    assert lr[70] == pytest.approx(0.001 + 0.5 * (0.6 - 0.001) * (1 + np.cos(np.pi * 50 / 99)))


def test_schedule_without_warmup_starts_at_peak():
    cfg = OptimConfig(base_lr=1.0, lr_batch_ref=1, warmup_epochs=0, final_lr=0.0)
    lr = lr_schedule(cfg, steps_per_epoch=5, epochs=2, global_batch=2)
    assert lr[0] == pytest.approx(2.0) and lr[-1] == pytest.approx(0.0) and len(lr) == 10
