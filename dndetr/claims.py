"""Claims a study tests: a YAML file names the comparisons, and each gets its measured effect, 95 % CI over seeds
and a verdict (docs/instability.md, "Claims").

    settings:                      # optional short names for settings
      DAB: experiment=study_dab    # a label the analysis gives, "key=value, key=value", or a mapping
    claims:
      - claim: Denoising makes the matching more stable     # free text
        metric: IS                 # a name in dndetr.report.METRICS
        compare: [DN-DAB, DAB]     # effect = metric(DN-DAB) - metric(DAB), paired by seed
        direction: less            # the claimed sign of the effect: greater | less
        epochs: [1, null]          # optional: first and last epoch (0-based, inclusive; null = open)
      - claim: DN-DAB reaches DAB's final AP in at most half of DAB's epochs
        metric: reach_share        # epochs to reach the reference's final AP / the reference's epochs
        setting: DN-DAB            # one setting against a constant: effect = metric(DN-DAB) - value
        value: 0.5                 # in the units summary.md shows (AP in %)
        reference: DAB             # reach metrics: whose final AP is the target ...
        fraction: 1.0              # ... and which fraction of it (default 1.0)
        direction: less
    figures:                       # optional: one curve per setting, mean and 95 % CI per epoch
      - name: figure2_instability  # file name (PNG and PDF)
        title: Matching instability per epoch (DN-DETR paper, Figure 2)
        metric: IS
        settings: {DETR: DETR, DAB-DETR: DAB, DN-DAB-DETR: DN-DAB}   # curve label: setting
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import pandas as pd
import yaml

from dndetr import report, stats
from dndetr.runs import Run

CLAIM_KEYS = {"claim", "metric", "compare", "setting", "value", "direction", "epochs", "reference", "fraction"}
DIRECTIONS = ("greater", "less")
SettingRef = Union[str, dict]


class ClaimsError(ValueError):
    """A mistake in a claims file: one line naming the file, the claim and the key."""


@dataclass
class Claim:
    text: str
    metric: report.Metric
    direction: str
    a: SettingRef
    b: Optional[SettingRef] = None  # None: compare a with `value`
    value: float = 0.0
    first: int = 0
    last: Optional[int] = None
    reference: Optional[SettingRef] = None
    fraction: float = 1.0


@dataclass
class Figure:
    name: str
    title: str
    metric: report.Metric
    settings: Dict[str, SettingRef]  # curve label: setting


@dataclass
class Outcome:
    claim: Claim
    verdict: str
    diff: Optional[stats.Difference] = None
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# reading


def load_study(path: Path) -> Tuple[List[Claim], List[Figure]]:
    """The claims and figures of a study file, checked: every mistake is a ClaimsError naming the file and entry."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ClaimsError(f"{path}: unreadable claims file: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("claims"), list) or not data["claims"]:
        raise ClaimsError(f"{path}: must be a mapping with a non-empty list 'claims' (and optional 'settings')")
    names = data.get("settings") or {}
    if not isinstance(names, dict):
        raise ClaimsError(f"{path}: 'settings' must map names to settings")
    if not isinstance(data.get("figures") or [], list):
        raise ClaimsError(f"{path}: 'figures' must be a list")
    return ([parse_claim(entry, names, f"{path}: claim {i}") for i, entry in enumerate(data["claims"], 1)],
            [parse_figure(entry, names, f"{path}: figure {i}") for i, entry in enumerate(data.get("figures") or [], 1)])


def load_claims(path: Path) -> List[Claim]:
    return load_study(path)[0]


def parse_figure(entry, names: dict, where: str) -> Figure:
    ok = isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("settings"), dict)
    if not ok or not entry["settings"]:
        raise ClaimsError(f"{where}: must be a mapping with name, metric and settings {{curve label: setting}}")
    if entry.get("metric") not in report.BY_NAME:
        raise ClaimsError(f"{where}: metric={entry.get('metric')!r} must be one of {sorted(report.BY_NAME)}")
    settings = {str(label): setting_ref(ref, names, where) for label, ref in entry["settings"].items()}
    return Figure(entry["name"], str(entry.get("title") or entry["name"]), report.BY_NAME[entry["metric"]], settings)


def figure_groups(figure: Figure, groups: Dict[str, List[Run]]) -> Tuple[Dict[str, List[Run]], Optional[str]]:
    """({curve label: runs}, None) when every setting of the figure is present, else ({}, why not)."""
    chosen, missing = {}, []
    for label, ref in figure.settings.items():
        try:
            chosen[label] = groups[resolve(groups, ref, f"figure {figure.name}")]
        except LookupError:
            missing.append(label)
    return ({}, f"no runs of {', '.join(missing)}") if missing else (chosen, None)


def parse_claim(entry, names: dict, where: str) -> Claim:
    if not isinstance(entry, dict):
        raise ClaimsError(f"{where}: must be a mapping with claim, metric, compare or setting, direction")
    unknown = sorted(set(entry) - CLAIM_KEYS)
    if unknown:
        raise ClaimsError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(CLAIM_KEYS)}")
    if entry.get("metric") not in report.BY_NAME:
        raise ClaimsError(f"{where}: metric={entry.get('metric')!r} must be one of {sorted(report.BY_NAME)}")
    if entry.get("direction") not in DIRECTIONS:
        raise ClaimsError(f"{where}: direction={entry.get('direction')!r} must be one of {list(DIRECTIONS)}")
    metric = report.BY_NAME[entry["metric"]]
    claim = Claim(text=str(entry.get("claim") or f"claim {where}"), metric=metric, direction=entry["direction"],
                  a=None, first=0, last=None)
    compare = entry.get("compare")
    if compare is not None:
        if not (isinstance(compare, list) and len(compare) == 2) or "setting" in entry or "value" in entry:
            raise ClaimsError(f"{where}: compare must be a list [a, b] of two settings (and then no setting/value)")
        claim.a, claim.b = (setting_ref(s, names, where) for s in compare)
    elif "setting" in entry and isinstance(entry.get("value"), (int, float)):
        claim.a, claim.value = setting_ref(entry["setting"], names, where), float(entry["value"]) / metric.scale
    else:
        raise ClaimsError(f"{where}: give compare: [a, b], or setting: and a number value:")
    claim.first, claim.last = epoch_range(entry.get("epochs"), where)
    if metric.reduce in report.REACH:
        if "reference" not in entry:
            raise ClaimsError(f"{where}: metric {metric.name} needs reference: (the setting whose final AP is the "
                              f"target)")
        claim.reference = setting_ref(entry["reference"], names, where)
        claim.fraction = entry.get("fraction", 1.0)
        if not isinstance(claim.fraction, (int, float)) or not claim.fraction > 0:
            raise ClaimsError(f"{where}: fraction={claim.fraction!r} must be a number > 0")
    return claim


def setting_ref(value, names: dict, where: str) -> SettingRef:
    value = names.get(value, value) if isinstance(value, str) else value
    if not isinstance(value, (str, dict)) or not value:
        raise ClaimsError(f"{where}: setting {value!r} must be a name from 'settings', a label, key=value pairs "
                          f"or a mapping")
    return value


def epoch_range(value, where: str) -> Tuple[int, Optional[int]]:
    if value is None:
        return 0, None
    ok = (isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, int) for v in value)
          and (value[0] or 0) >= 0 and (value[1] is None or value[1] >= (value[0] or 0)))
    if not ok:
        raise ClaimsError(f"{where}: epochs={value!r} must be [first, last] (0-based, inclusive; null = open)")
    return value[0] or 0, value[1]


# ----------------------------------------------------------------------------------------------------------------
# testing


def resolve(groups: Dict[str, List[Run]], wanted: SettingRef, where: str) -> str:
    try:
        label = report.match_setting(groups, wanted, where)
    except ValueError as err:
        raise ClaimsError(str(err)) from None
    if label is None:
        raise LookupError(f"no setting matches {wanted} (settings: {'; '.join(groups)})")
    return label


def evaluate(claim: Claim, groups: Dict[str, List[Run]], where: str) -> Outcome:
    try:
        a = resolve(groups, claim.a, where)
        b = resolve(groups, claim.b, where) if claim.b is not None else None
        ref_label = resolve(groups, claim.reference, where) if claim.reference is not None else None
    except LookupError as err:
        return Outcome(claim, stats.UNDECIDED, notes=[f"not tested: {err.args[0]}"])
    ref = report.reference(groups, ref_label, claim.fraction) if ref_label else None
    if ref_label and ref is None:
        return Outcome(claim, stats.UNDECIDED, notes=[f"not tested: `{ref_label}` has no final AP"])
    args = (claim.metric, claim.first, claim.last, ref)
    values, repeats = report.seed_values(groups[a], *args)
    other, other_repeats = report.seed_values(groups[b], *args) if b else ({s: claim.value for s in values}, {})
    diff = stats.difference(values, other) if b else stats.paired_difference(values, other)
    outcome = Outcome(claim, stats.verdict(diff.low, diff.high, diff.n, claim.direction), diff)
    if diff.n < 2:
        outcome.notes.append(f"too few seeds with a value ({diff.n}); at least 2 are needed")
    elif b and diff.paired and diff.n < max(len(values), len(other)):
        outcome.notes.append(f"paired over the {diff.n} seeds both settings have a value for; the others are left out")
    elif b and not diff.paired:
        outcome.notes.append("fewer than 2 seeds in common: compared unpaired (Welch)")
    for label, seeds in ((a, repeats), (b, other_repeats)):
        if seeds:
            outcome.notes.append(f"`{label}` repeats seed(s) {', '.join(seeds)}: those runs are averaged and count "
                                 f"once")
    if claim.metric.reduce in report.REACH:
        counts = [(label, sum(map(math.isnan, v.values())), len(v)) for label, v in ((a, values), (b, other)) if label]
        missed = [f"{k} of {n} seeds of `{label}`" for label, k, n in counts if k]
        if missed:
            outcome.notes.append(f"{', '.join(missed)} never reached {100 * ref.target:.2f} % AP; the CI covers only "
                                 f"those that did")
            if outcome.verdict == stats.SUPPORTED:
                outcome.verdict = stats.UNDECIDED
    return outcome


def evaluate_all(claims: List[Claim], groups: Dict[str, List[Run]], source: Path) -> List[Outcome]:
    return [evaluate(claim, groups, f"{source}: claim {i}") for i, claim in enumerate(claims, 1)]


# ----------------------------------------------------------------------------------------------------------------
# claims.md and claims.csv


def tested_as(claim: Claim) -> str:
    sign = ">" if claim.direction == "greater" else "<"
    epochs = f"epochs {claim.first}..{'end' if claim.last is None else claim.last}"
    name = claim.metric.name
    if claim.b is not None:
        lhs, rhs = f"{name}(a)", f"{name}(b)"
    else:
        lhs, rhs = name, report.number(claim.value, claim.metric)
    reference = f"; target {claim.fraction:g} x final AP of the reference" if claim.reference is not None else ""
    return f"{lhs} {sign} {rhs}, {epochs}{reference}"


def describe(ref: SettingRef) -> str:
    return ref if isinstance(ref, str) else ", ".join(f"{k}={v}" for k, v in ref.items())


def claims_markdown(outcomes: List[Outcome], source: Path) -> str:
    rows, notes = [], []
    for i, o in enumerate(outcomes, 1):
        c = o.claim
        settings = f"a = `{describe(c.a)}`" + (f", b = `{describe(c.b)}`" if c.b is not None else "")
        if c.reference is not None:
            settings += f", reference = `{describe(c.reference)}`"
        measured = ["n/a", "n/a", "0 seeds"]
        if o.diff is not None and not math.isnan(o.diff.mean):
            against = report.number(c.value, c.metric) if c.b is None else ""
            measured = report.effect_cells(vars(o.diff), c.metric, against)
        rows.append([i, c.text, f"{tested_as(c)}; {settings}", *measured, f"**{o.verdict}**"])
        notes += [f"{i}. {note}" for note in o.notes]
    text = (f"# Claims\n\nFrom `{source}`. Effect: a - b (or a - the stated value), in the units of summary.md; "
            f"95 % CI: Student t over seeds, paired by seed where both settings have at least 2 seeds in common, "
            f"else Welch. Verdict: supported when the CI excludes 0 on the claimed side, contradicted when it "
            f"excludes 0 on the other side, undecided when it contains 0 or fewer than 2 seeds have a value.\n\n")
    text += report.markdown_table(["#", "claim", "tested as", "effect", "95 % CI", "seeds", "verdict"], rows)
    return text + ("\nNotes:\n\n" + "\n".join(notes) + "\n" if notes else "")


def claims_frame(outcomes: List[Outcome]) -> pd.DataFrame:
    rows = []
    for o in outcomes:
        diff = vars(o.diff) if o.diff is not None else {}
        rows.append({"claim": o.claim.text, "metric": o.claim.metric.name, "direction": o.claim.direction,
                     "verdict": o.verdict, **diff, "notes": " | ".join(o.notes)})
    return pd.DataFrame(rows)
