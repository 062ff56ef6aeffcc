"""The report's figures: one per plotted metric of dndetr.report.METRICS (per epoch), AP against wall time, and the
DN-DETR paper's Figure 2 view (IS per epoch of DETR, DAB-DETR and DN-DAB-DETR). Lines are means over seeds, bands
95 % confidence intervals (Student t over seeds; no band with one seed). Each figure is saved as PNG and PDF."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dndetr.report import METRICS, complete, epoch_stats  # noqa: E402
from dndetr.runs import Run, config_value  # noqa: E402

Curves = Dict[str, Tuple[np.ndarray, pd.DataFrame]]  # label: (x, per-epoch mean / low / high / n)


def integer_epoch_ticks(ax, epochs: Sequence[int]) -> None:
    """Whole-epoch ticks only, even for a one-epoch curve (MaxNLocator alone falls back to fractions when fewer
    than two integers are in view)."""
    epochs = sorted(int(e) for e in epochs)
    if epochs and epochs[-1] - epochs[0] < 10:
        ax.set_xticks(range(epochs[0], epochs[-1] + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def band_title(curves: Curves) -> str:
    counts = {int(stats["n"].max()) for _, stats in curves.values()}
    n = counts.pop() if len(counts) == 1 else "n"
    return f"mean and 95 % CI over {n} seed{'' if n == 1 else 's'}"


def curve_figure(curves: Curves, xlabel: str, ylabel: str, title: str):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (x, stats) in curves.items():
        (line,) = ax.plot(x, stats["mean"], marker="o", markersize=3, label=f"{label} (n={int(stats['n'].max())})")
        ax.fill_between(x, stats["low"], stats["high"], color=line.get_color(), alpha=0.2, linewidth=0)
    if xlabel == "epoch":
        integer_epoch_ticks(ax, np.concatenate([x for x, _ in curves.values()]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title=band_title(curves), fontsize="small", title_fontsize="small")
    fig.tight_layout()
    return fig


def save_figure(fig, out: Path, name: str) -> List[Path]:
    paths = [out / f"{name}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def epoch_curves(groups: Dict[str, List[Run]], column: str, scale: float) -> Curves:
    curves = {}
    for label, runs in groups.items():
        stats = epoch_stats(runs, column)
        if not stats.empty:
            stats[["mean", "low", "high"]] *= scale
            curves[label] = (stats.index.to_numpy(), stats)
    return curves


def time_curves(groups: Dict[str, List[Run]]) -> Tuple[Curves, str]:
    """AP (%) against the mean wall time over seeds at each epoch; the unit is minutes or hours."""
    curves = {}
    for label, runs in groups.items():
        ap, wall = epoch_stats(runs, "AP"), epoch_stats(runs, "wall_time")
        epochs = ap.index.intersection(wall.index)
        if len(epochs):
            ap = ap.loc[epochs].copy()
            ap[["mean", "low", "high"]] *= 100
            curves[label] = (wall.loc[epochs, "mean"].to_numpy(), ap)
    longest = max((x.max() for x, _ in curves.values()), default=0)
    unit, seconds = ("hours", 3600) if longest > 7200 else ("minutes", 60)
    return {label: (x / seconds, stats) for label, (x, stats) in curves.items()}, unit


def make_plots(groups: Dict[str, List[Run]], out: Path, figures=()) -> Tuple[List[Path], List[str]]:
    """(files written, notes on plots skipped). ``figures`` are a study file's own figures (dndetr/claims.py)."""
    from .claims import figure_groups

    written, skipped = [], []
    for metric in (m for m in METRICS if m.plot):
        curves = epoch_curves(groups, metric.column, metric.scale)
        if curves:
            written += save_figure(curve_figure(curves, "epoch", metric.axis, metric.question), out, metric.plot)
        else:
            skipped.append(f"{metric.plot}: no run has {metric.column}")
    curves, unit = time_curves(groups)
    if curves:
        fig = curve_figure(curves, f"wall time ({unit}, mean over seeds)", "AP (%)",
                           "Which setting reaches a given AP soonest in wall-clock time?")
        written += save_figure(fig, out, "ap_vs_time")
    else:
        skipped.append("ap_vs_time: no run has both AP and wall_time")
    for figure in figures:
        chosen, why_not = figure_groups(figure, groups)
        curves = epoch_curves(chosen, figure.metric.column, figure.metric.scale)
        if chosen and len(curves) == len(chosen):
            fig = curve_figure(curves, "epoch", figure.metric.axis, figure.title)
            written += save_figure(fig, out, figure.name)
        else:
            skipped.append(f"{figure.name}: {why_not or 'a setting has no ' + figure.metric.column}")
    return written, skipped
