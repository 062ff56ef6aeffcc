"""The code's seams (issue 10): a model added from outside the package trains through the normal entry point,
model names live only in their own modules, and library modules stay short."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore

from dndetr.config import ModelConfig
from dndetr.models import MODELS, register_model
from dndetr.models.detr import DETR
from dndetr.plugins import PLUGINS
from dndetr.trainer import Trainer
from helpers import compose_config, read_metrics, tiny

REPO = Path(__file__).resolve().parents[1]
LIBRARY = sorted((REPO / "dndetr").rglob("*.py")) + sorted((REPO / "analysis").glob("*.py"))


@dataclass
class ScaledQueriesConfig(ModelConfig):
    query_scale: float = 0.5  # a field only this model has


@register_model("test_scaled_queries", ScaledQueriesConfig)
class ScaledQueries(DETR):
    """DETR whose learned positional queries are scaled by a setting of its own schema."""

    def matching_queries(self, batch_size):
        content, position = super().matching_queries(batch_size)
        return content, {"pos": position["pos"] * self.cfg.query_scale}


def test_a_model_registered_outside_the_package_trains_through_the_normal_entry_point(tmp_path):
    # What conf/model/<name>.yaml would hold: the schema as defaults, then the values.
    ConfigStore.instance().store(group="model", name="test_scaled_queries",
                                 node={"defaults": ["/schema/model/test_scaled_queries@_here_"],
                                       "name": "test_scaled_queries", "query_scale": 0.25})
    cfg = compose_config(tiny(tmp_path, "model=test_scaled_queries", "trainer.epochs=1", "data.max_train_images=4",
                              "model.backbone.name=resnet18"))
    assert type(cfg.model) is ScaledQueriesConfig and cfg.model.query_scale == 0.25
    run = tmp_path / "run"
    run.mkdir()
    trainer = Trainer(cfg, run)
    assert isinstance(trainer.model, ScaledQueries)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    (row,) = read_metrics(run)
    assert row["epoch"] == 0 and torch.isfinite(torch.tensor(row["train_loss"])) and "AP" in row
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "one optimiser step changed no weight"


def test_model_names_appear_only_in_their_own_module():
    offenders = []
    for name, entry in MODELS.items():
        if name.startswith("test_"):
            continue
        own = Path(__import__(entry.cls.__module__, fromlist=["_"]).__file__).resolve()
        pattern = re.compile(rf"[\"']{re.escape(name)}[\"']")
        offenders += [f"{path.relative_to(REPO)}: {name!r}" for path in LIBRARY
                      if path.resolve() != own and pattern.search(path.read_text())]
    assert not offenders


def test_plugin_names_appear_only_in_their_own_module():
    offenders = []
    for group, cls in PLUGINS.items():
        own = Path(__import__(cls.__module__, fromlist=["_"]).__file__).resolve()
        pattern = re.compile(rf"[\"']{re.escape(group)}[\"']|\.{re.escape(group)}\.")
        offenders += [f"{path.relative_to(REPO)}: {group!r}" for path in LIBRARY
                      if path.resolve() != own and pattern.search(path.read_text())]
    assert not offenders


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(REPO)))
def test_library_modules_stay_under_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400
