"""Finding and reading training runs: Hydra run folders, Hydra multirun folders and their submitit records.

Reading never executes anything found on disk: YAML is read with ``yaml.safe_load``, ``metrics.jsonl`` as JSON, and
submitit's ``*_result.pkl`` files are never opened (unpickling a crafted file runs arbitrary code). A failed job is
recognised from text only: train.py's ``error.txt``, the traceback or SLURM message in submitit's ``*_log.err`` /
``*_log.out``, a missing result file, or metrics that stop short of the planned epochs.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pandas as pd
import yaml

from dndetr.instability import instability_series, list_epochs

METRICS_FILE = "metrics.jsonl"
SEED_KEYS = ("trainer.seed", "seed")
ALWAYS_KEYS = ("model",)  # a setting key even when every run uses the same model
LOG_TAIL = 256 * 1024  # bytes of a submitit log that are read: a traceback is at its end
TRACEBACK = "Traceback (most recent call last):"
SUBMITIT_SUCCESS = "Job completed successfully"  # what submitit logs when the job's function returned
SLURM_ERROR = re.compile(r"CANCELLED|DUE TO TIME LIMIT|oom[-_ ]kill|Out Of Memory|NODE FAIL", re.IGNORECASE)


@dataclass
class Run:
    path: Path
    overrides: Dict[str, str] = field(default_factory=dict)
    choices: Dict[str, str] = field(default_factory=dict)  # Hydra config-group choices (.hydra/hydra.yaml)
    config: dict = field(default_factory=dict)
    job_id: Optional[str] = None  # the submitit job of a submitit-launched run ("<job>_<task>")
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

    @property
    def seed(self) -> str:
        """The run's seed as text; a run whose seed is unknown counts as a seed of its own."""
        for key in SEED_KEYS:
            if key in self.overrides:
                return self.overrides[key]
        value = config_value(self.config, "trainer.seed")
        return str(value) if value is not None else f"unknown ({self.path.name})"


def config_value(config: dict, dotted_key: str):
    for part in dotted_key.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


# ----------------------------------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics_jsonl(path: Path) -> Tuple[List[dict], List[str]]:
    """(rows, problems): every line that is a JSON object with an integer ``epoch``; each other line is a problem
    (named by its line number) and skipped, so that one line cut short by a crash does not hide the rest."""
    rows, problems = [], []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{METRICS_FILE} line {number} is not JSON (interrupted write?); skipped")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            problems.append(f"{METRICS_FILE} line {number} has no integer 'epoch'; skipped")
            continue
        rows.append(row)
    return rows, problems


def metrics_frame(rows: List[dict]) -> pd.DataFrame:
    """One row per epoch, ascending; a resumed run may log an epoch twice, and the later line is the one that
    finished. null values become NaN."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame()
    return frame.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------------
# discovery


def is_run_dir(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or (path / ".hydra").is_dir()


def job_folders(path: Path) -> List[Path]:
    return sorted((c for c in path.iterdir() if c.is_dir() and c.name.isdigit()), key=lambda c: int(c.name))


def discover(path: Path) -> Tuple[List[Path], List[Path]]:
    """(run dirs, multirun dirs) under path. Every numbered job folder of a multirun is a run, even an empty one."""
    if is_run_dir(path):
        return [path], []
    jobs = job_folders(path)
    if jobs or (path / "multirun.yaml").is_file() or (path / ".submitit").is_dir():
        return jobs, [path]
    runs, sweeps = [], []
    for child in sorted(c for c in path.iterdir() if c.is_dir() and not c.name.startswith(".")):
        child_runs, child_sweeps = discover(child)
        runs += child_runs
        sweeps += child_sweeps
    return runs, sweeps


# ----------------------------------------------------------------------------------------------------------------
# one run


def read_yaml(path: Path, run: Run):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        run.problems.append(f"{path.name} unreadable: {str(err).splitlines()[0]}")
        return None


def read_hydra(run: Run) -> None:
    hydra_dir = run.path / ".hydra"
    if (hydra_dir / "overrides.yaml").is_file():
        overrides = read_yaml(hydra_dir / "overrides.yaml", run)
        for item in overrides if isinstance(overrides, list) else []:
            key, _, value = str(item).partition("=")
            run.overrides[key.lstrip("+~")] = value
    if (hydra_dir / "config.yaml").is_file():
        config = read_yaml(hydra_dir / "config.yaml", run)
        run.config = config if isinstance(config, dict) else {}
    if (hydra_dir / "hydra.yaml").is_file():
        hydra = read_yaml(hydra_dir / "hydra.yaml", run) or {}
        run.choices = config_value(hydra, "hydra.runtime.choices") or {}
        job_id = config_value(hydra, "hydra.job.id")
        run.job_id = str(job_id) if job_id not in (None, "???") else None


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
    read_hydra(run)
    if (path / "error.txt").is_file():  # train.py's one-line report of a job that stopped on an error
        run.fail((path / "error.txt").read_text(errors="replace").strip() or "error.txt is empty")
    if not (path / METRICS_FILE).is_file():
        if not run.failed:
            run.fail(f"no {METRICS_FILE} (crashed before its first epoch ended, or never started)")
        return run
    rows, problems = read_metrics_jsonl(path / METRICS_FILE)
    run.problems += problems
    run.metrics = metrics_frame(rows)
    if epochs is not None and not run.metrics.empty:
        run.metrics = run.metrics[run.metrics["epoch"] < epochs].reset_index(drop=True)
    if run.metrics.empty:
        run.fail(f"{METRICS_FILE} holds no epoch")
        return run
    done, planned = int(run.metrics["epoch"].max()) + 1, epochs or config_value(run.config, "trainer.epochs")
    if isinstance(planned, int) and done < planned:
        run.fail(f"stopped after {done} of {planned} epochs (crashed, or still running)")
    add_matching_instability(run)
    check_matchings(run)
    return run


# ----------------------------------------------------------------------------------------------------------------
# submitit records, read as text


def log_tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - LOG_TAIL))
        return f.read().decode(errors="replace")


def exception_line(text: str) -> Optional[str]:
    """The ``Type: message`` line of the last Python traceback in a log (the first unindented line after it)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(TRACEBACK)]
    if not starts:
        return None
    for line in lines[starts[-1] + 1:]:
        if line.strip() and not line[0].isspace():
            return line.strip()
    return "a traceback without its final line"


def submitit_failures(sweep: Path) -> List[Tuple[str, str]]:
    """(submitit job id, message) for every job in the sweep's .submitit/ whose log shows a Python traceback or a
    SLURM kill, or that left no result file. The result files are only checked for existence, never opened."""
    logs: Dict[str, List[Path]] = {}
    for log in sorted((sweep / ".submitit").glob("*/*_log.*")):
        if log.suffix in (".err", ".out"):
            logs.setdefault(log.name.rpartition("_log.")[0], []).append(log)
    failures = []
    for job, paths in logs.items():
        # only what follows the last success counts: a requeued job appends to its logs
        text = "\n".join(log_tail(p).rpartition(SUBMITIT_SUCCESS)[2] for p in paths)
        raised = exception_line(text)
        killed = next((line.strip() for line in text.splitlines() if SLURM_ERROR.search(line)), None)
        see = f"see {paths[0]}"
        if raised:
            failures.append((job, f"submitit job {job} failed: {raised}; {see}"))
        elif not (paths[0].parent / f"{job}_result.pkl").is_file():
            why = f": {killed}" if killed else " (killed, timed out, or still running)"
            failures.append((job, f"submitit job {job} left no result{why}; {see}"))
        elif killed:
            failures.append((job, f"submitit job {job}: {killed}; {see}"))
    return failures


# ----------------------------------------------------------------------------------------------------------------
# all runs under some folders, grouped into settings


def read_runs(paths: List[Path], epochs: Optional[int] = None) -> Tuple[List[Run], List[str]]:
    """Every run found under ``paths`` and the problems that belong to no readable run (one line each)."""
    problems: List[str] = []
    run_dirs, sweeps = [], []
    for path in paths:
        if not path.is_dir():
            problems.append(f"`{path}`: not a directory")
            continue
        found_runs, found_sweeps = discover(path)
        if not found_runs:
            problems.append(f"`{path}`: no run found (no {METRICS_FILE}, .hydra/ or numbered job folders)")
        run_dirs += found_runs
        sweeps += found_sweeps
    unique: Dict[Path, Path] = {}
    for run_dir in run_dirs:  # a run found twice is read once, under the name it was first found by
        unique.setdefault(run_dir.resolve(), run_dir)
    runs = [read_run(p, epochs) for p in unique.values()]
    by_job = {run.job_id: run for run in runs if run.job_id}
    for sweep in sweeps:
        for job, message in submitit_failures(sweep):
            if job in by_job:
                by_job[job].fail(message)
            else:
                problems.append(f"`{sweep}`: {message}")
    return runs, problems


def setting_keys(runs: List[Run]) -> List[str]:
    keys = sorted({k for run in runs for k in run.overrides} - set(SEED_KEYS))
    varying = [k for k in keys if len({run.setting_value(k) for run in runs}) > 1]
    return [k for k in ALWAYS_KEYS if k in keys and k not in varying] + varying


def group_runs(runs: List[Run], keys: List[str]) -> Dict[str, List[Run]]:
    """Runs by setting label, e.g. ``model=dab, dn.groups=5`` (the values of ``keys``)."""
    groups: Dict[str, List[Run]] = {}
    for run in runs:
        label = ", ".join(f"{k}={run.setting_value(k)}" for k in keys) or "all runs"
        groups.setdefault(label, []).append(run)
    return groups
