"""A tiny CPU configuration and ways to run it: composed in-process, or as a real `python train.py` process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from hydra import compose, initialize_config_dir

from dndetr.config import Config, register_configs, validate

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO_ROOT / "conf")

# 16 training and 8 validation images of 64x64; a 2-layer DETR of width 32: seconds per epoch on one core.
TINY = [
    "model.backbone.name=resnet18", "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1",
    "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=10", "model.num_select=10",
    "data.synthetic.num_train=16", "data.synthetic.num_val=8", "data.synthetic.image_size=64",
    "data.synthetic.max_objects=4", "data.train_scales=[64]", "data.max_size=64", "data.val_size=64",
    "data.batch_size=4", "data.val_batch_size=8", "data.num_workers=0", "trainer.epochs=3",
    "trainer.threads=1", "trainer.progress=false",
    "trainer.precision=fp32",  # expected values are fp32's on every machine; bf16 and auto: test_precision.py
]


def tiny(tmp_path: Path, *overrides: str) -> List[str]:
    return TINY + [f"data.root={tmp_path / 'synthetic'}", *overrides]


def compose_config(overrides: List[str]) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return validate(compose("config", overrides=overrides))


def run_train(run_dir: Path, overrides: List[str], env: Optional[dict] = None, check: bool = True,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """`python train.py` in its own process, with its run folder at ``run_dir``."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {}))
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def read_metrics(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


TIMING_KEYS = ("iter_time", "wall_time", "train_time", "data_time", "eval_time", "record_time", "epoch_time")


def without_timing(rows: List[dict]) -> List[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]
