"""The instability study pipeline on a real (tiny) Hydra multirun: train, record, analyse."""
from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO_ROOT, read_metrics, tiny


@pytest.mark.slow
def test_analysis_of_a_real_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", *tiny(tmp_path, "model=dab", "dn.groups=0,2", "trainer.seed=1,2",
                                                    "trainer.epochs=2"), f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=900)
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == 4 and all((job / "metrics.jsonl").exists() for job in jobs)

    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "analysis/instability.py", str(sweep), "--out", str(out)],
                            cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=300)
    assert str(out / "summary.csv") in result.stdout
    for name in ("instability", "ap_vs_epoch"):
        assert any(p.name.startswith(name) and p.suffix == ".png" for p in out.iterdir()), sorted(out.iterdir())
    assert any(p.suffix == ".pdf" for p in out.iterdir())

    rows = {row["dn.groups"]: row for row in csv.DictReader(open(out / "summary.csv"))}
    assert sorted(rows) == ["0", "2"]
    for groups, row in rows.items():
        assert row["n_seeds"] == "2" and row["n_failed"] == "0"
        runs = [read_metrics(job) for job in jobs if f"dn.groups={groups}" in (job / ".hydra/overrides.yaml").read_text()]
        assert len(runs) == 2
        assert float(row["final_AP_mean"]) == pytest.approx(np.mean([r[-1]["AP"] for r in runs]))
        assert float(row["IS_mean"]) == pytest.approx(np.mean([np.mean([e["IS"] for e in r if "IS" in e]) for r in runs]))


def test_make_study_runs_the_arms_the_claims_name():
    """`make study` / `make demo` sweep exactly the arms conf/study/dn_study.yaml compares, and the arms differ only
    in the model (with its own loss and matcher) and the denoising settings: same data, schedule and scale."""
    import re

    import yaml
    from omegaconf import OmegaConf

    from helpers import compose_config

    makefile = (REPO_ROOT / "Makefile").read_text()
    swept = [arm for half in ("A", "B")
             for arm in re.search(rf"^ARMS_{half} := experiment=(\S+)$", makefile, re.M).group(1).split(",")]
    claims = yaml.safe_load((REPO_ROOT / "conf/study/dn_study.yaml").read_text())
    assert sorted(f"experiment={arm}" for arm in swept) == sorted(claims["settings"].values())
    assert "--reference experiment=study_dab" in makefile

    configs = {arm: OmegaConf.to_container(OmegaConf.structured(compose_config([f"experiment={arm}"])))
               for arm in swept}
    for config in configs.values():
        assert config["trainer"]["threads"] == 1  # two sweeps side by side on 2 cores
        for model_specific in ("model", "loss", "matcher", "dn"):
            config.pop(model_specific)
    reference = configs.pop("study_dab")
    assert all(config == reference for config in configs.values())
    assert reference["trainer"]["epochs"] > reference["optim"]["lr_drop"]  # the plateau comes after the drop
