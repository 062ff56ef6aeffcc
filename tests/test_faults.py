"""Bad input and faults: each stops with one clear line (exit code 2), and nothing already done is lost.

Numerical blow-ups, batches without objects or with hundreds of them, broken dataset files, a sweep in which one
job fails, and checkpoints that are not what they claim to be.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dndetr.trainer import NonFiniteLossError, Trainer, load_checkpoint
from helpers import REPO_ROOT, TINY, compose_config, read_metrics, run_train, tiny
from test_config import assert_one_error_line


# -- numerics --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("term, bad", [("loss_giou", math.nan), ("loss_bbox_0", math.inf)])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, term, bad):
    run = tmp_path / "run"
    run.mkdir()
    trainer = Trainer(compose_config(tiny(tmp_path)), run)
    saved_weights = {}
    real_save, real_criterion = trainer.save_now, trainer.criterion.forward

    def save_now():
        real_save()
        saved_weights[trainer.epoch] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def poisoned_criterion(outputs, targets):
        losses = real_criterion(outputs, targets)
        if (trainer.epoch, trainer.iteration) == (1, 2):
            losses[term] = losses[term] + bad
        return losses

    trainer.save_now, trainer.criterion.forward = save_now, poisoned_criterion
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    message = str(err.value)
    assert term in message and "epoch 1 iteration 2" in message and "last good checkpoint" in message
    assert "\n" not in message
    assert [row["epoch"] for row in read_metrics(run)] == [0]
    # On disk: the checkpoint of the end of epoch 0, whole, although the model trained two more steps since.
    state = load_checkpoint(run / "checkpoint_last.pt")
    # (epoch 0 was saved twice: once trained, before its evaluation, and once evaluated and logged)
    assert (state["epoch"], state["iteration"]) == (1, 0) and list(saved_weights) == [0, 1]
    assert state["pending"] is None
    for key, value in saved_weights[1].items():
        assert torch.equal(state["model"][key], value), key
    assert any(not torch.equal(trainer.model.state_dict()[k], v) for k, v in saved_weights[1].items())
    trainer.model.load_state_dict(state["model"])


def test_weights_that_turn_nan_in_the_last_step_of_an_epoch_stop_cleanly(tmp_path):
    """A finite loss with NaN gradients: caught before evaluation and matching recording would trip over it."""
    run = tmp_path / "run"
    run.mkdir()
    trainer = Trainer(compose_config(tiny(tmp_path)), run)
    name, weight = next(iter(trainer.model.named_parameters()))

    def after_step(optimizer, args, kwargs):
        if (trainer.epoch, trainer.iteration) == (1, 3):  # the last of the epoch's 4 iterations
            with torch.no_grad():
                weight.fill_(math.nan)

    trainer.optimizer.register_step_post_hook(after_step)
    with pytest.raises(NonFiniteLossError, match=f"weights {name} .* are NaN or Inf after epoch 1 iteration 3; "
                                                 "stopped, .* is the last good checkpoint"):
        trainer.fit()
    assert [row["epoch"] for row in read_metrics(run)] == [0]
    assert load_checkpoint(run / "checkpoint_last.pt")["epoch"] == 1
    assert not (run / "matchings" / "epoch_0001.npz").exists()


def test_diverging_run_exits_2_with_one_line(tmp_path):
    """A learning rate of 1e30 blows the weights up within a step or two: a real divergence, no injection."""
    run = tmp_path / "run"
    result = run_train(run, tiny(tmp_path, "trainer.epochs=1", "optim.lr=1e30", "optim.lr_backbone=1e30"),
                       check=False, timeout=300)
    line = assert_one_error_line(result, "NaN or Inf", "at epoch 0 iteration", "stopped before the first checkpoint")
    assert (run / "error.txt").read_text() == line + "\n"
    assert not (run / "checkpoint_last.pt").exists()


# -- extreme object counts -------------------------------------------------------------------------------------
def assert_finite_losses(rows: list) -> None:
    for row in rows:
        losses = {k: v for k, v in row.items() if k == "train_loss" or "loss_" in k}
        assert losses and all(math.isfinite(v) for v in losses.values()), row


@pytest.mark.parametrize("groups", [0, 2])
def test_batches_without_objects_train(tmp_path, groups):
    run = tmp_path / "run"
    run_train(run, tiny(tmp_path, "data.synthetic.max_objects=0", "trainer.epochs=2", f"dn.groups={groups}"))
    rows = read_metrics(run)
    assert [row["epoch"] for row in rows] == [0, 1]
    assert_finite_losses(rows)
    assert all(row["loss_bbox"] == 0 and row["loss_ce"] > 0 for row in rows)  # only "no object" to learn


def write_coco(root: Path, objects_per_image: list, size=(200, 160)) -> Path:
    """A COCO-layout folder (same images for train and val) with a grid of 4x4 px boxes in each image."""
    width, height = size
    grid = [(x, y) for y in range(0, height, 8) for x in range(0, width, 8)]
    images = [{"id": i + 1, "file_name": f"{i + 1}.png", "width": width, "height": height}
              for i in range(len(objects_per_image))]
    annotations = [{"id": len(grid) * image["id"] + k, "image_id": image["id"], "category_id": 1 + k % 2,
                    "bbox": [x, y, 4, 4]}
                   for image, count in zip(images, objects_per_image) for k, (x, y) in enumerate(grid[:count])]
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        for image in images:
            Image.new("RGB", size, (40 * image["id"], 90, 20)).save(root / split / image["file_name"])
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations,
             "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return root


def test_image_with_500_objects_trains_next_to_an_empty_one(tmp_path):
    root = write_coco(tmp_path / "coco", [500, 0])
    run = tmp_path / "run"
    run_train(run, TINY + ["data=coco", f"data.root={root}", "trainer.epochs=2", "dn.groups=2"])
    rows = read_metrics(run)
    assert [row["epoch"] for row in rows] == [0, 1]
    assert_finite_losses(rows)
    assert rows[-1]["dn_loss_bbox"] > 0  # 2 groups x 500 noised boxes were reconstructed


# -- broken dataset files ------------------------------------------------------------------------------------
DATA_FAULTS = {
    # a missing image is only found when a worker process loads it: the line must still be the dataset's own
    "missing image": ("train2017/2.png", lambda path: path.unlink(), "is missing", ["data.num_workers=1"]),
    "corrupt image": ("train2017/2.png", lambda path: path.write_bytes(b"\x89PNG garbage"), "corrupt", []),
    "corrupt json": ("annotations/instances_train2017.json", lambda path: path.write_text('{"images": [1,'),
                     "is not valid JSON", []),
}


@pytest.mark.parametrize("case", list(DATA_FAULTS))
def test_broken_dataset_file_exits_2_naming_the_file(tmp_path, case):
    relative, damage, expected, overrides = DATA_FAULTS[case]
    root = write_coco(tmp_path / "coco", [3, 1])
    damage(root / relative)
    run = tmp_path / "run"
    result = run_train(run, TINY + ["data=coco", f"data.root={root}", "trainer.epochs=1", *overrides],
                       check=False, timeout=300)
    assert_one_error_line(result, str(root / relative), expected)
    assert not (run / "checkpoint_last.pt").exists()


# -- sweeps ------------------------------------------------------------------------------------------------------
def run_script(args: list, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_failed_sweep_job_leaves_the_others_and_is_reported(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script([REPO_ROOT / "train.py", "-m", *tiny(tmp_path, "trainer.epochs=1"), "dn.box_noise=0.2,1.5",
                         f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["epoch"] for row in read_metrics(sweep / "0")] == [0] and not (sweep / "0" / "error.txt").exists()
    error = (sweep / "1" / "error.txt").read_text()
    assert error.startswith("error: dn.box_noise=1.5 is invalid") and not (sweep / "1" / "metrics.jsonl").exists()

    report = run_script([REPO_ROOT / "analysis" / "instability.py", sweep, "--out", tmp_path / "report"])
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"`{sweep / '1'}`: {error.strip()}" in report.stdout
    assert error.strip() in (tmp_path / "report" / "failures.md").read_text()
    summary = {row["setting"]: row for row in csv_rows(tmp_path / "report" / "summary.csv")}
    assert (summary["dn.box_noise=0.2"]["n_seeds"], summary["dn.box_noise=0.2"]["n_failed"]) == ("1", "0")
    assert (summary["dn.box_noise=1.5"]["n_seeds"], summary["dn.box_noise=1.5"]["n_failed"]) == ("0", "1")


def csv_rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- checkpoints given by the user -----------------------------------------------------------------------------
class Foreign:
    """Not a tensor or a plain container: the restricted unpickler must refuse it."""

    def __init__(self):
        self.weights = torch.zeros(2)


def truncated(path: Path) -> None:
    torch.save({"model": {"query_embed.weight": torch.randn(10, 32)}}, path)
    path.write_bytes(path.read_bytes()[:100])


CHECKPOINT_FAULTS = {
    "truncated": (truncated, "is unreadable (truncated, corrupt or not a torch file)"),
    "foreign": (lambda path: torch.save({"model": Foreign()}, path), "is refused: it pickles test_faults.Foreign"),
    "text": (lambda path: path.write_text("these are not the weights you are looking for\n"), "is unreadable"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_FAULTS))
def test_bad_init_checkpoint_exits_2_with_one_line(tmp_path, case):
    write, expected = CHECKPOINT_FAULTS[case]
    checkpoint = tmp_path / "given.pth"
    write(checkpoint)
    run = tmp_path / "run"
    result = run_train(run, tiny(tmp_path, "trainer.epochs=1", f"model.init_from={checkpoint}"), check=False,
                       timeout=300)
    assert_one_error_line(result, str(checkpoint), expected)
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint_last.pt").exists()


def test_preemption_signal_while_loading_a_sample_saves_the_training_rng(tmp_path, monkeypatch):
    """The signal lands inside a sample's augmentation, where the global RNG is forked and seeded for that sample;
    the save waits until the batch is loaded, so the checkpoint holds the RNG of the last whole iteration."""
    import signal

    from dndetr.distributed import PreemptionHook

    trainer = Trainer(compose_config(tiny(tmp_path, "model.dropout=0.1", "dn.groups=2")), tmp_path / "run")
    after_steps, saved = [], []
    train_step = trainer.train_step

    def recording_step(*batch):
        result = train_step(*batch)
        after_steps.append(torch.get_rng_state())
        return result

    monkeypatch.setattr(trainer, "train_step", recording_step)
    load = type(trainer.train_set.dataset).__getitem__

    def signalling_load(dataset, index):
        if len(after_steps) == 2 and not saved:  # loading the third batch
            os.kill(os.getpid(), signal.SIGUSR2)
        return load(dataset, index)

    monkeypatch.setattr(type(trainer.train_set.dataset), "__getitem__", signalling_load)

    class Requeued(Exception):
        pass

    def submitit_handler(signum, frame):  # what submitit does after the save: requeue and leave
        raise Requeued

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        trainer.preemption = PreemptionHook(lambda: saved.append((trainer.iteration, torch.get_rng_state())),
                                            signal.SIGUSR2)
        with pytest.raises(Requeued):
            trainer.train_one_epoch()
    finally:
        trainer.preemption.remove()
        signal.signal(signal.SIGUSR2, previous)
    assert len(saved) == 1 and saved[0][0] == 2  # two whole iterations
    assert torch.equal(saved[0][1], after_steps[-1])
