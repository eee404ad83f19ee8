"""bench/loaders.py's report: goals judged on per-round ratios of loaders timed back to back."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.loaders import Row, build_report, paired  # noqa: E402


def rows_of(rates: dict[str, list[float]]) -> dict[str, Row]:
    return {k: Row(k, f"({k})", v) for k, v in rates.items()}


def test_paired_ratio_cancels_drift_between_rounds():
    # The machine runs at 1x, 2x, 0.5x speed in the three rounds; (c) is 0.8x (e) in each.
    rows = rows_of({"c": [80.0, 160.0, 40.0], "e": [100.0, 200.0, 50.0]})
    med, lo, hi = paired(rows, "c", "e")
    assert (round(med, 6), round(lo, 6), round(hi, 6)) == (0.8, 0.8, 0.8)


def test_report_judges_the_goals_on_paired_ratios():
    rates = {
        "a": [5.0, 10.0, 2.5],
        "c_workers": [40.0, 80.0, 20.0],
        "e": [100.0, 200.0, 50.0],
        "c_host": [90.0, 150.0, 45.0],  # 0.9, 0.75, 0.9 of (e): median 0.9
        "c_host_lab": [85.0, 100.0, 43.0],  # +6%, +50%, +5% data time: median +6%
        "c_cpu": [30.0, 60.0, 15.0],
        "c_cpu_lab": [20.0, 40.0, 10.0],  # +50% every round
        "d": [20.0, 40.0, 10.0],
        "d_lab": [19.0, 38.0, 9.5],
    }
    lines = {
        ln["label"]: ln
        for ln in build_report(
            rows_of(rates), {"first": [3.0], "first x3": [13.0, 9.0, 11.5]}, quick=True
        )
    }
    vs_decode = lines["(c) host-side vs decode only"]
    assert vs_decode["ratio"].startswith("0.90x (e) (rounds 0.75-0.90)") and vs_decode["met"]
    assert (
        lines["(c_host_lab)"]["ratio"].startswith("+6% data time") and lines["(c_host_lab)"]["met"]
    )
    assert lines["(c_cpu_lab)"]["ratio"].startswith("+50%") and not lines["(c_cpu_lab)"]["met"]
    assert lines["(c_workers)"]["ratio"].startswith("0.40x (e)")
    assert lines["(c_host)"]["ratio"] == "18.00x (a)" and lines["(c_host)"]["met"]  # >= 10x
    assert lines["first"]["ratio"] == "3.0 s" and lines["first"]["met"]
    assert lines["first x3"]["ratio"] == "11.5 s (launches 9.0-13.0 s)"  # the median launch
    assert lines["first x3"]["met"]


def test_importing_ffcv_the_baseline_way_leaves_torch_threads_and_measure_checks_them():
    """FFCV sets torch's thread count to 1 at import: the per-view baseline imported it first
    and every later torch augmentation in the bench ran on one thread (a third slower)."""
    import subprocess

    code = (
        "import torch; torch.set_num_threads(2); import bench.loaders as L\n"
        "from pathlib import Path\n"
        "try:\n    L.FFCVPerViewSource(Path('/nonexistent'), None, None, False)\n"
        "except Exception:\n    pass\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "2", out.stderr

    import pytest
    import torch

    from bench.loaders import WORKERS, Source, measure

    threads = torch.get_num_threads()
    torch.set_num_threads(WORKERS + 1)
    try:
        with pytest.raises(RuntimeError, match=f"torch runs {WORKERS + 1} thread"):
            measure(Source(), 1.0, 0)
    finally:
        torch.set_num_threads(threads)
