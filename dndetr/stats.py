"""Statistics over seeds: means with Student-t 95 % confidence intervals, paired differences between settings,
verdicts on a claimed direction, and the convergence measures (epochs to reach an AP, area under the AP curve).

Seeds are the unit of replication. Values are given as {seed: value}; runs that repeat a seed are averaged into one
value first (``seed_means``), because two runs of one seed are not independent samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95
SUPPORTED, CONTRADICTED, UNDECIDED = "supported", "contradicted", "undecided"


@dataclass
class Estimate:
    """A mean over n seeds with its confidence interval (low, high); low/high are NaN with fewer than 2 seeds."""

    mean: float
    low: float
    high: float
    n: int
    sd: float = float("nan")  # sample standard deviation (ddof=1)


@dataclass
class Difference(Estimate):
    """mean(a - b). Paired: over seeds both settings have, with the count of seeds where a > b and where a < b.
    Unpaired (Welch): when fewer than 2 seeds are shared; n is then the smaller group's size."""

    paired: bool = True
    a_greater: int = 0
    b_greater: int = 0


def seed_means(values: Iterable[Tuple[str, float]]) -> Tuple[Dict[str, float], Dict[str, int]]:
    """({seed: mean of its runs' values}, {seed: number of runs} for seeds run more than once). NaN values of a
    repeated seed are ignored unless all are NaN."""
    by_seed: Dict[str, List[float]] = {}
    for seed, value in values:
        by_seed.setdefault(seed, []).append(value)
    means = {seed: nanmean(v) for seed, v in by_seed.items()}
    return means, {seed: len(v) for seed, v in by_seed.items() if len(v) > 1}


def nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def t_interval(mean: float, standard_error: float, df: float, level: float = LEVEL) -> Tuple[float, float]:
    if not df > 0 or math.isnan(standard_error):
        return float("nan"), float("nan")
    half = scipy_stats.t.ppf(0.5 + level / 2, df) * standard_error
    return mean - half, mean + half


def mean_ci(values: Iterable[float], level: float = LEVEL) -> Estimate:
    """Mean and Student-t interval of the non-NaN values (one value per seed)."""
    x = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(x.mean())
    if len(x) < 2:
        return Estimate(mean, float("nan"), float("nan"), 1)
    sd = float(x.std(ddof=1))
    low, high = t_interval(mean, sd / math.sqrt(len(x)), len(x) - 1, level)
    return Estimate(mean, low, high, len(x), sd)


def paired_difference(a: Dict[str, float], b: Dict[str, float], level: float = LEVEL) -> Difference:
    """a - b over the seeds both have (a NaN on either side drops that seed)."""
    shared = [s for s in a if s in b and not math.isnan(a[s]) and not math.isnan(b[s])]
    diffs = [a[s] - b[s] for s in shared]
    est = mean_ci(diffs, level)
    return Difference(est.mean, est.low, est.high, est.n, est.sd, paired=True,
                      a_greater=sum(d > 0 for d in diffs), b_greater=sum(d < 0 for d in diffs))


def welch_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Difference:
    """mean(a) - mean(b) for independent samples, with the Welch-Satterthwaite degrees of freedom."""
    ea, eb = mean_ci(a, level), mean_ci(b, level)
    mean = ea.mean - eb.mean
    n = min(ea.n, eb.n)
    if n < 2:
        return Difference(mean, float("nan"), float("nan"), n, paired=False)
    va, vb = ea.sd ** 2 / ea.n, eb.sd ** 2 / eb.n
    if va + vb == 0:
        return Difference(mean, mean, mean, n, 0.0, paired=False)
    df = (va + vb) ** 2 / (va ** 2 / (ea.n - 1) + vb ** 2 / (eb.n - 1))
    low, high = t_interval(mean, math.sqrt(va + vb), df, level)
    return Difference(mean, low, high, n, paired=False)


def difference(a: Dict[str, float], b: Dict[str, float], level: float = LEVEL) -> Difference:
    """Paired by seed when the settings share at least 2 seeds with values, else unpaired (Welch)."""
    paired = paired_difference(a, b, level)
    if paired.n >= 2:
        return paired
    return welch_difference(list(a.values()), list(b.values()), level)


def verdict(low: float, high: float, n: int, direction: str, min_seeds: int = 2) -> str:
    """supported: the interval excludes 0 on the claimed side ("greater": low > 0, "less": high < 0);
    contradicted: it excludes 0 on the other side; undecided: it contains 0, or fewer than min_seeds seeds."""
    if n < min_seeds or math.isnan(low) or math.isnan(high):
        return UNDECIDED
    above, below = low > 0, high < 0
    if (direction == "greater" and above) or (direction == "less" and below):
        return SUPPORTED
    if above or below:
        return CONTRADICTED
    return UNDECIDED


# ----------------------------------------------------------------------------------------------------------------
# convergence of one run's AP curve


def curve_area(epochs: Sequence[float], values: Sequence[float]) -> float:
    """Area under the curve (trapezoid over epochs) divided by the epoch span: the curve's mean height, so that
    runs of different lengths compare. One point: its value."""
    epochs, values = np.asarray(epochs, dtype=float), np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan")
    if len(values) == 1 or epochs[-1] == epochs[0]:
        return float(values[-1])
    return float(np.trapezoid(values, epochs) / (epochs[-1] - epochs[0]))


def first_reach(epochs: Sequence[int], values: Sequence[float], target: float) -> Optional[int]:
    """The first epoch whose value is >= target; None when the curve never reaches it (or target is NaN)."""
    for epoch, value in zip(epochs, values):
        if value >= target:
            return int(epoch)
    return None
