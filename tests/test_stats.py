"""Statistics over seeds (dndetr/stats.py) against hand computations, and the report's use of them."""
import math

import numpy as np
import pandas as pd
import pytest

from dndetr import stats
from dndetr.report import BY_NAME, Reference, reference, run_value, seed_values, summary_table
from dndetr.runs import Run

# Student t quantiles t(0.975, df) from a printed table: df=1: 12.706, df=2: 4.303, df=3: 3.182
T1, T2, T3 = 12.7062, 4.30265, 3.18245


def test_mean_ci_hand_computed():
    # values 1, 2, 3, 6: mean 3; squared deviations 4 + 1 + 0 + 9 = 14, sd = sqrt(14 / 3) = 2.1602,
    # standard error = sd / 2 = 1.0801, half width = 3.18245 x 1.0801 = 3.4374 -> [-0.4374, 6.4374]
    est = stats.mean_ci([1.0, 2.0, 3.0, 6.0])
    assert (est.mean, est.n) == (3.0, 4)
    assert est.sd == pytest.approx(math.sqrt(14 / 3))
    assert est.low == pytest.approx(3 - T3 * math.sqrt(14 / 3) / 2, abs=1e-4)
    assert est.high == pytest.approx(-0.4374 + 2 * 3.4374, abs=1e-3)
    one = stats.mean_ci([5.0, float("nan")])  # NaN is "no value"; one seed has no interval
    assert (one.mean, one.n) == (5.0, 1) and math.isnan(one.low) and math.isnan(one.high)
    assert stats.mean_ci([]).n == 0


def test_paired_difference_hand_computed():
    a = {"1": 5.0, "2": 7.0, "3": 6.0, "4": 9.0}  # seed 4 has no partner in b: left out
    b = {"1": 3.0, "2": 4.0, "3": 6.0, "5": 0.0}
    # differences 2, 3, 0: mean 5/3; deviations 1/3, 4/3, -5/3 -> sd = sqrt((1 + 16 + 25) / 9 / 2) = sqrt(7/3)
    # standard error sqrt(7/3) / sqrt(3) = 0.8819, half width 4.30265 x 0.8819 = 3.7945 -> [-2.128, 5.461]
    diff = stats.paired_difference(a, b)
    assert diff.paired and diff.n == 3
    assert diff.mean == pytest.approx(5 / 3)
    assert diff.sd == pytest.approx(math.sqrt(7 / 3))
    assert (diff.low, diff.high) == (pytest.approx(-2.128, abs=1e-3), pytest.approx(5.461, abs=1e-3))
    assert diff.high == pytest.approx(5 / 3 + T2 * math.sqrt(7 / 3) / math.sqrt(3), abs=1e-4)
    assert (diff.a_greater, diff.b_greater) == (2, 0)  # seed 3 is a tie
    assert stats.difference(a, b).paired  # 3 shared seeds: paired


def test_unpaired_welch_when_seeds_are_not_shared():
    # a: 1, 3 (mean 2, var 2); b: 10, 14 (mean 12, var 8); se = sqrt(2/2 + 8/2) = sqrt(5)
    # Welch df = 5^2 / (1^2 / 1 + 4^2 / 1) = 25 / 17
    diff = stats.difference({"1": 1.0, "2": 3.0}, {"3": 10.0, "4": 14.0})
    assert not diff.paired and diff.n == 2 and diff.mean == -10.0
    half = stats.scipy_stats.t.ppf(0.975, 25 / 17) * math.sqrt(5)
    assert (diff.low, diff.high) == (pytest.approx(-10 - half), pytest.approx(-10 + half))


def test_verdict():
    assert stats.verdict(0.1, 2.0, 3, "greater") == stats.SUPPORTED
    assert stats.verdict(0.1, 2.0, 3, "less") == stats.CONTRADICTED
    assert stats.verdict(-2.0, -0.1, 3, "less") == stats.SUPPORTED
    assert stats.verdict(-0.1, 2.0, 3, "greater") == stats.UNDECIDED  # contains 0
    assert stats.verdict(0.1, 2.0, 1, "greater") == stats.UNDECIDED  # too few seeds
    assert stats.verdict(float("nan"), float("nan"), 5, "greater") == stats.UNDECIDED


def test_seed_means_average_repeats():
    means, repeats = stats.seed_means([("1", 2.0), ("1", 4.0), ("2", 5.0), ("3", float("nan")), ("3", 1.0)])
    assert means == {"1": 3.0, "2": 5.0, "3": 1.0}
    assert repeats == {"1": 2, "3": 2}


def test_curve_area_and_first_reach():
    # trapezoid over epochs 0, 1, 3 of 0, 2, 2: (0 + 2) / 2 x 1 + (2 + 2) / 2 x 2 = 5; span 3 -> 5 / 3
    assert stats.curve_area([0, 1, 3], [0.0, 2.0, 2.0]) == pytest.approx(5 / 3)
    assert stats.curve_area([4], [0.7]) == 0.7
    assert stats.first_reach([0, 1, 2, 3], [0.1, 0.3, 0.2, 0.5], 0.3) == 1
    assert stats.first_reach([0, 1], [0.1, 0.2], 0.3) is None


def fake_run(seed, aps, wall_step=60.0, name=None):
    """A completed run with AP per epoch (NaN = not evaluated that epoch) and wall_time = wall_step x epochs done."""
    metrics = pd.DataFrame({"epoch": range(len(aps)), "AP": aps,
                            "wall_time": [wall_step * (e + 1) for e in range(len(aps))]})
    return Run(path=f"/runs/{name or seed}", overrides={"trainer.seed": str(seed)}, metrics=metrics)


def test_convergence_speed_synthetic():
    # reference: final APs 0.30 and 0.34 -> mean 0.32; fraction 0.5 -> target 0.16; reference runs 4 epochs
    reference_runs = [fake_run(1, [0.05, 0.1, 0.2, 0.30]), fake_run(2, [0.05, 0.15, 0.25, 0.34])]
    fast = [fake_run(1, [0.1, 0.2, 0.3, 0.4], wall_step=90.0), fake_run(2, [0.17, 0.2, float("nan"), 0.4])]
    groups = {"ref": reference_runs, "fast": fast}
    ref = reference(groups, "ref", 0.5)
    assert ref.target == pytest.approx(0.16) and ref.epochs == 4.0
    # fast seed 1 first reaches 0.16 at epoch 1 (2 epochs trained, 180 s); seed 2 at epoch 0 (1 epoch, 60 s)
    assert run_value(fast[0], BY_NAME["epochs_to_reach"], ref=ref) == 2.0
    assert run_value(fast[0], BY_NAME["time_to_reach"], ref=ref) == 180.0
    assert run_value(fast[1], BY_NAME["reach_share"], ref=ref) == 0.25
    # reference seed 1 reaches 0.16 at epoch 2 (3 epochs), seed 2 at epoch 2 (3 epochs)
    summary = summary_table(groups, [], 0, ref).set_index("setting")
    assert summary.loc["fast", "epochs_to_reach_mean"] == 1.5 and summary.loc["ref", "epochs_to_reach_mean"] == 3.0
    assert summary.loc["fast", "time_to_reach_mean"] == 120.0  # (180 + 60) / 2
    # area: seed 2 skips epoch 2 (not evaluated): trapezoid of (0,.17) (1,.2) (3,.4) = .185 + .6 = .785, / 3
    values, _ = seed_values(fast, BY_NAME["AP_area"])
    assert values["2"] == pytest.approx(0.785 / 3)
    assert values["1"] == pytest.approx((0.15 + 0.25 + 0.35) / 3)
    never = Reference("ref", 1.0, 0.9, 4.0)
    assert math.isnan(run_value(fast[0], BY_NAME["epochs_to_reach"], ref=never))
    assert math.isnan(run_value(fast[0], BY_NAME["epochs_to_reach"]))  # no reference: no value


def test_summary_counts_distinct_seeds_and_averages_repeats():
    # seed 1 ran twice (final AP 0.2 and 0.4 -> one value 0.3), seed 2 once (0.5): 2 seeds, not 3
    runs = [fake_run(1, [0.1, 0.2], name="a"), fake_run(1, [0.1, 0.4], name="b"), fake_run(2, [0.1, 0.5])]
    row = summary_table({"s": runs}, [], 0, None).iloc[0]
    assert (row.n_seeds, row.n_runs, row.repeated_seeds) == (2, 3, "1x2")
    assert row.final_AP_mean == pytest.approx(0.4)  # mean of 0.3 and 0.5, not of 0.2, 0.4, 0.5
    assert row.final_AP_std == pytest.approx(np.std([0.3, 0.5], ddof=1))
    assert row.final_AP_ci_low == pytest.approx(0.4 - T1 * np.std([0.3, 0.5], ddof=1) / math.sqrt(2), abs=1e-4)
    # two runs of one seed: one seed, no interval (not "2 seeds, +- 0.0")
    same = summary_table({"s": [fake_run(1, [0.3], name="a"), fake_run(1, [0.3], name="b")]}, [], 0, None).iloc[0]
    assert (same.n_seeds, same.n_runs) == (1, 2)
    assert math.isnan(same.final_AP_std) and math.isnan(same.final_AP_ci_low)
