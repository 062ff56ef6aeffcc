"""Matching-instability study report: IS and AP curves per swept setting, averaged over seeds, plus a summary table
and the list of runs that failed.

    python analysis/instability.py <run or multirun dirs...> [--out DIR] [--from-epoch N]

A run dir holds metrics.jsonl and/or .hydra/; a Hydra multirun dir holds numbered job folders (and multirun.yaml).
Runs are grouped by the overrides that vary across runs (seed keys excluded, `model` always kept); completed runs of
a group are averaged per epoch. Failed runs are reported in failures.md and on stdout, and left out of the averages.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from dndetr.instability import instability_series, list_epochs  # noqa: E402

SEED_KEYS = {"seed", "trainer.seed"}
ALWAYS_KEYS = ("model",)  # a setting key even when every run uses the same model


@dataclass
class Run:
    path: Path
    overrides: Dict[str, str] = field(default_factory=dict)
    choices: Dict[str, str] = field(default_factory=dict)  # Hydra config-group choices (.hydra/hydra.yaml)
    config: dict = field(default_factory=dict)
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per epoch, ascending
    problems: List[str] = field(default_factory=list)
    failed: bool = False

    def fail(self, problem: str) -> None:
        self.problems.append(problem)
        self.failed = True

    def setting_value(self, key: str) -> str:
        if key in self.overrides:
            return self.overrides[key]
        if key in self.choices:
            return str(self.choices[key])
        value = config_value(self.config, key)
        return "-" if value is None or isinstance(value, dict) else str(value)


def config_value(config: dict, dotted_key: str):
    for part in dotted_key.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


# ----------------------------------------------------------------------------------------------------------------
# discovery and reading


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / ".hydra").is_dir()


def job_folders(path: Path) -> List[Path]:
    return sorted((c for c in path.iterdir() if c.is_dir() and c.name.isdigit()), key=lambda c: int(c.name))


def discover(path: Path) -> Tuple[List[Path], List[Path]]:
    """(run dirs, multirun dirs) under path. Every numbered job folder of a multirun is a run, even an empty one."""
    if is_run_dir(path):
        return [path], []
    jobs = job_folders(path)
    if jobs or (path / "multirun.yaml").is_file():
        return jobs, [path]
    runs, sweeps = [], []
    for child in sorted(c for c in path.iterdir() if c.is_dir() and not c.name.startswith(".")):
        child_runs, child_sweeps = discover(child)
        runs += child_runs
        sweeps += child_sweeps
    return runs, sweeps


def read_yaml(path: Path, run: Run):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        run.problems.append(f"{path.name} unreadable: {str(err).splitlines()[0]}")
        return None


def read_metrics(path: Path, run: Run) -> pd.DataFrame:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            run.problems.append(f"metrics.jsonl line {number} is not JSON (interrupted write?); skipped")
    frame = pd.DataFrame(rows)
    if frame.empty or "epoch" not in frame:
        return pd.DataFrame()
    # a resumed run may log an epoch twice: the later line is the one that finished
    return frame.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)


def add_matching_instability(run: Run) -> None:
    """Fill IS columns from matchings/ when metrics.jsonl has none (e.g. logs of an older engine)."""
    if "IS" in run.metrics or not list_epochs(run.path):
        return
    try:
        series = pd.DataFrame(instability_series(run.path))
    except (OSError, ValueError) as err:
        run.problems.append(f"matchings unreadable: {err}")
        return
    if not series.empty:
        run.metrics = run.metrics.merge(series, on="epoch", how="left")


def check_matchings(run: Run) -> None:
    """Report epochs without a matching record: any gap longer than instability.every between records."""
    enabled = config_value(run.config, "instability.enabled")
    recorded = list_epochs(run.path)
    if enabled is False or (enabled is None and not recorded) or run.metrics.empty:
        return
    if not recorded:
        run.problems.append("no matchings recorded (instability.enabled=true)")
        return
    every = config_value(run.config, "instability.every")
    every = every if isinstance(every, int) and every >= 1 else 1
    bounds = [-1] + recorded + [int(run.metrics["epoch"].max()) + 1]
    for before, after in zip(bounds, bounds[1:]):
        if after - before > every:
            run.problems.append(f"no matchings recorded for epochs {before + 1}..{after - 1}")


def read_run(path: Path, epochs: Optional[int] = None) -> Run:
    """One run folder. With ``epochs``, only its first ``epochs`` epochs count and that is the planned length."""
    run = Run(path=path)
    hydra_dir = path / ".hydra"
    if (hydra_dir / "overrides.yaml").is_file():
        for item in read_yaml(hydra_dir / "overrides.yaml", run) or []:
            key, _, value = str(item).partition("=")
            run.overrides[key.lstrip("+~")] = value
    if (hydra_dir / "config.yaml").is_file():
        run.config = read_yaml(hydra_dir / "config.yaml", run) or {}
    if (hydra_dir / "hydra.yaml").is_file():
        run.choices = config_value(read_yaml(hydra_dir / "hydra.yaml", run) or {}, "hydra.runtime.choices") or {}
    if (path / "error.txt").is_file():  # train.py's one-line report of a job that stopped on an error
        run.fail((path / "error.txt").read_text().strip() or "error.txt is empty")
    if not (path / "metrics.jsonl").is_file():
        if not run.failed:
            run.fail("no metrics.jsonl (crashed before its first epoch ended, or never started)")
        return run
    run.metrics = read_metrics(path / "metrics.jsonl", run)
    if epochs is not None and not run.metrics.empty:
        run.metrics = run.metrics[run.metrics["epoch"] < epochs].reset_index(drop=True)
    if run.metrics.empty:
        run.fail("metrics.jsonl holds no epoch")
        return run
    done, planned = int(run.metrics["epoch"].max()) + 1, epochs or config_value(run.config, "trainer.epochs")
    if isinstance(planned, int) and done < planned:
        run.fail(f"stopped after {done} of {planned} epochs (crashed, or still running)")
    add_matching_instability(run)
    check_matchings(run)
    return run


def job_output_dir(job_return) -> Optional[Path]:
    """The run dir of a Hydra JobReturn (its working_dir is the launch dir unless hydra.job.chdir=true)."""
    try:
        output_dir = OmegaConf.select(job_return.hydra_cfg, "hydra.runtime.output_dir")
    except Exception:  # no or partial hydra_cfg
        output_dir = None
    output_dir = output_dir or getattr(job_return, "working_dir", None)
    return Path(output_dir) if output_dir else None


def submitit_failures(sweep: Path) -> List[Tuple[Optional[Path], str]]:
    """(job folder if known, message) for every submitit job of the sweep that raised or left no result."""
    failures = []
    for err_log in sorted((sweep / ".submitit").glob("*/*_log.err")):
        result = err_log.with_name(err_log.name.replace("_log.err", "_result.pkl"))
        job = err_log.name.replace("_log.err", "")
        if not result.is_file():
            failures.append((None, f"submitit job {job} left no result (killed, timed out, or still running); "
                                   f"see {err_log}"))
            continue
        try:
            with open(result, "rb") as f:
                status, payload = pickle.load(f)
        except Exception as err:  # a result written by another environment may not unpickle here
            failures.append((None, f"submitit job {job}: result unreadable ({type(err).__name__}); see {err_log}"))
            continue
        if status == "error":
            last_line = [line for line in str(payload).splitlines() if line.strip()][-1:] or ["?"]
            failures.append((None, f"submitit job {job} raised: {last_line[0]}"))
        elif getattr(getattr(payload, "status", None), "name", "") == "FAILED":  # Hydra caught the task's error
            error = getattr(payload, "_return_value", None)
            failures.append((job_output_dir(payload), f"submitit job {job} failed: {type(error).__name__}: {error}"))
    return failures


# ----------------------------------------------------------------------------------------------------------------
# grouping and statistics


def setting_keys(runs: List[Run]) -> List[str]:
    keys = sorted({k for run in runs for k in run.overrides} - SEED_KEYS)
    varying = [k for k in keys if len({run.setting_value(k) for run in runs}) > 1]
    return [k for k in ALWAYS_KEYS if k in keys and k not in varying] + varying


def group_runs(runs: List[Run], keys: List[str]) -> Dict[str, List[Run]]:
    groups: Dict[str, List[Run]] = {}
    for run in runs:
        label = ", ".join(f"{k}={run.setting_value(k)}" for k in keys) or "all runs"
        groups.setdefault(label, []).append(run)
    return groups


def per_epoch(runs: List[Run], column: str) -> pd.DataFrame:
    """Mean, std, min, max and count over runs of `column`, indexed by epoch (epochs without any value dropped)."""
    columns = {i: run.metrics.set_index("epoch")[column] for i, run in enumerate(runs) if column in run.metrics}
    if not columns:
        return pd.DataFrame(columns=["mean", "std", "min", "max", "n"])
    table = pd.concat(columns, axis=1)
    stats = pd.DataFrame({"mean": table.mean(axis=1), "std": table.std(axis=1), "min": table.min(axis=1),
                          "max": table.max(axis=1), "n": table.count(axis=1)})
    return stats[stats["n"] > 0]


def run_summary(run: Run, from_epoch: int) -> Dict[str, float]:
    metrics = run.metrics
    ap = metrics["AP"].dropna() if "AP" in metrics else pd.Series(dtype=float)
    late = metrics[metrics["epoch"] >= from_epoch]

    def mean_of(frame: pd.DataFrame, column: str) -> float:
        return float(frame[column].mean()) if column in frame else float("nan")

    return {"final_AP": float(ap.iloc[-1]) if len(ap) else float("nan"), "best_AP": float(ap.max()),
            "IS": mean_of(late, "IS"), "IS_norm": mean_of(late, "IS_norm"),
            "epoch_time": mean_of(metrics, "epoch_time")}


def summary_table(groups: Dict[str, List[Run]], keys: List[str], from_epoch: int) -> pd.DataFrame:
    rows = []
    for label, runs in groups.items():
        complete = [run for run in runs if not run.failed]
        per_run = pd.DataFrame([run_summary(run, from_epoch) for run in complete],
                               columns=["final_AP", "best_AP", "IS", "IS_norm", "epoch_time"])
        row = {"setting": label, **{k: runs[0].setting_value(k) for k in keys},
               "n_seeds": len(complete), "n_failed": len(runs) - len(complete),
               "epochs": int(max(run.metrics["epoch"].max() + 1 for run in complete)) if complete else 0}
        for column in per_run:
            row[f"{column}_mean"] = per_run[column].mean()
            row[f"{column}_std"] = per_run[column].std()  # sample std over seeds; NaN with one seed
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# output


def plot_curves(curves: Dict[str, Tuple[np.ndarray, pd.DataFrame]], xlabel: str, ylabel: str, title: str,
                out: Path, name: str) -> List[Path]:
    """One line (mean over seeds) and one min..max band per setting; saved as PNG and PDF."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (x, stats) in curves.items():
        (line,) = ax.plot(x, stats["mean"], marker="o", markersize=3, label=label)
        ax.fill_between(x, stats["min"], stats["max"], color=line.get_color(), alpha=0.2, linewidth=0)
    if xlabel == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="mean over seeds, band = min..max", fontsize="small", title_fontsize="small")
    fig.tight_layout()
    paths = [out / f"{name}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def make_plots(groups: Dict[str, List[Run]], out: Path) -> Tuple[List[Path], List[str]]:
    written, skipped = [], []
    by_epoch = {  # name: (column, scale, y label, title)
        "instability": ("IS", 1, "IS (queries changing their match per image)",
                        "Which setting matches its queries most stably between epochs?"),
        "instability_norm": ("IS_norm", 1, "IS / (2 x mean objects per image)",
                             "What fraction of the maximum possible instability does each setting show?"),
        "ap_vs_epoch": ("AP", 100, "AP (%)", "Which setting converges fastest per epoch?"),
    }
    for name, (column, scale, ylabel, title) in by_epoch.items():
        curves = {}
        for label, runs in groups.items():
            stats = per_epoch([r for r in runs if not r.failed], column) * scale
            if not stats.empty:
                curves[label] = (stats.index.to_numpy(), stats)
        if curves:
            written += plot_curves(curves, "epoch", ylabel, title, out, name)
        else:
            skipped.append(f"{name}: no run has {column}")
    curves = {}
    for label, runs in groups.items():
        complete = [r for r in runs if not r.failed]
        ap, wall = per_epoch(complete, "AP") * 100, per_epoch(complete, "wall_time")
        epochs = ap.index.intersection(wall.index)
        if len(epochs):
            curves[label] = (wall.loc[epochs, "mean"].to_numpy(), ap.loc[epochs])
    if curves:
        longest = max(x.max() for x, _ in curves.values())
        unit, seconds = ("hours", 3600) if longest > 7200 else ("minutes", 60)
        curves = {label: (x / seconds, stats) for label, (x, stats) in curves.items()}
        written += plot_curves(curves, f"wall time ({unit}, mean over seeds)", "AP (%)",
                               "Which setting reaches a given AP soonest in wall-clock time?", out, "ap_vs_time")
    else:
        skipped.append("ap_vs_time: no run has both AP and wall_time")
    return written, skipped


def fmt(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    if pd.isna(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text if pd.isna(std) else f"{text} ± {std * scale:.{digits}f}"


def markdown_table(summary: pd.DataFrame, from_epoch: int) -> str:
    header = ["setting", "seeds", "failed", "epochs", "final AP (%)", "best AP (%)", f"IS (epochs >= {from_epoch})",
              "IS_norm", "s / epoch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.to_dict("records"):
        cells = [row["setting"], row["n_seeds"], row["n_failed"], row["epochs"],
                 fmt(row["final_AP_mean"], row["final_AP_std"], 100, 1),
                 fmt(row["best_AP_mean"], row["best_AP_std"], 100, 1),
                 fmt(row["IS_mean"], row["IS_std"]), fmt(row["IS_norm_mean"], row["IS_norm_std"], digits=3),
                 fmt(row["epoch_time_mean"], float("nan"), digits=1)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run dirs, Hydra multirun dirs, or folders holding them")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default: <first path>/instability_report)")
    parser.add_argument("--from-epoch", type=int, default=1, help="average IS over epochs >= this one (default 1)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="compare the first N epochs of every run (runs with fewer count as incomplete); "
                             "default: each run's trainer.epochs")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    out = args.out or args.paths[0] / "instability_report"
    failures: List[str] = []
    run_dirs, sweeps = [], []
    for path in args.paths:
        if not path.is_dir():
            failures.append(f"- `{path}`: not a directory")
            continue
        found_runs, found_sweeps = discover(path)
        if not found_runs:
            failures.append(f"- `{path}`: no run found (no metrics.jsonl, .hydra/ or numbered job folders)")
        run_dirs += found_runs
        sweeps += found_sweeps
    runs = {p.resolve(): read_run(p, args.epochs) for p in dict.fromkeys(p.resolve() for p in run_dirs)}
    for sweep in sweeps:
        for job_dir, message in submitit_failures(sweep):
            run = runs.get(job_dir.resolve()) if job_dir else None
            if run is None:
                failures.append(f"- `{sweep}`: {message}")
            else:
                run.fail(message)
    failures += [f"- `{run.path}`: {problem}" for run in runs.values() for problem in run.problems]

    out.mkdir(parents=True, exist_ok=True)
    (out / "failures.md").write_text("# Failed or incomplete runs\n\n" + ("\n".join(failures) or "None.") + "\n")
    readable = [run for run in runs.values() if not run.metrics.empty]
    if failures:
        print(f"{len(failures)} problem(s):\n" + "\n".join(failures))
    if not readable:
        print(f"error: no run with metrics found under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 1

    keys = setting_keys(list(runs.values()))
    groups = group_runs(list(runs.values()), keys)
    summary = summary_table(groups, keys, args.from_epoch)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(markdown_table(summary, args.from_epoch))
    written, skipped = make_plots(groups, out)
    for note in skipped:
        print(f"skipped plot {note}")
    print(f"{len(runs)} run(s) in {len(groups)} setting(s); report in {out}:")
    for path in [out / "summary.csv", out / "summary.md", out / "failures.md"] + written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
