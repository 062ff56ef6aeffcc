"""Faults around the run folder (issue 11, items 7, 8, 10): unreadable checkpoints, unwritable folders, a full disk,
and a failure while evaluating a trained epoch. Each ends as one `error:` line (exit 2) and nothing already written
is lost or corrupted."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from dndetr.trainer import load_checkpoint
from helpers import REPO_ROOT, read_metrics, run_train, tiny
from test_config import assert_one_error_line


class Foreign:
    pass


def test_empty_checkpoint_is_one_line_and_left_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint_last.pt").write_bytes(b"")
    result = run_train(run, tiny(tmp_path, "trainer.epochs=1"), check=False)
    line = assert_one_error_line(result, str(run / "checkpoint_last.pt"), "cannot be read", "move it away")
    assert "weights_only" not in line and "IndexError" not in line
    assert (run / "checkpoint_last.pt").read_bytes() == b""  # not overwritten: the user decides


def test_foreign_checkpoint_never_suggests_turning_the_safe_loader_off(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": Foreign()}, run / "checkpoint_last.pt")
    result = run_train(run, tiny(tmp_path, "trainer.epochs=1"), check=False)
    line = assert_one_error_line(result, "holds objects other than tensors")
    assert "weights_only" not in line and "False" not in line


def test_run_folder_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    result = run_train(blocker / "run", tiny(tmp_path, "trainer.epochs=1"), check=False)
    assert_one_error_line(result, "cannot write the run folder", str(blocker))


def train_with_file_size_limit(run, overrides, limit_kb: int) -> subprocess.CompletedProcess:
    """`python train.py` under `ulimit -f` (a full disk as far as the process can tell)."""
    command = " ".join([f"ulimit -f {limit_kb};", "exec", sys.executable, str(REPO_ROOT / "train.py"),
                        f"hydra.run.dir={run}", *(f"'{o}'" for o in overrides)])
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_full_disk_during_checkpoint_save_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    run_train(run, tiny(tmp_path, "trainer.epochs=1"))
    before = (run / "checkpoint_last.pt").read_bytes()
    size_kb = len(before) // 1024
    result = train_with_file_size_limit(run, tiny(tmp_path, "trainer.epochs=2"), limit_kb=size_kb // 2)
    assert_one_error_line(result, "cannot write", "checkpoint_last.pt", "disk", "previous version is intact")
    assert (run / "checkpoint_last.pt").read_bytes() == before
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # no orphaned temporary file
    assert [row["epoch"] for row in read_metrics(run)] == [0]
    load_checkpoint(run / "checkpoint_last.pt")


def test_failed_evaluation_keeps_the_trained_epoch_and_resume_redoes_only_the_evaluation(tmp_path):
    run = tmp_path / "run"
    run_train(run, tiny(tmp_path, "trainer.epochs=1"))
    corrupt = run / "matchings" / "epoch_0000.npz"
    corrupt.write_bytes(b"not a zip file")
    result = run_train(run, tiny(tmp_path, "trainer.epochs=2"), check=False)
    assert_one_error_line(result, "epoch 1 is trained and saved", "epoch_0000.npz", "redoes only the evaluation")
    state = load_checkpoint(run / "checkpoint_last.pt")
    assert state["epoch"] == 1 and state["pending"] is not None  # trained, not yet evaluated
    assert [row["epoch"] for row in read_metrics(run)] == [0]
    assert (run / "evaluation_error.txt").read_text().startswith("Traceback")
    corrupt.unlink()  # the user removes the damaged file; the resumed run must not train epoch 1 again:
    resumed = run_train(run, tiny(tmp_path, "trainer.epochs=2"), env={"DNDETR_KILL_AT": "iteration:1:1"})
    rows = read_metrics(run)
    assert resumed.returncode == 0 and [row["epoch"] for row in rows] == [0, 1]
    assert rows[1]["train_loss"] == state["pending"]["losses"]["loss"] and "AP" in rows[1]
