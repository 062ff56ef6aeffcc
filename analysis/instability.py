"""Matching-instability study report: IS and AP curves per swept setting with 95 % confidence intervals over seeds,
a summary table with paired differences and convergence speed, the runs that failed, and optionally the verdicts
on a study's claims.

    python analysis/instability.py <run or multirun dirs...> [--out DIR] [--from-epoch N] [--epochs N]
        [--reference SETTING] [--reach FRACTION] [--claims FILE]

A run dir holds metrics.jsonl and/or .hydra/; a Hydra multirun dir holds numbered job folders (and multirun.yaml,
.submitit/). Runs are grouped by the overrides that vary across runs (seed keys excluded, `model` always kept).
Failed runs are reported in failures.md and on stdout, and left out of the statistics. Nothing read is executed
(no pickle). The library is dndetr/runs.py, report.py, stats.py, plots.py and claims.py; docs/instability.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

# The library of this checkout, also when another checkout of the project is the one installed in the environment.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dndetr import claims as study_claims  # noqa: E402
from dndetr import report  # noqa: E402
from dndetr.plots import make_plots  # noqa: E402
from dndetr.runs import group_runs, read_runs, setting_keys  # noqa: E402


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run dirs, Hydra multirun dirs, or folders holding them")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default: <first path>/instability_report)")
    parser.add_argument("--from-epoch", type=int, default=1, help="average IS over epochs >= this one (default 1)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="compare the first N epochs of every run (runs with fewer count as incomplete); "
                             "default: each run's trainer.epochs")
    parser.add_argument("--reference", default=None,
                        help="setting whose final AP is the convergence target: its label or key=value pairs "
                             "(default: the first setting)")
    parser.add_argument("--reach", type=float, default=1.0,
                        help="convergence target as a fraction of the reference's final AP (default 1.0)")
    parser.add_argument("--claims", type=Path, default=None, help="a study's claims file: writes claims.md")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.out is None and not args.paths[0].is_dir():  # do not create a mistyped path to put the report in
        print(f"error: {args.paths[0]}: not a directory", file=sys.stderr)
        return 2
    out = args.out or args.paths[0] / "instability_report"
    try:  # a mistake in the claims file stops the analysis before anything is written
        claims, figures = study_claims.load_study(args.claims) if args.claims else ([], [])
    except study_claims.ClaimsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.reach > 0:
        print(f"error: --reach={args.reach} must be > 0", file=sys.stderr)
        return 2
    runs, problems = read_runs(args.paths, args.epochs)
    failures = [f"- {p}" for p in problems] + [f"- `{run.path}`: {p}" for run in runs for p in run.problems]
    out.mkdir(parents=True, exist_ok=True)
    (out / "failures.md").write_text("# Failed or incomplete runs\n\n" + ("\n".join(failures) or "None.") + "\n")
    if failures:
        print(f"{len(failures)} problem(s):\n" + "\n".join(failures))
    if not any(not run.metrics.empty for run in runs):
        print(f"error: no run with metrics found under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 1

    keys = setting_keys(runs)
    groups = group_runs(runs, keys)
    try:
        ref_label = next(iter(groups))
        if args.reference:
            ref_label = report.match_setting(groups, args.reference, "--reference")
        if ref_label is None:
            raise ValueError(f"--reference={args.reference}: no setting matches (settings: {'; '.join(groups)})")
        ref = report.reference(groups, ref_label, args.reach)
        outcomes = study_claims.evaluate_all(claims, groups, args.claims)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = report.summary_table(groups, keys, args.from_epoch, ref)
    diffs = report.differences_table(groups, args.from_epoch, ref)
    summary.to_csv(out / "summary.csv", index=False)
    diffs.to_csv(out / "differences.csv", index=False)
    report.per_epoch_table(groups).to_csv(out / "per_epoch.csv", index=False)
    (out / "summary.md").write_text(report.summary_markdown(summary, diffs, args.from_epoch, ref))
    written = [out / name for name in ("summary.csv", "summary.md", "differences.csv", "per_epoch.csv",
                                       "failures.md")]
    if claims:
        (out / "claims.md").write_text(study_claims.claims_markdown(outcomes, args.claims))
        study_claims.claims_frame(outcomes).to_csv(out / "claims.csv", index=False)
        written += [out / "claims.md", out / "claims.csv"]
        for i, outcome in enumerate(outcomes, 1):
            print(f"claim {i}: {outcome.verdict}: {outcome.claim.text}")
    plots, skipped = make_plots(groups, out, figures)
    for note in skipped:
        print(f"skipped plot {note}")
    print(f"{len(runs)} run(s) in {len(groups)} setting(s); report in {out}:")
    for path in written + plots:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
