"""The training core end to end: runs, overfits, evaluates, resumes exactly after a real kill."""
from __future__ import annotations

import itertools
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dndetr.config import LossConfig, MatcherConfig
from dndetr.data import CocoDetection
from dndetr.evaluation import coco_ap
from dndetr.trainer import CheckpointError, Trainer, load_checkpoint
from dndetr.matcher import HungarianMatcher
from dndetr.models import MODELS
from helpers import REPO_ROOT, compose_config, read_metrics, run_train, tiny, without_timing


def test_train_writes_metrics_checkpoint_and_matchings(tmp_path):
    run = tmp_path / "run"
    result = run_train(run, tiny(tmp_path))
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert np.isfinite(row["train_loss"]) and row["train_loss"] > 0
        assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "AP", "AP50", "lr", "wall_time"} <= set(row)
    assert "IS" not in rows[0] and "IS" in rows[1]  # IS compares consecutive epochs
    assert sorted(p.name for p in (run / "matchings").iterdir()) == [f"epoch_000{i}.npz" for i in range(3)]
    state = load_checkpoint(run / "checkpoint_last.pt")
    assert state["epoch"] == 3 and state["iteration"] == 0
    assert "metrics.jsonl" in result.stdout and "checkpoint_last.pt" in result.stdout


def test_data_time_is_the_time_spent_waiting_for_the_loader(tmp_path, monkeypatch):
    trainer = Trainer(compose_config(tiny(tmp_path)), tmp_path / "run")
    load = type(trainer.train_set.dataset).__getitem__

    def slow_load(dataset, index):
        time.sleep(0.05)
        return load(dataset, index)

    monkeypatch.setattr(type(trainer.train_set.dataset), "__getitem__", slow_load)
    trainer.train_one_epoch()
    timings = trainer.pending
    assert 16 * 0.05 <= timings["data_time"] < 16 * 0.05 + 0.5  # 16 images in 4 batches
    assert timings["data_time"] < timings["train_time"]
    row = trainer.finish_epoch()
    assert row["data_time"] == timings["data_time"] and row["train_time"] == timings["train_time"]
    trainer.train_one_epoch()
    del trainer.pending["data_time"]  # as in a checkpoint written before data_time was measured
    assert trainer.finish_epoch()["data_time"] is None  # unknown, not a made-up 0


@pytest.mark.parametrize("kill_at", ["iteration:1:2", "save:1:2", "eval:1:0", "record:1:0", "iteration:1:4"])
def test_killed_run_resumes_to_identical_metrics(tmp_path, kill_at):
    """A run SIGKILLed at a point (mid-epoch, during a checkpoint write, during evaluation, during matching
    recording, at an epoch boundary) and restarted ends with exactly the uninterrupted run's metrics."""
    overrides = tiny(tmp_path, "trainer.checkpoint_every_iters=1", "model.dropout=0.1", "dn.groups=2")
    reference = tmp_path / "reference"
    run_train(reference, overrides)
    run = tmp_path / "killed"
    killed = run_train(run, overrides, env={"DNDETR_KILL_AT": kill_at}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    load_checkpoint(run / "checkpoint_last.pt")  # the checkpoint on disk is whole
    run_train(run, overrides)
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(reference))
    for epoch in range(3):
        a = np.load(run / "matchings" / f"epoch_000{epoch}.npz")
        b = np.load(reference / "matchings" / f"epoch_000{epoch}.npz")
        assert (a["assign"] == b["assign"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
def test_tiny_model_overfits_a_few_images(tmp_path, model):
    """Data, matcher, loss, post-processing and COCOeval fit together: AP50 >= 0.9 on 4 training images."""
    run = tmp_path / "overfit"
    run_train(run, tiny(tmp_path, f"model={model}", "data.max_train_images=4", "data.val_on_train=true",
                        "data.batch_size=4", "data.synthetic.min_objects=1", "trainer.epochs=300",
                        "trainer.eval_every=100", "instability.enabled=false", "optim.lr=1e-3",
                        "optim.lr_backbone=1e-3", "model.hidden_dim=64", "model.dim_feedforward=128",
                        "optim.lr_drop=250"), timeout=1800)  # the deformable models need longer under load
    final = read_metrics(run)[-1]
    assert final["AP50"] >= 0.9, final


def test_coco_ground_truth_as_detections_gives_ap_one(coco_mini):
    dataset = CocoDetection(coco_mini, "val2017")
    coco = dataset.coco
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                  for a in coco.dataset["annotations"] if not a.get("iscrowd", 0)]
    stats = coco_ap(coco, detections)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)


def brute_force_assignment(cost: np.ndarray) -> float:
    queries, targets = cost.shape
    return min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(queries), targets))


@pytest.mark.parametrize("seed", range(20))
def test_matcher_finds_the_brute_force_optimum(seed):
    generator = torch.Generator().manual_seed(seed)
    queries, targets = 6, int(torch.randint(1, 5, (1,), generator=generator))
    outputs = {"pred_logits": torch.randn(1, queries, 5, generator=generator),
               "pred_boxes": torch.rand(1, queries, 4, generator=generator) * 0.5 + 0.25}
    target = [{"labels": torch.randint(0, 4, (targets,), generator=generator),
               "boxes": torch.rand(targets, 4, generator=generator) * 0.5 + 0.25}]
    for class_loss in ("ce", "focal"):
        matcher = HungarianMatcher(MatcherConfig(), LossConfig(class_loss=class_loss))
        cost = matcher.cost_matrices(outputs, target)[0].numpy()
        rows, cols = matcher(outputs, target)[0]
        assert len(set(rows.tolist())) == targets and sorted(cols.tolist()) == list(range(targets))
        assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(brute_force_assignment(cost), abs=1e-5)


def test_foreign_or_truncated_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="not a dndetr training checkpoint"):
        load_checkpoint(path)
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "iteration": 0, "rng": {}}, path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


def test_eval_only_reproduces_the_runs_final_ap(tmp_path):
    """`trainer.eval_only=true model.init_from=<checkpoint>` evaluates a saved model and prints its AP."""
    run = tmp_path / "run"
    overrides = tiny(tmp_path, "trainer.epochs=1", "instability.enabled=false")
    run_train(run, overrides)
    final_ap = read_metrics(run)[-1]["AP"]
    result = run_train(tmp_path / "eval", overrides + ["trainer.eval_only=true",
                                                       f"model.init_from={run / 'checkpoint_last.pt'}"])
    printed = dict(item.split("=") for item in result.stdout.split() if item.startswith("AP"))
    assert float(printed["AP"]) == pytest.approx(final_ap, abs=1e-4)
    assert not (tmp_path / "eval" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "eval")


@pytest.mark.slow
def test_dn_sweep_runs_for_every_model(tmp_path):
    """`train.py -m dn.groups=... dn.box_noise=...` works locally for DETR, Conditional DETR and DAB-DETR."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", *tiny(tmp_path, "model=detr,conditional,dab", "dn.groups=1,3",
                                                    "dn.box_noise=0.4", "trainer.epochs=1"), f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=900)
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == 6
    for job in jobs:
        row = read_metrics(job)[-1]
        assert np.isfinite(row["dn_loss_bbox"]) and row["dn_loss_bbox"] > 0, job
        assert not (job / "error.txt").exists()
