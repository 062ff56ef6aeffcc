"""The study report: one table of metrics (METRICS) drives the summary, the confidence intervals, the paired
differences, the plots and the metric names that claims may use. A new metric is one entry in METRICS.

Every number is computed per run, then per seed (runs repeating a seed are averaged into one value), then over
seeds (mean, sample sd, Student-t 95 % CI; dndetr/stats.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import pandas as pd

from dndetr import stats
from dndetr.runs import Run

ALL = "all"


@dataclass(frozen=True)
class Metric:
    name: str  # summary.csv column prefix and the name claims use
    column: str  # the metrics.jsonl key it is computed from
    label: str  # table header; {from_epoch} and {target} are filled in
    reduce: str  # how one run's curve becomes one number: a key of REDUCERS
    scale: float = 1.0  # display factor (AP is stored as a fraction, shown in %)
    digits: int = 2
    ci: bool = True  # 95 % CI over seeds and paired differences between settings
    lower_is_better: bool = False
    from_epoch: bool = False  # in the summary, only epochs >= --from-epoch count
    summary: bool = True  # a column of summary.md / summary.csv (else only for claims)
    plot: str = ""  # file name of its per-epoch plot ("" = none)
    axis: str = ""  # the plot's y label
    question: str = ""  # the plot's title: what it answers


METRICS: Tuple[Metric, ...] = (
    Metric("final_AP", "AP", "final AP (%)", "last", scale=100, digits=1, plot="ap_vs_epoch", axis="AP (%)",
           question="Which setting converges fastest per epoch?"),
    Metric("best_AP", "AP", "best AP (%)", "max", scale=100, digits=1),
    Metric("AP_area", "AP", "mean AP over epochs (%)", "area", scale=100, digits=1),
    Metric("IS", "IS", "IS (epochs >= {from_epoch})", "mean", lower_is_better=True, from_epoch=True,
           plot="instability", axis="IS (queries changing their match per image)",
           question="Which setting matches its queries most stably between epochs?"),
    Metric("IS_norm", "IS_norm", "IS_norm", "mean", digits=3, lower_is_better=True, from_epoch=True,
           plot="instability_norm", axis="IS / (2 x mean objects per image)",
           question="What fraction of the maximum possible instability does each setting show?"),
    Metric("epochs_to_reach", "AP", "epochs to reach {target}", "epochs_to_reach", digits=1, lower_is_better=True),
    Metric("time_to_reach", "AP", "seconds to reach {target}", "time_to_reach", digits=0, lower_is_better=True),
    Metric("reach_share", "AP", "epochs to reach {target} / reference epochs", "reach_share",
           lower_is_better=True, summary=False),
    Metric("epoch_time", "epoch_time", "s / epoch", "mean", digits=1, ci=False, lower_is_better=True),
)
BY_NAME = {metric.name: metric for metric in METRICS}


@dataclass
class Reference:
    """The convergence target: ``fraction`` x the reference setting's final AP (mean over its seeds)."""

    label: str
    fraction: float
    target: float  # AP as a fraction
    epochs: float  # the reference runs' mean number of epochs


def reach_epoch(series: pd.Series, ref: Optional[Reference]) -> Optional[int]:
    return stats.first_reach(series.index, series.values, ref.target) if ref else None


def time_at(frame: pd.DataFrame, epoch: Optional[int]) -> float:
    if epoch is None or "wall_time" not in frame:
        return float("nan")
    return float(frame.set_index("epoch")["wall_time"].get(epoch, float("nan")))


def reached(series, ref, scale_by: Callable[[int], float]) -> float:
    epoch = reach_epoch(series, ref)
    return float("nan") if epoch is None else scale_by(epoch + 1)  # epochs trained when it first got there


# f(series of the column's non-NaN values by epoch, the run's rows in the epoch window, reference) -> float
REDUCERS: Dict[str, Callable[[pd.Series, pd.DataFrame, Optional[Reference]], float]] = {
    "last": lambda s, frame, ref: float(s.iloc[-1]),
    "max": lambda s, frame, ref: float(s.max()),
    "mean": lambda s, frame, ref: float(s.mean()),
    "area": lambda s, frame, ref: stats.curve_area(s.index, s.values),
    "epochs_to_reach": lambda s, frame, ref: reached(s, ref, float),
    "time_to_reach": lambda s, frame, ref: time_at(frame, reach_epoch(s, ref)),
    "reach_share": lambda s, frame, ref: reached(s, ref, lambda epochs: epochs / ref.epochs),
}
REACH = {"epochs_to_reach", "time_to_reach", "reach_share"}  # NaN means: never reached the target


def window(run: Run, first: int = 0, last: Optional[int] = None) -> pd.DataFrame:
    frame = run.metrics
    if frame.empty:
        return frame
    keep = frame["epoch"] >= first
    if last is not None:
        keep &= frame["epoch"] <= last
    return frame[keep]


def run_value(run: Run, metric: Metric, first: int = 0, last: Optional[int] = None,
              ref: Optional[Reference] = None) -> float:
    """One run's value of ``metric`` over epochs first..last (inclusive; None = to the end)."""
    frame = window(run, first, last)
    if metric.column not in frame:
        return float("nan")
    series = pd.to_numeric(frame.set_index("epoch")[metric.column], errors="coerce").dropna()
    if series.empty or (metric.reduce in REACH and ref is None):
        return float("nan")
    return REDUCERS[metric.reduce](series, frame, ref)


def complete(runs: List[Run]) -> List[Run]:
    return [run for run in runs if not run.failed]


def seed_values(runs: List[Run], metric: Metric, first: int = 0, last: Optional[int] = None,
                ref: Optional[Reference] = None) -> Tuple[Dict[str, float], Dict[str, int]]:
    """({seed: value}, {repeated seed: runs}) over the completed runs; repeats of a seed are averaged."""
    return stats.seed_means((run.seed, run_value(run, metric, first, last, ref)) for run in complete(runs))


def epoch_stats(runs: List[Run], column: str) -> pd.DataFrame:
    """Per epoch: mean, low, high (95 % CI) and n over seeds of ``column`` (repeats of a seed averaged first)."""
    per_seed: Dict[str, List[pd.Series]] = {}
    for run in complete(runs):
        if column in run.metrics:
            values = pd.to_numeric(run.metrics.set_index("epoch")[column], errors="coerce")
            per_seed.setdefault(run.seed, []).append(values)
    if not per_seed:
        return pd.DataFrame(columns=["mean", "low", "high", "n"])
    table = pd.concat({seed: pd.concat(s, axis=1).mean(axis=1) for seed, s in per_seed.items()}, axis=1)
    rows = {epoch: vars(stats.mean_ci(values)) for epoch, values in table.iterrows()}
    frame = pd.DataFrame.from_dict(rows, orient="index")[["mean", "low", "high", "n"]]
    return frame[frame["n"] > 0].sort_index()


# ----------------------------------------------------------------------------------------------------------------
# settings by name


def match_setting(groups: Dict[str, List[Run]], wanted: Union[str, dict], where: str) -> Optional[str]:
    """The label of the one setting that ``wanted`` names: its exact label, or key=value pairs (a mapping, or
    text like ``dn.groups=5, model=dab``) that its runs all have. None when no setting matches; ValueError naming
    ``where`` when several do."""
    if isinstance(wanted, str) and wanted in groups:
        return wanted
    if isinstance(wanted, str):
        pairs = [item.partition("=") for item in wanted.split(",")]
        if not all(sep and key.strip() for key, sep, _ in pairs):
            return None
        wanted = {key.strip(): value.strip() for key, _, value in pairs}
    found = [label for label, runs in groups.items()
             if all(run.setting_value(str(k)) == str(v) for run in runs for k, v in wanted.items())]
    if len(found) > 1:
        raise ValueError(f"{where}: {wanted} matches {len(found)} settings ({'; '.join(found)}); name one")
    return found[0] if found else None


def reference(groups: Dict[str, List[Run]], label: str, fraction: float) -> Optional[Reference]:
    finals, _ = seed_values(groups[label], BY_NAME["final_AP"])
    epochs = [float(run.metrics["epoch"].max() + 1) for run in complete(groups[label])]
    final = stats.nanmean(list(finals.values()))
    if math.isnan(final) or not epochs:
        return None
    return Reference(label, fraction, fraction * final, sum(epochs) / len(epochs))


# ----------------------------------------------------------------------------------------------------------------
# tables


def summary_table(groups: Dict[str, List[Run]], keys: List[str], from_epoch: int,
                  ref: Optional[Reference]) -> pd.DataFrame:
    rows = []
    for label, runs in groups.items():
        done = complete(runs)
        _, repeats = stats.seed_means((run.seed, 0.0) for run in done)
        row = {"setting": label, **{k: runs[0].setting_value(k) for k in keys},
               "n_seeds": len({run.seed for run in done}), "n_runs": len(done), "n_failed": len(runs) - len(done),
               "repeated_seeds": " ".join(f"{seed}x{count}" for seed, count in repeats.items()),
               "epochs": int(max(run.metrics["epoch"].max() + 1 for run in done)) if done else 0}
        for metric in (m for m in METRICS if m.summary):
            values, _ = seed_values(runs, metric, from_epoch if metric.from_epoch else 0, None, ref)
            estimate = stats.mean_ci(values.values())
            row[f"{metric.name}_mean"], row[f"{metric.name}_std"] = estimate.mean, estimate.sd
            if metric.ci:
                row[f"{metric.name}_ci_low"], row[f"{metric.name}_ci_high"] = estimate.low, estimate.high
            if metric.reduce in REACH:
                row[f"{metric.name}_n"] = estimate.n  # seeds that reached the target
        rows.append(row)
    return pd.DataFrame(rows)


def differences_table(groups: Dict[str, List[Run]], from_epoch: int, ref: Optional[Reference]) -> pd.DataFrame:
    """a - b for every pair of settings and every summary metric with a CI; paired by seed where possible."""
    rows, labels = [], list(groups)
    for metric in (m for m in METRICS if m.summary and m.ci):
        first = from_epoch if metric.from_epoch else 0
        values = {label: seed_values(groups[label], metric, first, None, ref)[0] for label in labels}
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                diff = stats.difference(values[a], values[b])
                if not math.isnan(diff.mean):
                    rows.append({"metric": metric.name, "a": a, "b": b, **vars(diff)})
    return pd.DataFrame(rows, columns=["metric", "a", "b", "mean", "low", "high", "n", "sd", "paired",
                                       "a_greater", "b_greater"])


def per_epoch_table(groups: Dict[str, List[Run]]) -> pd.DataFrame:
    """setting, column, epoch, mean, low, high, n: the curves of every plotted metric."""
    frames = []
    for column in dict.fromkeys(m.column for m in METRICS if m.plot):
        for label, runs in groups.items():
            table = epoch_stats(runs, column)
            if not table.empty:
                frames.append(table.rename_axis("epoch").reset_index().assign(setting=label, column=column))
    if not frames:
        return pd.DataFrame(columns=["setting", "column", "epoch", "mean", "low", "high", "n"])
    return pd.concat(frames)[["setting", "column", "epoch", "mean", "low", "high", "n"]]


# ----------------------------------------------------------------------------------------------------------------
# markdown


def number(value: float, metric: Metric) -> str:
    return "n/a" if pd.isna(value) else f"{value * metric.scale:.{metric.digits}f}"


def header(metric: Metric, from_epoch: int) -> str:
    return metric.label.format(from_epoch=from_epoch, target="ref. AP")


def value_cell(row: dict, metric: Metric, n_seeds: int) -> str:
    text = number(row[f"{metric.name}_mean"], metric)
    if metric.reduce in REACH and row[f"{metric.name}_n"] < n_seeds:
        return f"{text} ({row[f'{metric.name}_n']} of {n_seeds} seeds reached it)"
    sd = row[f"{metric.name}_std"]
    return text if not metric.ci or pd.isna(sd) or pd.isna(row[f"{metric.name}_mean"]) else \
        f"{text} ± {number(sd, metric)}"


def interval(low: float, high: float, metric: Metric) -> str:
    return "n/a" if pd.isna(low) else f"[{number(low, metric)}, {number(high, metric)}]"


def markdown_table(header_cells: List[str], rows: List[list]) -> str:
    lines = ["| " + " | ".join(header_cells) + " |", "|" + "---|" * len(header_cells)]
    lines += ["| " + " | ".join(map(str, cells)) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def summary_markdown(summary: pd.DataFrame, diffs: pd.DataFrame, from_epoch: int,
                     ref: Optional[Reference]) -> str:
    shown = [m for m in METRICS if m.summary]
    cells = ["setting", "seeds", "failed", "epochs"]
    for metric in shown:
        cells += [header(metric, from_epoch)] + (["95 % CI"] if metric.ci else [])
    rows = []
    for row in summary.to_dict("records"):
        line = [row["setting"], row["n_seeds"], row["n_failed"], row["epochs"]]
        for metric in shown:
            line.append(value_cell(row, metric, row["n_seeds"]))
            if metric.ci:
                line.append(interval(row[f"{metric.name}_ci_low"], row[f"{metric.name}_ci_high"], metric))
        rows.append(line)
    notes = ["Values are means over seeds ± the sample sd; 95 % CI: Student t over seeds (n - 1 degrees of "
             "freedom), n/a with one seed. Runs that repeat a seed are averaged into one value first."]
    notes += [f"`{row['setting']}` repeats seeds ({row['repeated_seeds']}; seed x runs): those runs are not "
              f"independent and count once." for row in summary.to_dict("records") if row["repeated_seeds"]]
    if ref:
        notes.append(f"ref. AP = {ref.fraction:g} x the final AP of `{ref.label}` (mean over seeds) = "
                     f"{100 * ref.target:.2f} %; epochs to reach it count the epochs trained when the AP first "
                     f"reached it, averaged over the seeds that reached it. Mean AP over epochs: the area under the "
                     f"AP curve (trapezoid) divided by the epoch span.")
    text = "# Summary\n\n" + markdown_table(cells, rows) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if not diffs.empty:
        text += "\n## Differences between settings (a - b)\n\n" + differences_markdown(diffs)
    return text


def effect_cells(diff: dict, metric: Metric, against: str = "") -> List[str]:
    """The effect, its 95 % CI and how it was computed: the cells claims.md and summary.md share. ``against``:
    the constant a one-setting effect is measured from ("" for a difference of two settings)."""
    sign = "+" if diff["mean"] > 0 else ""
    if against:
        seeds = f"{diff['n']} seeds; above {against} in {diff['a_greater']}, below in {diff['b_greater']}"
    elif diff["paired"]:
        seeds = f"{diff['n']} paired; a > b in {diff['a_greater']}, a < b in {diff['b_greater']}"
    else:
        seeds = f"unpaired (Welch), n >= {diff['n']} per side"
    return [f"{sign}{number(diff['mean'], metric)}", interval(diff["low"], diff["high"], metric), seeds]


def differences_markdown(diffs: pd.DataFrame) -> str:
    rows = [[BY_NAME[d["metric"]].name, d["a"], d["b"], *effect_cells(d, BY_NAME[d["metric"]])]
            for d in diffs.to_dict("records")]
    return markdown_table(["metric", "a", "b", "a - b", "95 % CI", "seeds"], rows) + \
        "\nPaired by seed (runs of both settings with the same seed) where at least 2 seeds are shared.\n"
