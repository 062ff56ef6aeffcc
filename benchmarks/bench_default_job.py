"""Seconds per training epoch of the default job (`python train.py`), before and after: an earlier commit against
this checkout, in each precision, as real `train.py` processes.

Each round runs every variant once (``trainer.epochs`` short runs, in their own temporary run folders), so that
outside load hits all of them; the result per variant is the mean ``train_time`` of ``metrics.jsonl`` (the
training iterations of an epoch, data loading included, evaluation excluded) over all epochs of all rounds, the
mean wait for the training loader's batches (``data_time``, measured the same way for every commit by
``loader_wait.py``; ``recorded_data_time`` is the job's own figure where the commit records one) and the step time
left without it (``step_mean``), the figure the speed target is about.
``--before`` checks the given commit out into a temporary git worktree and runs it with its own default precision
(fp32 for commits older than issue 12's ``trainer.precision``).

    python benchmarks/bench_default_job.py --before ca71d6d --precision fp32,bf16 --rounds 2 --json job.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, parse_names, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def epoch_times(checkout: Path, run_dir: Path, overrides: list) -> list:
    """(train_time, data_time, recorded data_time or None) for each epoch of one run of the checkout's train.py."""
    waits_path = run_dir.with_suffix(".waits.json")
    command = [sys.executable, str(REPO / "benchmarks" / "loader_wait.py"), str(waits_path),
               str(checkout / "train.py"), f"hydra.run.dir={run_dir}", "trainer.progress=false", *overrides]
    env = dict(os.environ, PYTHONPATH=str(checkout))  # the checkout's own dndetr, not the installed one
    result = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed: {(result.stderr or result.stdout).strip()[-500:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    waits = json.loads(waits_path.read_text())
    if len(waits) != len(rows):
        raise SystemExit(f"error: {checkout}: {len(waits)} passes over the training loader for {len(rows)} epochs")
    return [(row["train_time"], wait, row.get("data_time")) for row, wait in zip(rows, waits)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, help="a commit to compare with (its default precision), e.g. ca71d6d")
    parser.add_argument("--precision", default="fp32,bf16", help="precisions of this checkout, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="more overrides for every run, e.g. trainer.threads=1")
    args = parser.parse_args()
    if args.rounds < 1 or args.epochs < 1:
        parser.error("--rounds and --epochs must be >= 1")
    try:
        precisions = parse_names(args.precision, ("fp32", "bf16", "auto"), "--precision")
    except ValueError as err:
        parser.error(str(err))
    with tempfile.TemporaryDirectory(prefix="bench_default_job_") as tmp:
        tmp = Path(tmp)
        variants = {f"now {p}": (REPO, [f"trainer.precision={p}"]) for p in precisions}
        if args.before:
            worktree = tmp / "before"
            added = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.before],
                                   capture_output=True, text=True)
            if added.returncode != 0:
                parser.error(f"--before {args.before}: {added.stderr.strip().splitlines()[-1]}")
            variants = {f"before {args.before}": (worktree, []), **variants}
        times = {name: [] for name in variants}
        try:
            for round_index in range(args.rounds):
                for name, (checkout, overrides) in variants.items():
                    run_dir = tmp / f"{name.replace(' ', '_')}_{round_index}"
                    times[name] += epoch_times(checkout, run_dir,
                                               [f"trainer.epochs={args.epochs}", *args.overrides, *overrides])
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "before")],
                               capture_output=True)
    results = {}
    for name, epochs in times.items():
        train, data = [t for t, _, _ in epochs], [d for _, d, _ in epochs]
        recorded = [r for _, _, r in epochs] if all(r is not None for _, _, r in epochs) else None
        mean = statistics.mean(train)
        results[name] = {"train_time": train, "mean": mean, "data_time": data, "recorded_data_time": recorded,
                         "step_mean": mean - statistics.mean(data)}
    first = next(iter(results.values()))
    print(f"default job, {args.rounds} rounds x {args.epochs} epochs; seconds per epoch (mean, range): training, the "
          f"first variant's training time over each, waiting for data, training without it (the steps) and the "
          f"first variant's steps over each:")
    for name, row in results.items():
        row["speedup_vs_first"] = first["mean"] / row["mean"]
        row["step_speedup_vs_first"] = first["step_mean"] / row["step_mean"]
        print(f"  {name:28s} {row['mean']:6.2f} s  ({min(row['train_time']):.2f}-{max(row['train_time']):.2f})   "
              f"{row['speedup_vs_first']:.2f}x   data {statistics.mean(row['data_time']):.2f} s   "
              f"steps {row['step_mean']:.2f} s   {row['step_speedup_vs_first']:.2f}x")
    if args.json:
        write_json(args.json, {"environment": environment(0, "cpu"), "args": vars(args), "command": " ".join(sys.argv),
                               "variants": results})


if __name__ == "__main__":
    main()
