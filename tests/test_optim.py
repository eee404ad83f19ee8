"""LARS parameter groups, the trust coefficient, and the warm-up + cosine schedule."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch_optimizer

from model.config import ModelConfig, OptimConfig
from model.encoder import build_model
from model.optim import (
    SyncFreeLARS,
    build_optimizer,
    lr_schedule,
    param_groups,
    peak_lr,
    set_lr,
)


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


# ------------------------------------------------------------------- the sync-free step

# Decayed: a weight, an all-zero weight (|p| = 0), a weight whose gradient is 0 at step 1
# (|g| = 0); no decay: a bias and a norm weight. trust 0.02 makes the ratio visible.
SHAPES = [(3, 4), (4, 4), (2, 3), (3,), (4,)]
LARS_ARGS = dict(lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.02)


def toy_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    with torch.no_grad():
        params[1].zero_()
    return params


def toy_groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0}]


def toy_grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(s, generator=g) for s in SHAPES]
    if step == 1:
        grads[2].zero_()
    return grads


def set_grads(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


def assert_same_state(a_params, a_opt, b_params, b_opt, exact: bool = False) -> None:
    check = torch.equal if exact else lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-8)
    for pa, pb in zip(a_params, b_params, strict=True):
        assert check(pa.detach(), pb.detach()), (pa, pb)
        assert check(a_opt.state[pa]["momentum_buffer"], b_opt.state[pb]["momentum_buffer"])


@pytest.mark.parametrize("nesterov", [False, True])
def test_sync_free_lars_matches_torch_optimizer_lars_on_finite_grads(nesterov):
    ref_params, params = toy_params(), toy_params()
    ref = torch_optimizer.LARS(toy_groups(ref_params), nesterov=nesterov, **LARS_ARGS)
    opt = SyncFreeLARS(toy_groups(params), nesterov=nesterov, **LARS_ARGS)
    start = [p.detach().clone() for p in params]
    for step in range(4):
        set_grads(ref_params, toy_grads(step))
        set_grads(params, toy_grads(step))
        ref.step()
        opt.step(finite=torch.tensor(True))
        assert_same_state(ref_params, ref, params, opt)
    assert not torch.equal(start[0], params[0].detach())  # the run did move the weights
    assert not torch.equal(start[1], params[1].detach())  # |p| = 0: a plain SGD step


def test_false_finite_flag_leaves_params_and_momentum_untouched():
    ref_params, params = toy_params(), toy_params()
    ref = torch_optimizer.LARS(toy_groups(ref_params), **LARS_ARGS)
    opt = SyncFreeLARS(toy_groups(params), **LARS_ARGS)
    for step in range(2):
        set_grads(ref_params, toy_grads(step))
        set_grads(params, toy_grads(step))
        ref.step()
        opt.step(finite=torch.tensor(True))

    # A non-finite step: NaN and inf gradients, flag False -> nothing moves, bit for bit.
    before = [p.detach().clone() for p in params]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in params]
    set_grads(params, [torch.full(s, float("nan")) for s in SHAPES[:-1]] + [torch.full(
        SHAPES[-1], float("inf"))])  # fmt: skip
    opt.step(finite=torch.tensor(False))
    for p, b, m in zip(params, before, buffers, strict=True):
        assert torch.equal(p.detach(), b) and torch.equal(opt.state[p]["momentum_buffer"], m)

    # ... and the next good step continues as if the bad one never happened.
    set_grads(ref_params, toy_grads(2))
    set_grads(params, toy_grads(2))
    ref.step()
    opt.step(finite=torch.tensor(True))
    assert_same_state(ref_params, ref, params, opt)


def test_sync_free_lars_under_grad_scaler_matches_the_scaler_driven_parent():
    ref_params, params = toy_params(), toy_params()
    ref = torch_optimizer.LARS(toy_groups(ref_params), **LARS_ARGS)
    opt = SyncFreeLARS(toy_groups(params), **LARS_ARGS)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for step in range(5):
        weights = toy_grads(step)
        if step == 3:
            weights[0][0, 0] = float("inf")  # an overflow: both skip and back off
        for ps, sc, o, kw in ((ref_params, ref_scaler, ref, {}),
                              (params, scaler, opt, {"finite": torch.tensor(True)})):  # fmt: skip
            o.zero_grad(set_to_none=True)
            loss = sum((p * w).sum() for p, w in zip(ps, weights, strict=True))
            sc.scale(loss).backward()
            sc.step(o, **kw)
            sc.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
        assert_same_state(ref_params, ref, params, opt)


class HostReadProbe:
    """Records every host read of tensor data: the calls that block on a GPU.

    `.item()`, `bool()` (Python `if tensor`), `float()`, `.tolist()`, `.numpy()`, `.cpu()`,
    boolean-mask indexing and data-dependent shapes (`nonzero`, `unique`, `masked_select`),
    seen at the Python API (a TorchFunctionMode) and below it (a TorchDispatchMode, for reads
    made inside C++ ops). On a CPU nothing else betrays a would-be sync.
    """

    CALLS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}
    OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2"}

    def __init__(self) -> None:
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        probe = self
        self.reads: list[str] = []
        self.callers: list[set[str]] = []  # the functions on the stack of each read

        class Calls(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in probe.CALLS or (name == "__getitem__" and probe._mask(args)):
                    probe.record(name)
                return func(*args, **(kwargs or {}))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ in probe.OPS:
                    probe.record(str(func))
                return func(*args, **(kwargs or {}))

        self.modes = [Calls(), Ops()]

    def record(self, name: str) -> None:
        self.reads.append(name)
        frame, names = sys._getframe(2), set()
        while frame is not None:
            names.add(getattr(frame.f_code, "co_qualname", frame.f_code.co_name))
            frame = frame.f_back
        self.callers.append(names)

    @staticmethod
    def _mask(args) -> bool:
        index = args[1] if len(args) > 1 else None
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts)

    def __enter__(self) -> HostReadProbe:
        for m in self.modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self.modes):
            m.__exit__(*exc)


def test_host_read_probe_catches_the_parents_tensor_truth_tests():
    params = toy_params()
    ref = torch_optimizer.LARS(toy_groups(params), **LARS_ARGS)
    set_grads(params, toy_grads(0))
    with HostReadProbe() as probe:
        ref.step()
    assert "__bool__" in probe.reads  # `if p_norm != 0 and g_norm != 0`, once per parameter


def test_sync_free_lars_step_reads_nothing_back_from_the_device():
    params = toy_params()
    opt = SyncFreeLARS(toy_groups(params), **LARS_ARGS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        weights = toy_grads(step)
        with HostReadProbe() as probe:
            opt.zero_grad(set_to_none=True)
            loss = sum((p * w).sum() for p, w in zip(params, weights, strict=True))
            finite = torch.isfinite(loss)
            scaler.scale(loss).backward()
            scaler.step(opt, finite=finite)
            scaler.update()
            opt.step(finite=finite)  # and without the scaler
        assert probe.reads == [], probe.reads


def test_sync_free_lars_refuses_dampening():
    with pytest.raises(ValueError, match="dampening"):
        SyncFreeLARS(toy_groups(toy_params()), dampening=0.1, **LARS_ARGS)
