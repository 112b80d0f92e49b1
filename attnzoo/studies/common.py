"""What every study shares: configuration records, JSON output, plots (matplotlib, Agg) and checks."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

import attnzoo


def environment() -> dict:
    return {
        "attnzoo_version": attnzoo.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "backend_requested": "auto",
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def mean_std(xs: Sequence[float]) -> tuple:
    xs = [float(x) for x in xs]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: Sequence[float], digits: int = 3) -> str:
    m, s = mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def smooth(xs: List[float], k: int) -> List[float]:
    if k <= 1:
        return list(xs)
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=False, default=float) + "\n")


def save_study(out: Path, name: str, result: dict, plot, report) -> dict:
    """A study's outputs in ``out``: ``<name>.json`` (the result), its plots, and ``<name>.md`` (its page)."""
    write_json(out / f"{name}.json", result)
    plot(out, result)
    (out / f"{name}.md").write_text(report(result))
    return result


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def plot_curves(path: Path, runs_by_variant: Dict[str, List[List[float]]], title: str, ylabel: str,
                smooth_k: int = 10, ylim=None) -> None:
    """Mean over seeds (line) and min-max over seeds (band) of per-step curves, one colour per variant."""
    p = plt()
    fig, ax = p.subplots(figsize=(7, 4.2))
    for variant, curves in runs_by_variant.items():
        curves = [smooth(c, smooth_k) for c in curves]
        n = min(len(c) for c in curves)
        steps = list(range(n))
        mean = [statistics.fmean(c[i] for c in curves) for i in steps]
        lo = [min(c[i] for c in curves) for i in steps]
        hi = [max(c[i] for c in curves) for i in steps]
        (line,) = ax.plot(steps, mean, label=variant, lw=1.3)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    p.close(fig)


def plot_bars(path: Path, groups: List[str], series: Dict[str, Dict[str, List[float]]], title: str, ylabel: str,
              ylim=None, zoom: bool = False) -> None:
    """Grouped bars: for each group (x), one bar per series with its mean over seeds, error bars min-max,
    and the seeds as dots."""
    p = plt()
    fig, ax = p.subplots(figsize=(max(6, 1.1 * len(groups) * max(1, len(series)) / 2.5), 4.2))
    names = list(series)
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs, ms, los, his = [], [], [], []
        for i, g in enumerate(groups):
            vals = series[name].get(g, [])
            if not vals:
                continue
            m = statistics.fmean(vals)
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            ms.append(m)
            los.append(m - min(vals))
            his.append(max(vals) - m)
            ax.scatter([xs[-1]] * len(vals), vals, s=6, color="k", zorder=3)
        ax.bar(xs, ms, width=width, yerr=[los, his], capsize=2, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if zoom and not ylim:  # losses: the differences matter, not the distance from 0 (the axis says so)
        vals = [v for g in series.values() for vs in g.values() for v in vs]
        lo, hi = min(vals), max(vals)
        pad = max(hi - lo, 1e-3)
        ylim = (lo - 0.6 * pad, hi + 0.3 * pad)
        ax.text(0.01, 0.98, "note: the y axis does not start at 0", transform=ax.transAxes, fontsize=7, va="top")
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3, axis="y")
    if len(names) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    p.close(fig)


def check_run(run: dict, *, head: int = 5) -> List[str]:
    """The self-checks of one training run: every loss finite, and the last steps lower than the first."""
    problems = []
    losses = run["train"]["loss"]
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append(f"{run['name']}: non-finite training loss")
    elif statistics.fmean(losses[-head:]) >= statistics.fmean(losses[:head]):
        problems.append(f"{run['name']}: training loss did not fall ({statistics.fmean(losses[:head]):.3f} -> "
                        f"{statistics.fmean(losses[-head:]):.3f})")
    for k, v in run.get("eval", {}).items():
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(f"{run['name']}: eval {k} is not finite")
    return problems
