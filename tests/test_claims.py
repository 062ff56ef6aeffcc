"""Claims files (dndetr/claims.py) tested end to end through analysis/instability.py on fake run folders."""
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dndetr import claims, stats
from dndetr.report import BY_NAME
from dndetr.runs import group_runs, read_runs, setting_keys

from test_instability import load_analysis

REPO = Path(__file__).resolve().parents[1]
STUDY_CLAIMS = REPO / "conf" / "study" / "dn_study.yaml"
ARMS = {  # experiment: (model.name, dn.groups, dn.attn_mask)
    "study_detr": ("detr", 0, True), "study_dab": ("dab", 0, True), "study_dn_dab": ("dab", 5, True),
    "study_dn_dab_nomask": ("dab", 5, False)}


def fake_run(folder: Path, experiment: str, seed: int, aps, instab):
    """A run folder as train.py -m leaves it: .hydra/overrides.yaml and config.yaml, metrics.jsonl."""
    (folder / ".hydra").mkdir(parents=True)
    overrides = [f"experiment={experiment}", f"trainer.seed={seed}", f"trainer.epochs={len(aps)}"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    model, groups, mask = ARMS[experiment]
    config = {"model": {"name": model}, "dn": {"groups": groups, "attn_mask": mask},
              "trainer": {"epochs": len(aps), "seed": seed}, "instability": {"enabled": False}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"epoch": e, "AP": ap, "wall_time": 10.0 * (e + 1), "epoch_time": 10.0,
             **({"IS": instab[e - 1], "IS_norm": instab[e - 1] / 8} if e else {})} for e, ap in enumerate(aps)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_claims(path: Path, claim_list, settings=None) -> Path:
    path.write_text(yaml.safe_dump({"settings": settings or {}, "claims": claim_list}))
    return path


IS_CLAIM = {"claim": "more stable with denoising", "metric": "IS", "compare": ["DN", "DAB"], "direction": "less",
            "epochs": [1, None]}
NAMES = {"DN": "experiment=study_dn_dab", "DAB": {"experiment": "study_dab"}}  # a label, and key/values


def test_verdict_flips_from_undecided_to_supported_with_more_agreeing_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    claims_file = write_claims(tmp_path / "claims.yaml", [IS_CLAIM], NAMES)
    # DN minus DAB, mean IS over epochs 1..2, per seed: seed 1: -1, seed 2: -3 (mean -2, sd 1.41)
    # 2 seeds: half width 12.706 x 1.41 / sqrt(2) = 12.7 -> CI [-14.7, 10.7] contains 0: undecided
    deltas = {1: -1.0, 2: -3.0}
    for seed, delta in deltas.items():
        fake_run(sweep / f"dab{seed}", "study_dab", seed, [0.1, 0.2, 0.3], [5.0, 5.0])
        fake_run(sweep / f"dn{seed}", "study_dn_dab", seed, [0.1, 0.2, 0.3], [5.0 + delta, 5.0 + delta])
    out = tmp_path / "report2"
    assert load_analysis().main([str(sweep), "--out", str(out), "--claims", str(claims_file)]) == 0
    row = pd.read_csv(out / "claims.csv").iloc[0]
    assert (row.verdict, row.n, row["mean"]) == ("undecided", 2, pytest.approx(-2.0))
    assert row.high == pytest.approx(-2.0 + 12.7062 * 2 ** 0.5 / 2 ** 0.5, abs=1e-3)
    # three more seeds that agree (-2, -2.5, -1.5): 5 differences, mean -2, sd 0.79, half width 0.98 -> supported
    for seed, delta in {3: -2.0, 4: -2.5, 5: -1.5}.items():
        fake_run(sweep / f"dab{seed}", "study_dab", seed, [0.1, 0.2, 0.3], [5.0, 5.0])
        fake_run(sweep / f"dn{seed}", "study_dn_dab", seed, [0.1, 0.2, 0.3], [5.0 + delta, 5.0 + delta])
    out = tmp_path / "report5"
    assert load_analysis().main([str(sweep), "--out", str(out), "--claims", str(claims_file)]) == 0
    row = pd.read_csv(out / "claims.csv").iloc[0]
    assert (row.verdict, row.n, row.a_greater, row.b_greater) == ("supported", 5, 0, 5)
    assert row.high < 0
    markdown = (out / "claims.md").read_text()
    assert "| 1 | more stable with denoising | IS(a) < IS(b), epochs 1..end" in markdown
    assert "5 paired; a > b in 0, a < b in 5 | **supported** |" in markdown


def build_study(root: Path) -> Path:
    """The 4-arm study with 3 seeds, 4 epochs each. DETR is clearly less stable than DAB; DN-DAB reaches DAB's
    final AP (mean 0.20) at epoch 1, i.e. after 2 of 4 epochs; the mask's effect on AP is clearly positive."""
    sweep = root / "sweep"
    arms = {"study_detr": ([0.02, 0.04, 0.05, 0.06], 9.0), "study_dab": ([0.05, 0.10, 0.15, 0.20], 4.0),
            "study_dn_dab": ([0.10, 0.22, 0.26, 0.30], 3.8), "study_dn_dab_nomask": ([0.05, 0.08, 0.10, 0.12], 2.0)}
    job = 0
    for experiment, (aps, instab) in arms.items():
        for seed, wobble in ((1, -0.01), (2, 0.0), (3, 0.01)):
            is_wobble = {"study_dn_dab": 0.5, "study_dab": -0.3}.get(experiment, 0.1) * (seed - 2)
            fake_run(sweep / str(job), experiment, seed, [ap + wobble for ap in aps],
                     [instab + is_wobble] * (len(aps) - 1))
            job += 1
    return sweep


def test_study_claims_file_on_a_synthetic_study(tmp_path, capsys):
    sweep = build_study(tmp_path)
    out = tmp_path / "report"
    assert load_analysis().main([str(sweep), "--out", str(out), "--claims", str(STUDY_CLAIMS)]) == 0
    verdicts = pd.read_csv(out / "claims.csv")["verdict"].tolist()
    # 1: IS(DETR) - IS(DAB) = 5 +- spread: supported. 2: DN-DAB - DAB IS differences -0.2 +- 0.8 per seed:
    # undecided. 3: DN-DAB reaches 0.20 after 2 of 4 epochs in every seed: share 0.5, not < 0.5 (CI is one point,
    # touching the bound): undecided. 4: the same share against 1: -0.5 in every seed: supported. 5: DN-DAB's
    # final AP - DAB's = +10 points in every seed: supported. 6: AP without mask - with mask = -18 points in
    # every seed: supported.
    assert verdicts == ["supported", "undecided", "undecided", "supported", "supported", "supported"]
    effects = pd.read_csv(out / "claims.csv")["mean"].tolist()
    assert effects == pytest.approx([5.0, -0.2, 0.0, -0.5, 0.10, -0.18])  # claims.csv: AP as a fraction
    markdown = (out / "claims.md").read_text()
    assert "reach_share < 0.50, epochs 0..end; target 1 x final AP of the reference" in markdown
    assert "a = `experiment=study_dn_dab`, reference = `experiment=study_dab`" in markdown
    printed = capsys.readouterr().out
    assert "claim 1: supported" in printed and str(out / "claims.md") in printed
    for ext in ("png", "pdf"):  # the paper's Figure 2 view: DETR, DAB-DETR and DN-DAB-DETR are all present
        assert (out / f"figure2_instability.{ext}").stat().st_size > 1000


def test_claims_file_mistakes_are_one_line_and_write_nothing(tmp_path, capsys):
    sweep = build_study(tmp_path)
    cases = [({**IS_CLAIM, "direction": "bigger"}, "claim 1: direction='bigger' must be one of"),
             ({**IS_CLAIM, "metric": "speed"}, "claim 1: metric='speed' must be one of"),
             ({**IS_CLAIM, "epochs": [3, 1]}, "claim 1: epochs=[3, 1] must be [first, last]"),
             ({**IS_CLAIM, "colour": "red"}, "claim 1: unknown key(s) ['colour']"),
             ({**IS_CLAIM, "metric": "reach_share"}, "claim 1: metric reach_share needs reference:")]
    for i, (claim, expected) in enumerate(cases):
        claims_file = write_claims(tmp_path / f"bad{i}.yaml", [claim], NAMES)
        out = tmp_path / f"report{i}"
        assert load_analysis().main([str(sweep), "--out", str(out), "--claims", str(claims_file)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {claims_file}: ") and expected in err and err.count("\n") == 1, err
        assert not out.exists()


def test_ambiguous_setting_is_an_error_and_missing_one_is_not_tested(tmp_path, capsys):
    sweep = build_study(tmp_path)
    ambiguous = write_claims(tmp_path / "ambiguous.yaml", [{**IS_CLAIM, "compare": ["model.name=dab", "DAB"]}], NAMES)
    assert load_analysis().main([str(sweep), "--out", str(tmp_path / "a"), "--claims", str(ambiguous)]) == 2
    assert "matches 3 settings" in capsys.readouterr().err
    missing = write_claims(tmp_path / "missing.yaml", [{**IS_CLAIM, "compare": ["experiment=study_x", "DAB"]}],
                           NAMES)
    assert load_analysis().main([str(sweep), "--out", str(tmp_path / "m"), "--claims", str(missing)]) == 0
    text = (tmp_path / "m" / "claims.md").read_text()
    assert "**undecided**" in text and "not tested: no setting matches experiment=study_x" in text


def test_reach_claim_with_a_seed_that_never_reaches_is_not_supported(tmp_path):
    for seed, aps in ((1, [0.1, 0.3]), (2, [0.1, 0.32]), (3, [0.1, 0.1])):  # seed 3 never reaches 0.2
        fake_run(tmp_path / f"dn{seed}", "study_dn_dab", seed, aps, [1.0])
    for seed in (1, 2, 3):
        fake_run(tmp_path / f"dab{seed}", "study_dab", seed, [0.1, 0.2, 0.2, 0.2], [1.0] * 3)
    found, _ = read_runs([tmp_path])
    runs = group_runs(found, setting_keys(found))
    claim = claims.Claim("fast", BY_NAME["reach_share"], "less", "experiment=study_dn_dab", value=0.9,
                         reference="experiment=study_dab")
    outcome = claims.evaluate(claim, runs, "test")
    # seeds 1 and 2 reach 0.2 after 2 of 4 epochs (share 0.5 each, CI one point below 0.9) but seed 3 never does
    assert outcome.diff.n == 2 and outcome.diff.mean == pytest.approx(-0.4)
    assert outcome.verdict == stats.UNDECIDED
    # (the label also has trainer.epochs: it differs between the two settings here)
    assert outcome.notes == ["1 of 3 seeds of `experiment=study_dn_dab, trainer.epochs=2` never reached 20.00 % AP; "
                             "the CI covers only those that did"]


def test_figure2_arms_recognised_from_the_study_experiments_configs():
    """The study file's Figure 2 names its arms by experiment; compose the real study experiments to check they
    resolve to exactly those settings."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dndetr.config import register_configs
    from dndetr.runs import Run

    register_configs()
    groups = {}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for experiment in ARMS:
            config = OmegaConf.to_container(compose("config", overrides=[f"experiment={experiment}"]), resolve=True)
            groups[f"experiment={experiment}"] = [Run(path=Path(experiment), config=config)]
    (figure,) = claims.load_study(STUDY_CLAIMS)[1]
    chosen, why_not = claims.figure_groups(figure, groups)
    assert why_not is None and figure.metric.column == "IS"
    assert {label: runs[0].path.name for label, runs in chosen.items()} == {
        "DETR": "study_detr", "DAB-DETR": "study_dab", "DN-DAB-DETR": "study_dn_dab"}
