"""What users of detrex / MMDetection expect around training: predict.py, the export command, the TensorBoard
logger, per-class AP, checkpoint_best.pt, pictures of the matching and a --help without internal schemas."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from dndetr import instability as inst
from dndetr.config import ConfigError, LoggerConfig
from dndetr.evaluation import coco_ap, improves
from dndetr.loggers import NoLogger, build_logger, flat_numbers
from dndetr.matching_pictures import object_queries, parse_epochs
from dndetr.models import build_model
from dndetr.official import is_official, load_checkpoint_file, official_to_ours
from dndetr.predict import pixel_box
from dndetr.trainer import BEST_CHECKPOINT, Trainer
from helpers import REPO_ROOT, compose_config, read_metrics, run_train, tiny

TINY_RUN_EPOCHS = 3


def run_script(args, check=False):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, check=check)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder, run folder) of one tiny 3-epoch run with the TensorBoard logger on every iteration."""
    root = tmp_path_factory.mktemp("tools")
    run_train(root / "run", tiny(root, "logger=tensorboard", "logger.every_iters=1",
                                 f"trainer.epochs={TINY_RUN_EPOCHS}"))
    return root, root / "run"


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# evaluation: per-class AP and the best checkpoint


def small_coco() -> COCO:
    """Two images, three categories; 'square' has no ground truth; the names 'disc' appear twice."""
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "disc"}, {"id": 2, "name": "square"}, {"id": 3, "name": "disc"},
                       {"id": 4, "name": "star"}],
        "annotations": [{"id": k + 1, "image_id": image, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": 0} for k, (image, cat, box) in enumerate([
                             (1, 1, [10, 10, 30, 30]), (1, 3, [50, 50, 40, 20]), (2, 1, [5, 60, 20, 30]),
                             (2, 4, [40, 10, 50, 50]), (2, 4, [0, 0, 10, 10])])]}
    coco.createIndex()
    return coco


def test_per_class_ap_averages_to_ap():
    coco = small_coco()
    detections = [{"image_id": 1, "category_id": 1, "bbox": [12, 10, 30, 28], "score": 0.9},  # good
                  {"image_id": 2, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.8},  # wrong place
                  {"image_id": 1, "category_id": 3, "bbox": [50, 52, 40, 20], "score": 0.7},
                  {"image_id": 2, "category_id": 4, "bbox": [40, 10, 50, 45], "score": 0.6},
                  {"image_id": 2, "category_id": 2, "bbox": [0, 0, 50, 50], "score": 0.5}]  # no GT square
    result = coco_ap(coco, detections)
    per_class = result["AP_per_class"]
    assert set(per_class) == {"disc (1)", "square", "disc (3)", "star"}  # the shared name keeps both classes
    assert per_class["square"] is None
    values = [v for v in per_class.values() if v is not None]
    assert len(set(values)) > 1 and 0 < result["AP"] < 1
    assert np.mean(values) == pytest.approx(result["AP"], abs=1e-12)


def test_best_means_strictly_higher_ap():
    rows = [{"epoch": 0, "AP": 0.2}, {"epoch": 1, "AP": None}, {"epoch": 2, "AP": 0.1}]
    assert improves([], {"epoch": 0, "AP": 0.0})
    assert improves(rows, {"epoch": 3, "AP": 0.25})
    assert not improves(rows, {"epoch": 3, "AP": 0.2})
    assert not improves(rows, {"epoch": 3, "AP": None})
    assert improves(rows + [{"epoch": 4, "AP": 0.9}], {"epoch": 3, "AP": 0.25})  # later epochs do not count


def test_best_checkpoint_changes_only_when_ap_improves(tmp_path):
    (tmp_path / "run").mkdir()
    trainer = Trainer(compose_config(tiny(tmp_path, "instability.enabled=false")), tmp_path / "run")
    best = tmp_path / "run" / BEST_CHECKPOINT
    saved = []
    for epoch, ap in enumerate([0.1, 0.05, 0.1, None, 0.3, 0.2]):
        with torch.no_grad():
            trainer.model.class_embed.bias.fill_(epoch)  # a different model every epoch
        row = {"epoch": epoch, "AP": ap}
        trainer.save_best(row)
        trainer.metrics.append(row)
        state = torch.load(best, map_location="cpu", weights_only=True)
        assert float(state["model"]["class_embed.bias"][0]) == state["epoch"]
        saved.append(state["epoch"])
    assert saved == [0, 0, 0, 0, 4, 4]


@pytest.mark.slow
def test_run_logs_per_class_ap_and_keeps_the_best_checkpoint(trained):
    _, run = trained
    rows = read_metrics(run)
    for row in rows:
        with_gt = [v for v in row["AP_per_class"].values() if v is not None]
        assert set(row["AP_per_class"]) == {"red rectangle", "green ellipse", "blue triangle"}
        assert np.mean(with_gt) == pytest.approx(row["AP"], abs=1e-9)
    best = torch.load(run / BEST_CHECKPOINT, map_location="cpu", weights_only=True)
    aps = [row["AP"] for row in rows]
    assert best["epoch"] == int(np.argmax(aps)) and best["AP"] == max(aps)  # the first epoch with the best AP
    assert "AP per class: red rectangle=" in (run / "train.log").read_text()


# ----------------------------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_is_needed_only_when_chosen(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    assert isinstance(build_logger(LoggerConfig(), tmp_path), NoLogger)
    with pytest.raises(ConfigError, match="logger=tensorboard is invalid: the tensorboard package"):
        build_logger(LoggerConfig(name="tensorboard"), tmp_path)
    assert flat_numbers("epoch", {"AP": 0.5, "precision": "fp32", "AP75": None, "ok": True,
                                  "AP_per_class": {"cat": 0.25, "dog": None}}) == {"epoch/AP": 0.5,
                                                                                   "epoch/AP_per_class/cat": 0.25}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed ([test] extra)")
def test_tensorboard_events_hold_the_logged_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = trained
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    rows = read_metrics(run)
    for key in ("AP", "AP50", "train_loss", "lr", "AP_per_class/red rectangle"):
        scalars = events.Scalars(f"epoch/{key}")
        assert [s.step for s in scalars] == [row["epoch"] for row in rows]
        expected = [row["AP_per_class"]["red rectangle"] if "/" in key else row[key] for row in rows]
        assert [s.value for s in scalars] == pytest.approx(expected, rel=1e-6)
    losses = events.Scalars("train/loss")
    iterations = TINY_RUN_EPOCHS * 16 // 4  # 16 training images, batches of 4, logged every iteration
    assert [s.step for s in losses] == list(range(1, iterations + 1))
    assert all(np.isfinite(s.value) and s.value > 0 for s in losses)
    assert "epoch/precision" not in tags  # text values are not scalars


# ----------------------------------------------------------------------------------------------------------------
# predict.py and the export command


def predict(root, out, checkpoint, *images, extra=()):
    return run_script(["predict.py", *tiny(root), f"hydra.run.dir={out}", f"model.init_from={checkpoint}",
                       f"+images=[{','.join(map(str, images))}]", *extra])


@pytest.mark.slow
def test_predict_draws_only_inside_the_boxes_and_writes_coco_results(trained):
    root, run = trained
    images = sorted((root / "synthetic").glob("*/val2017/*.png"))[:2]
    result = predict(root, root / "pred", run / BEST_CHECKPOINT, *images, extra=["+score_threshold=0.0"])
    assert result.returncode == 0, result.stderr[-2000:]
    detections = json.loads((root / "pred" / "detections.json").read_text())
    gt = COCO()
    gt.dataset = json.loads((root / "pred" / "images.json").read_text())
    gt.createIndex()
    loaded = gt.loadRes(str(root / "pred" / "detections.json"))
    assert len(loaded.anns) == len(detections) == 2 * 10 and set(loaded.getImgIds()) == {1, 2}
    assert {c["name"] for c in gt.dataset["categories"]} >= {"red rectangle", "green ellipse", "blue triangle"}
    for image_id, path in enumerate(images, 1):
        original = np.asarray(Image.open(path).convert("RGB"))
        drawn = np.asarray(Image.open(root / "pred" / f"{path.stem}.png").convert("RGB"))
        inside = np.zeros(original.shape[:2], dtype=bool)
        for det in (d for d in detections if d["image_id"] == image_id):
            x, y, w, h = det["bbox"]
            x0, y0, x1, y1 = pixel_box((x, y, x + w, y + h), original.shape[1], original.shape[0])
            inside[y0:y1 + 1, x0:x1 + 1] = True
        changed = (original != drawn).any(axis=-1)
        assert changed.any() and not changed[~inside].any()


@pytest.mark.slow
def test_export_gives_an_official_checkpoint_that_predicts_the_same(trained):
    root, run = trained
    official = root / "official.pth"
    result = run_script(["-m", "dndetr.export", run, official])
    assert result.returncode == 0, result.stderr
    state = load_checkpoint_file(official)
    ours = torch.load(run / BEST_CHECKPOINT, map_location="cpu", weights_only=True)["model"]
    assert is_official(state) and any(k.startswith("transformer.decoder.") for k in state)
    back = official_to_ours(state, "conditional")
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    image = sorted((root / "synthetic").glob("*/val2017/*.png"))[0]
    for name, checkpoint in (("ours", run / BEST_CHECKPOINT), ("official", official)):
        assert predict(root, root / name, checkpoint, image).returncode == 0
    ours_json, official_json = (json.loads((root / n / "detections.json").read_text()) for n in ("ours", "official"))
    assert len(ours_json) == len(official_json) > 0
    np.testing.assert_allclose([d["bbox"] + [d["score"]] for d in ours_json],
                               [d["bbox"] + [d["score"]] for d in official_json], atol=1e-4)
    assert "already in the official layout" in one_line_error(run_script(["-m", "dndetr.export", official,
                                                                          root / "again.pth"]))
    bare = root / "bare.pt"
    torch.save(ours, bare)
    assert "--model" in one_line_error(run_script(["-m", "dndetr.export", bare, root / "bare_official.pth"]))


@pytest.mark.slow
def test_predict_on_coco_images_uses_coco_class_names(tmp_path, coco_mini):
    """A 91-class model on real COCO photos (their own sizes, JPEG input): names from the COCO categories."""
    overrides = [*tiny(tmp_path)[:-1], "data=coco", f"data.root={coco_mini}", "data.val_size=96", "data.max_size=128"]
    model = build_model(compose_config(overrides), 91)
    torch.save({"model": model.state_dict()}, tmp_path / "coco_model.pt")
    photo = sorted((coco_mini / "val2017").glob("*.jpg"))[0]
    result = run_script(["predict.py", *overrides, f"hydra.run.dir={tmp_path / 'pred'}", "+score_threshold=0",
                         f"model.init_from={tmp_path / 'coco_model.pt'}", f"+images={photo}"])
    assert result.returncode == 0, result.stderr[-2000:]
    categories = json.loads((tmp_path / "pred" / "images.json").read_text())["categories"]
    assert {"id": 1, "name": "person"} in categories and len(categories) == 91
    drawn = Image.open(tmp_path / "pred" / f"{photo.stem}.png")
    assert drawn.size == Image.open(photo).size
    boxes = np.array([d["bbox"] for d in json.loads((tmp_path / "pred" / "detections.json").read_text())])
    assert len(boxes) == 10 and (boxes[:, 2:] > 0).all()


@pytest.mark.slow  # two processes that import torch: ~30 s on a loaded machine
def test_predict_reports_missing_images_and_checkpoint_in_one_line(tmp_path):
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(image)
    missing_image = predict(tmp_path, tmp_path / "a", tmp_path / "none.pt", tmp_path / "nope.jpg")
    assert "nope.jpg is invalid: no such file or folder" in one_line_error(missing_image)
    missing_checkpoint = predict(tmp_path, tmp_path / "b", tmp_path / "none.pt", image)
    assert "none.pt" in one_line_error(missing_checkpoint) and "not found" in missing_checkpoint.stderr
    assert not list((tmp_path / "b").glob("*.png"))


# ----------------------------------------------------------------------------------------------------------------
# pictures of the matching


def test_object_queries_and_picture_epochs():
    assert object_queries(np.array([-1, 1, -1, 0, -1], dtype=np.int16), 3).tolist() == [3, 1, -1]
    assert parse_epochs("0,15") == (0, 15) and parse_epochs(None) is None
    with pytest.raises(ValueError, match="--picture-epochs"):
        parse_epochs("3")


def test_matched_boxes_are_optional_in_the_npz(tmp_path):
    arrays = {"image_ids": [1, 2], "assign": np.array([[[0, -1, 1], [-1, 0, -1]]]), "cost": np.zeros((1, 2, 3)),
              "num_objects": [2, 1], "layers": [5]}
    inst.save_epoch(tmp_path, 0, **arrays)  # a file as recorded before the boxes were added
    assert inst.load_epoch(tmp_path, 0, with_boxes=True).boxes is None
    boxes = np.full((2, 3, 4), np.nan, dtype=np.float32)
    boxes[0, [0, 2]] = 0.5
    boxes[1, 1] = 0.25
    inst.save_epoch(tmp_path, 1, **arrays, boxes=boxes)
    assert np.array_equal(inst.load_epoch(tmp_path, 1, with_boxes=True).boxes, boxes, equal_nan=True)
    assert inst.load_epoch(tmp_path, 1).boxes is None  # not read unless asked for
    with pytest.raises(ValueError, match="boxes has shape"):
        inst.save_epoch(tmp_path, 2, **arrays, boxes=boxes[:, :2])


@pytest.mark.slow
def test_matching_pictures_are_written_for_a_recorded_run(trained):
    root, run = trained
    record = inst.load_epoch(run, TINY_RUN_EPOCHS - 1, with_boxes=True)
    matched = record.assign[-1] != inst.UNMATCHED
    assert matched.any() and np.isfinite(record.boxes[matched]).all() and np.isnan(record.boxes[~matched]).all()
    spec = importlib.util.spec_from_file_location("analysis_instability", REPO_ROOT / "analysis" / "instability.py")
    analysis = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(analysis)
    analyse = analysis.main
    out = root / "report"
    last = TINY_RUN_EPOCHS - 1
    assert analyse([str(run), "--out", str(out), "--pictures", "2", "--picture-epochs", f"0,{last}"]) == 0
    pictures = sorted((out / "matching_pictures" / "run").glob("matching_image*.png"))
    assert len(pictures) == 2 and all(Image.open(p).size[0] > 500 for p in pictures)
    assert analyse([str(run), "--out", str(out), "--pictures", "1", "--picture-epochs", "0"]) == 2


# ----------------------------------------------------------------------------------------------------------------
# --help


@pytest.mark.slow  # three processes that import torch
def test_help_lists_user_facing_groups_only():
    result = run_script(["train.py", "--help"], check=True)
    groups = result.stdout.split("== Config groups")[1].split("== Config (")[0]
    assert "schema" not in groups and "\nstudy:" not in groups
    models = ", ".join(sorted(path.stem for path in (REPO_ROOT / "conf" / "model").glob("*.yaml")))
    assert f"model: {models}" in groups and "logger: none, tensorboard" in groups
    for misuse in ("model=schema", "+schema/model=detr"):
        assert "internal schemas" in one_line_error(run_script(["train.py", misuse]))


def test_only_schema_overrides_are_refused():
    import train

    assert train.schema_override(["data.root=schema_data", "+images=schema.png", "model=dab"]) == ""
    assert train.schema_override(["model=dab", "model=schema/detr"]) == "model=schema/detr"
    assert train.schema_override(["~schema/trainer"]) == "~schema/trainer"
