"""trainer.precision (fp32 / bf16 / fp16 autocast) and the GIoU epsilon each model's published code uses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import generalized_box_iou as torchvision_giou

from dndetr.boxes import generalized_box_iou, paired_generalized_box_iou
from dndetr.config import LossConfig, MatcherConfig
from dndetr.criterion import SetCriterion
from dndetr.matcher import HungarianMatcher
from helpers import compose_config, read_metrics, run_train, tiny, without_timing
from test_config import assert_one_error_line


def test_bf16_run_resumes_exactly_and_records_its_precision(tmp_path):
    overrides = tiny(tmp_path, "trainer.precision=bf16", "trainer.checkpoint_every_iters=1", "dn.groups=2")
    reference = tmp_path / "reference"
    run_train(reference, overrides)
    run = tmp_path / "killed"
    killed = run_train(run, overrides, env={"DNDETR_KILL_AT": "iteration:1:2"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_train(run, overrides)
    rows = read_metrics(run)
    assert without_timing(rows) == without_timing(read_metrics(reference))
    assert {row["precision"] for row in rows} == {"bf16"}
    assert "precision bf16" in (run / "train.log").read_text()
    for epoch in range(3):
        a, b = (np.load(r / "matchings" / f"epoch_000{epoch}.npz") for r in (run, reference))
        assert (a["assign"] == b["assign"]).all()


def test_bf16_autocast_changes_the_numbers_only_slightly(tmp_path):
    from dndetr.trainer import Trainer

    losses = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        run.mkdir()
        trainer = Trainer(compose_config(tiny(tmp_path, f"trainer.precision={precision}")), run)
        images, masks, targets = next(iter(torch.utils.data.DataLoader(
            trainer.train_set, batch_size=4, collate_fn=__import__("dndetr.data", fromlist=["collate"]).collate)))
        losses[precision] = trainer.train_step(images, masks, targets)["loss"]
    assert losses["fp32"] != losses["bf16"]  # autocast really ran in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_fp16_on_cpu_is_refused_with_one_line(tmp_path):
    result = run_train(tmp_path / "run", tiny(tmp_path, "trainer.precision=fp16", "trainer.device=cpu"), check=False)
    assert_one_error_line(result, "trainer.precision='fp16' is invalid", "use bf16 on CPU")


@pytest.mark.parametrize("model, eps", [("detr", 0.0), ("conditional", 0.0), ("dab", 1e-6)])
def test_each_model_uses_its_published_giou_epsilon(model, eps):
    assert compose_config([f"model={model}"]).loss.giou_eps == eps


def test_giou_epsilon_matters_for_small_boxes_and_vanishes_at_zero():
    # a box of side 1 % of the image and a prediction shifted by half its side
    target = torch.tensor([[0.5, 0.5, 0.51, 0.51]])
    pred = torch.tensor([[0.505, 0.505, 0.515, 0.515]])
    plain = torchvision_giou(pred, target)
    assert torch.equal(generalized_box_iou(pred, target, 0.0), plain)
    assert torch.equal(paired_generalized_box_iou(pred, target, 0.0), plain[:, 0])
    with_eps = generalized_box_iou(pred, target, 1e-6)
    assert (plain - with_eps).abs().item() > 1e-4  # 2e-4 here: the published DAB/DN-DETR numbers differ
    # and the matcher and the loss both use the configured epsilon
    loss = LossConfig(class_loss="focal", giou_eps=1e-6)
    criterion = SetCriterion(HungarianMatcher(MatcherConfig(cost_class=0, cost_bbox=0, cost_giou=1), loss), 3, loss)
    boxes = lambda xyxy: torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), dim=1)  # noqa: E731
    _, giou_loss = criterion.box_losses(boxes(pred)[None], boxes(target)[None], 1.0)  # one layer
    assert giou_loss.item() == pytest.approx(1 - with_eps.item(), abs=1e-6)
    cost = criterion.matcher.cost_matrices({"pred_logits": torch.zeros(1, 1, 3), "pred_boxes": boxes(pred)[None]},
                                           [{"labels": torch.tensor([1]), "boxes": boxes(target)}])[0]
    assert cost.item() == pytest.approx(-with_eps.item(), abs=1e-6)


@pytest.mark.parametrize("capability, device, expected", [
    ({"amx_bf16": True, "avx512_bf16": True}, "cpu", "bf16"),
    ({"amx_bf16": False, "avx512_bf16": True}, "cpu", "bf16"),
    ({"amx_bf16": False, "avx512_bf16": False}, "cpu", "fp32"),
    ({}, "cpu", "fp32"),
    ({"amx_bf16": True, "avx512_bf16": True}, "cuda", "fp32"),
])
def test_auto_precision_is_bf16_only_on_cpus_with_bf16_units(monkeypatch, capability, device, expected):
    from dndetr import device as device_module

    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: capability)
    assert device_module.pick_precision("auto", torch.device(device)) == expected
    for explicit in ("fp32", "bf16"):  # an explicit choice is never overridden
        assert device_module.pick_precision(explicit, torch.device(device)) == explicit


def test_auto_run_records_what_it_resolved_to_and_resume_keeps_it(tmp_path, monkeypatch):
    """A run started with auto on a bf16 CPU and resumed where auto would mean fp32 continues in bf16, exactly as
    the uninterrupted run (the checkpoint records the resolved precision)."""
    from dndetr.trainer import Trainer

    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: {"amx_bf16": True})
    overrides = tiny(tmp_path, "trainer.precision=auto", "trainer.epochs=2")
    reference = Trainer(compose_config(overrides), tmp_path / "reference").fit()
    assert {row["precision"] for row in reference} == {"bf16"}
    run = tmp_path / "moved"
    Trainer(compose_config(tiny(tmp_path, "trainer.precision=auto", "trainer.epochs=1")), run).fit()
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: {})
    resumed = Trainer(compose_config(overrides), run)
    assert resumed.precision == "fp32"  # what auto means on this "machine" ...
    rows = resumed.fit()
    assert resumed.precision == "bf16"  # ... but the run continues as it started
    assert without_timing(rows) == without_timing(reference)
