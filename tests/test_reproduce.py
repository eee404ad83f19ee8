"""The reproduction script's arithmetic on hand-made accuracy curves: the compute SuNCEt needs
to first reach SimCLR's final SNN top-1, over SimCLR's total compute."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_reproduce():
    if "reproduce" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "reproduce", ROOT / "scripts" / "reproduce.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["reproduce"] = module
        spec.loader.exec_module(module)
    return sys.modules["reproduce"]


def curve(*points: tuple[float, float]) -> list[dict]:
    """Eval records at (flops, snn_top1); images are flops / 10."""
    return [{"flops": x, "images": x / 10, "snn_top1": acc} for x, acc in points]


SIMCLR = curve((0, 20.0), (100, 30.0), (200, 36.0), (300, 40.0))  # final 40% after 300 FLOPs


def test_ratio_uses_the_first_evaluation_reaching_simclrs_final_accuracy():
    rep = load_reproduce()
    suncet = curve((0, 20.0), (120, 35.0), (240, 45.0), (360, 50.0))
    r = rep.compute_ratio(SIMCLR, suncet, "flops")
    assert r["target"] == 40.0 and r["simclr_total"] == 300
    assert r["suncet_at_target"] == 240 and r["ratio"] == pytest.approx(0.8)
    # Linear crossing between (120, 35) and (240, 45): 35 -> 40 is half-way, at 180.
    assert r["ratio_interpolated"] == pytest.approx(180 / 300)
    assert rep.compute_ratio(SIMCLR, suncet, "images")["ratio"] == pytest.approx(0.8)
    assert rep.describe(r).startswith("0.800 (interpolated 0.600)")


def test_ratio_when_suncet_reaches_the_target_exactly_at_its_last_evaluation():
    rep = load_reproduce()
    suncet = curve((0, 20.0), (180, 30.0), (360, 40.0))  # equal counts as reached
    r = rep.compute_ratio(SIMCLR, suncet)
    assert r["suncet_at_target"] == 360
    assert r["ratio"] == pytest.approx(1.2) and r["ratio_interpolated"] == pytest.approx(1.2)


def test_ratio_is_none_and_said_plainly_when_suncet_never_reaches_the_target():
    rep = load_reproduce()
    suncet = curve((0, 20.0), (180, 35.0), (360, 39.9))
    r = rep.compute_ratio(SIMCLR, suncet)
    assert r["ratio"] is None and r["ratio_interpolated"] is None
    assert r["suncet_at_target"] is None
    assert rep.describe(r).startswith("not reached")


def test_ratio_at_the_first_evaluation_needs_no_interpolation():
    rep = load_reproduce()
    r = rep.compute_ratio(SIMCLR, curve((30, 41.0), (60, 50.0)))
    assert r["ratio"] == r["ratio_interpolated"] == pytest.approx(0.1)


@pytest.mark.parametrize("labels, k, views", [("1pct", "1", "2"), ("10pct", "4", "1")])
def test_quick_flags_pass_train_pys_checks_at_1pct_and_10pct(labels, k, views):
    """--quick keeps 60 images a class: 1% is one labeled image, so a second view is needed."""
    from test_train import load_train  # puts the repository root on sys.path

    from runner import config as rc

    r = load_reproduce()
    quick = replace(r.QUICK, supervised_epochs=r.QUICK.epochs)  # as choose_scale resolves it
    flags = r.train_flags(quick, Path("data"), labels, "cpu", 1)
    at = {f: flags[i + 1] for i, f in enumerate(flags[:-1]) if f.startswith("--")}
    assert (at["--images-per-class"], at["--n-supervised-views"]) == (k, views)
    train = load_train()
    cfg = train.resolve_config(train.build_parser().parse_args([*flags, "--out", "r"]))
    rc.validate(cfg, cuda_available=False)
