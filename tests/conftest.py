"""Fixtures shared by all tests. The `slow` and `slurm` markers are declared in pyproject.toml."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """The real COCO subset: $DNDETR_COCO_MINI, else ../shared/data/coco_mini next to the repository."""
    root = Path(os.environ.get("DNDETR_COCO_MINI", REPO_ROOT.parent / "shared/data/coco_mini"))
    if not (root / "annotations").is_dir():
        pytest.skip(f"COCO subset not found at {root} (set DNDETR_COCO_MINI to a COCO-layout folder)")
    return root
