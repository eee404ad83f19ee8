"""What a run reports: the log line, metrics.jsonl (+ metrics.csv), and a PNG of losses, LR and
(with the online monitor) SNN/kNN accuracy.

metrics.jsonl holds two kinds of record: one per log step (``l_unsup``, ``lr``, ``img_per_s``,
...) and, with ``--monitor-every``, one per evaluation (``"event": "eval"``, ``snn_top1``, ...).
Both carry ``step``, ``epoch``, ``images`` and ``flops``, so accuracy can be drawn against
compute.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

METRICS = "metrics.jsonl"
CSV = "metrics.csv"
PLOT = "metrics.png"


def write_json(path: str | Path, obj) -> Path:
    """Writes `obj` as indented JSON under a temporary name, then renames it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def fmt_num(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def count(n: int, noun: str) -> str:
    """`1 epoch`, `3 epochs`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_line(rec: dict) -> str:
    """`step 1200 ep 3 | l_unsup 5.12 l_sup 2.31 | lr 4.80e-01 | 11850 img/s | data-wait 3%`.

    `l_sup` reads `off` once SuNCEt is no longer added (after `supervised_epochs`).
    """
    sup = fmt_num(rec["l_sup"], ".2f") if rec.get("sup_active", True) else "off"
    line = (
        f"step {rec['step']} ep {rec['epoch']} | l_unsup {fmt_num(rec['l_unsup'], '.2f')} "
        f"l_sup {sup} | lr {rec['lr']:.2e} | {rec['img_per_s']:.0f} img/s | "
        f"data-wait {100 * rec['data_wait']:.0f}%"
    )
    if rec.get("nonfinite"):
        line += f" | non-finite {rec['nonfinite']}"
    return line


def is_eval(rec: dict) -> bool:
    """True for the online monitor's records."""
    return rec.get("event") == "eval"


def format_eval_line(rec: dict) -> str:
    """`eval ep 3 | snn top1 41.20 top5 88.10 | knn top1 39.00 | 2.1 s` (`eval start` at step 0)."""
    when = "start" if rec["epoch"] < 0 else f"ep {rec['epoch']}"
    return (
        f"eval {when} | snn top1 {rec['snn_top1']:.2f} top5 {rec['snn_top5']:.2f} | "
        f"knn top1 {rec['knn_top1']:.2f} | {rec['eval_seconds']:.1f} s"
    )


class MetricsLog:
    """Appends one JSON object per log step to `run_dir/metrics.jsonl` (rank 0 only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled

    def append(self, rec: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def read(self) -> list[dict]:
        """Every record; a last line cut short (a full disk, a power loss) is dropped."""
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i < len(lines) - 1:  # damage before the end is not a cut-short write
                    raise ValueError(f"{self.path}: line {i + 1} is not JSON ({e})") from e
        return records

    def truncate_after(self, step: int) -> None:
        """Drops records past `step` (written after the checkpoint a resumed run starts from)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def write_csv(self) -> Path:
        """Rewrites metrics.csv from metrics.jsonl (one row per log step)."""
        records = [r for r in self.read() if "l_unsup" in r]
        out = self.path.with_name(CSV)
        keys: list[str] = []
        for r in records:
            keys += [k for k in r if k not in keys]
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(records)
        return out


def plot(records: list[dict], path: str | Path) -> Path:
    """Plots l_unsup, l_sup, l_total, the LR and (if any) the monitor's top-1 against the step
    (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if is_eval(r)]
    records = [r for r in records if "l_unsup" in r]
    steps = [r["step"] for r in records]
    rows = 3 if evals else 2
    fig, axes = plt.subplots(rows, 1, figsize=(7, 3 * rows), sharex=True)
    ax_loss, ax_lr = axes[0], axes[1]
    for key in ("l_total", "l_unsup", "l_sup"):
        ys = [r[key] if r[key] is not None else math.nan for r in records]
        ax_loss.plot(steps, ys, label=key)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:red")
    ax_lr.set_ylabel("learning rate")
    if evals:
        ax_acc = axes[2]
        for key in ("snn_top1", "knn_top1"):
            ax_acc.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key)
        ax_acc.set_ylabel("val accuracy (%)")
        ax_acc.legend()
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path
