"""Faults of real datasets: each is one clear line (or documented handling) found before training starts.

Every case damages a small copy of the built-in data; a few go through `python train.py` to show the line and the
exit code the user sees, and that an existing run folder survives a run that fails on bad data.
"""
from __future__ import annotations

import json
import logging
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from dndetr.config import ConfigError, DataConfig, SyntheticConfig
from dndetr.data import (AnnotationProblems, CocoDetection, DataError, build_dataset, ensure_synthetic, object_stats,
                         queries_warning)
from dndetr.data.annotations import MAX_CATEGORY_ID, bomb_limit
from dndetr.data.check import main as check_main
from dndetr.engine import coco_ap, load_checkpoint
from helpers import REPO_ROOT, TINY, compose_config, run_train
from test_config import assert_one_error_line

SMALL = SyntheticConfig(num_train=4, num_val=2, image_size=64, min_objects=2, max_objects=4, seed=5)
TRAIN_ANN = "annotations/instances_train2017.json"


@pytest.fixture(scope="module")
def built_in(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic"), SMALL)


@pytest.fixture
def data_copy(built_in, tmp_path) -> Path:
    """A private copy of the small built-in dataset, free to damage."""
    return Path(shutil.copytree(built_in, tmp_path / "coco"))


def edit(root: Path, change, relative: str = TRAIN_ANN) -> Path:
    """Apply ``change(data)`` to an annotation file of ``root``; returns the file."""
    path = root / relative
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def problems_of(root: Path, split: str = "train2017") -> str:
    with pytest.raises(DataError) as err:
        CocoDetection(root, split)
    message = str(err.value)
    assert "\n" not in message
    return message


def gt_as_detections(dataset: CocoDetection) -> list:
    """What a perfect model would output: every object of every training target, at score 1."""
    detections = []
    for index, image_id in enumerate(dataset.ids):
        _, target = dataset[index]
        for (x0, y0, x1, y1), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            detections.append({"image_id": image_id, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0],
                               "score": 1.0})
    return detections


# -- 1: duplicate annotation ids ---------------------------------------------------------------------------------
def test_duplicate_annotation_ids_are_rejected(data_copy):
    def duplicate(data):
        data["annotations"][2]["id"] = data["annotations"][0]["id"]

    path = edit(data_copy, duplicate)
    first = json.loads(path.read_text())["annotations"][0]["id"]
    message = problems_of(data_copy)
    assert message == f"annotation file {path}: annotations[2] (id {first}) repeats an earlier annotation's id"


# -- 2: null iscrowd / area -----------------------------------------------------------------------------------------
def test_null_iscrowd_and_area_are_normalised_and_logged_once(data_copy, caplog):
    def nulls(data):
        data["annotations"][0]["iscrowd"] = None
        data["annotations"][1]["area"] = None
        del data["annotations"][2]["area"]

    path = edit(data_copy, nulls)
    with caplog.at_level(logging.WARNING, logger="dndetr"):
        dataset = CocoDetection(data_copy, "train2017")
    anns = json.loads(path.read_text())["annotations"]
    assert dataset.coco.anns[anns[0]["id"]]["iscrowd"] == 0
    for ann in anns[1:3]:
        assert dataset.coco.anns[ann["id"]]["area"] == ann["bbox"][2] * ann["bbox"][3]
    assert dataset.notes == {"iscrowd missing or null, set to 0": 1, "area missing or null, set to the box area": 2}
    assert [r.getMessage() for r in caplog.records] == [
        f"annotation file {path}: 1 iscrowd missing or null, set to 0; 2 area missing or null, set to the box area"]
    assert coco_ap(dataset.coco, gt_as_detections(dataset))["AP"] == 1.0  # COCOeval runs on the cleaned index


@pytest.mark.parametrize("key, value", [("iscrowd", "yes"), ("area", -3)])
def test_bad_iscrowd_or_area_values_are_rejected(data_copy, key, value):
    path = edit(data_copy, lambda data: data["annotations"][1].update({key: value}))
    assert f"annotation file {path}: annotations[1] (id " in problems_of(data_copy)
    assert f"has {key} {value!r}, expected" in problems_of(data_copy)


# -- 3: category ids far too large --------------------------------------------------------------------------------
def test_category_id_above_the_limit_is_rejected(data_copy):
    def renumber(data, new_id):
        old = data["categories"][1]["id"]
        data["categories"][1]["id"] = new_id
        for ann in data["annotations"]:
            ann["category_id"] = new_id if ann["category_id"] == old else ann["category_id"]

    path = edit(data_copy, lambda data: renumber(data, 5_000_000))
    message = problems_of(data_copy)
    assert message.startswith(f"annotation file {path}: categories[1] has id 5000000")
    assert "5000001 outputs" in message and message.endswith("renumber the categories 1..N")
    edit(data_copy, lambda data: renumber(data, MAX_CATEGORY_ID))
    assert max(CocoDetection(data_copy, "train2017").coco.cats) == MAX_CATEGORY_ID


# -- 4: file names outside the image folder ---------------------------------------------------------------------
@pytest.mark.parametrize("file_name", ["/etc/hostname", "../outside.png", "sub/../../outside.png",
                                       "C:\\images\\a.png", "..\\outside.png"])
def test_file_name_outside_the_image_folder_is_rejected(data_copy, file_name):
    path = edit(data_copy, lambda data: data["images"][3].update(file_name=file_name))
    assert problems_of(data_copy) == (f"annotation file {path}: images[3] has file_name {file_name!r} "
                                      "(absolute or with '..')")


def test_file_name_in_a_subfolder_is_fine(data_copy):
    (data_copy / "train2017/sub").mkdir()
    (data_copy / "train2017/000000000001.png").rename(data_copy / "train2017/sub/a..b.png")
    edit(data_copy, lambda data: data["images"][0].update(file_name="sub/a..b.png"))
    image, _ = CocoDetection(data_copy, "train2017", check_files=True)[0]
    assert image.size == (SMALL.image_size, SMALL.image_size)


# -- 5: decompression bombs, sizes that are not ints ------------------------------------------------------------
def test_image_over_the_decompression_bomb_limit(data_copy, monkeypatch):
    side = int(bomb_limit() ** 0.5) + 1
    path = edit(data_copy, lambda data: data["images"][1].update(width=side, height=side))
    assert problems_of(data_copy) == (f"annotation file {path}: images[1] is {side}x{side}, more than "
                                      f"{bomb_limit()} pixels: downscale it")
    # an image larger than its annotation file says is caught when it is opened
    dataset = CocoDetection(data_copy, "val2017")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 64x64 images are now "bombs"
    with pytest.raises(DataError) as err:
        dataset[0]
    assert str(err.value) == (f"image file {data_copy / 'val2017/000000000001.png'} has more than 200 pixels, "
                              "PIL's decompression-bomb limit: downscale it")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user switched PIL's limit off
    assert len(CocoDetection(data_copy, "train2017")) == SMALL.num_train


@pytest.mark.parametrize("width, height", [("64", "64"), (64.0, 64), (None, 64), (0, 64)])
def test_image_size_must_be_positive_ints(data_copy, width, height):
    path = edit(data_copy, lambda data: data["images"][2].update(width=width, height=height))
    assert problems_of(data_copy) == (f"annotation file {path}: images[2] has width {width!r} and height "
                                      f"{height!r}, expected positive ints")


# -- 6: the data root is a file -----------------------------------------------------------------------------------
def test_data_root_that_is_a_file(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"^data root .*data\.zip is a file, not a folder$"):
        CocoDetection(tmp_path / "data.zip", "train2017")


# -- 13: degenerate boxes are left out of training and of the evaluation ground truth alike ------------------
def test_degenerate_box_is_left_out_of_the_ground_truth(data_copy):
    def degenerate(data):
        size = SMALL.image_size
        data["annotations"] += [
            {"id": 900, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0},
            {"id": 901, "image_id": 2, "category_id": 2, "bbox": [size + 2, 4, 6, 6], "area": 36, "iscrowd": 0},
            {"id": 902, "image_id": 3, "category_id": 1, "bbox": [-8, 4, 8, 6], "area": 48, "iscrowd": 0}]

    path = edit(data_copy, degenerate)
    dataset = CocoDetection(data_copy, "train2017")
    assert dataset.notes == {"boxes with no width or height inside the image, left out": 3}
    assert not {900, 901, 902} & set(dataset.coco.anns)
    assert coco_ap(dataset.coco, gt_as_detections(dataset))["AP"] == 1.0
    raw = COCO(str(path))  # what COCOeval scored before: objects no training target holds, never matched
    assert coco_ap(raw, gt_as_detections(dataset))["AP"] < 0.95


# -- objects per image against the number of queries -------------------------------------------------------------
def test_object_stats_and_the_queries_warning(data_copy):
    def counts(data):  # image 1: 5 objects and a crowd, image 2: 3, images 3 and 4: none
        box = {"category_id": 1, "bbox": [2, 2, 8, 8], "area": 64, "iscrowd": 0}
        data["annotations"] = ([{**box, "id": k, "image_id": 1} for k in range(5)]
                               + [{**box, "id": 5, "image_id": 1, "iscrowd": 1}]
                               + [{**box, "id": 6 + k, "image_id": 2} for k in range(3)])

    path = edit(data_copy, counts)
    dataset = CocoDetection(data_copy, "train2017")
    assert object_stats(dataset) == (5, 2.0)
    assert queries_warning(dataset, 5) is None
    assert queries_warning(dataset, 2) == (
        f"2 of 4 images of {path} hold more objects than model.num_queries=2 (up to 5): each query detects at most "
        "one object, so their recall is capped; raise model.num_queries")
    assert object_stats(CocoDetection(data_copy, "train2017", max_images=0)) == (0, 0.0)


# -- every problem in one go ----------------------------------------------------------------------------------
def many_problems(data):
    anns = data["annotations"]
    for k in (1, 2, 3, 4):
        anns[k]["id"] = anns[0]["id"]
    anns[5]["category_id"] = 77
    data["images"][1]["file_name"] = "../x.png"
    data["images"][2]["width"] = "64"


def test_every_problem_is_reported_in_one_line(data_copy):
    path = edit(data_copy, many_problems)
    first = json.loads(path.read_text())["annotations"][0]["id"]
    with pytest.raises(AnnotationProblems) as err:
        CocoDetection(data_copy, "train2017")
    assert str(err.value) == (
        f"annotation file {path} has 7 problems: "
        "1 file_names outside the image folder (first: images[1] has file_name '../x.png' (absolute or with '..')); "
        "1 image sizes that are not positive ints (first: images[2] has width '64' and height 64, expected "
        "positive ints); "
        f"4 duplicate annotation ids (first: annotations[1] (id {first}) repeats an earlier annotation's id, "
        f"annotations[2] (id {first}) repeats an earlier annotation's id, annotations[3] (id {first}) repeats an "
        "earlier annotation's id, ...); "
        "1 unknown category_ids (first: annotations[5] (id 6) has unknown category_id 77)")
    copy = pickle.loads(pickle.dumps(err.value))
    assert (str(copy), copy.problems) == (str(err.value), err.value.problems)


def test_check_command_reports_all_problems(data_copy, capsys):
    edit(data_copy, many_problems)
    (data_copy / "val2017/000000000002.png").unlink()
    assert check_main([str(data_copy), "--num-queries", "3"]) == 2
    out = capsys.readouterr().out
    assert "7 problems" in out and "  4 duplicate annotation ids:" in out
    assert out.count("repeats an earlier annotation's id") == 4  # all of them (up to 20), not the first three
    assert f"{data_copy / 'annotations/instances_val2017.json'}: ok" in out  # the clean file still gets its stats
    assert check_main([str(data_copy), "--first", "2"]) == 2
    out = capsys.readouterr().out
    assert out.count("repeats an earlier annotation's id") == 2 and "    ... and 2 more (--first 0 lists all)" in out
    assert check_main([str(data_copy), "--images"]) == 2
    out = capsys.readouterr().out
    assert f"images[1] file {data_copy / 'val2017/000000000002.png'} does not exist" in out


def test_check_command_on_clean_data(built_in):
    """As a real command: exit 0, statistics, nothing on stderr (the module is not imported by the package)."""
    result = subprocess.run([sys.executable, "-m", "dndetr.data.check", str(built_in), "--images", "--num-queries",
                             "2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    dataset = CocoDetection(built_in, "train2017")
    largest, mean = object_stats(dataset)
    over = sum(len(dataset.coco.imgToAnns[i]) > 2 for i in dataset.ids)
    assert (f"objects per image (crowds left out): max {largest}, mean {mean:.2f}; {over} image"
            in result.stdout)
    assert f"{len(dataset)} images, {len(dataset.coco.anns)} annotations, {SMALL.num_classes} categories" \
        in result.stdout


# -- issue 16: annotation files named by the tool that wrote them ---------------------------------------------
ROBOFLOW = ["data.train_split=train", "data.train_ann=train/_annotations.coco.json", "data.val_split=valid",
            "data.val_ann=valid/_annotations.coco.json"]


def roboflow_layout(built_in: Path, root: Path) -> Path:
    """The built-in data laid out as Roboflow exports it: <split>/ with the images and _annotations.coco.json."""
    for source, split in (("train2017", "train"), ("val2017", "valid")):
        shutil.copytree(built_in / source, root / split)
        shutil.copy(built_in / f"annotations/instances_{source}.json", root / split / "_annotations.coco.json")
    return root


def test_annotation_file_names_are_settings(built_in, tmp_path):
    root = roboflow_layout(built_in, tmp_path / "roboflow")
    cfg = compose_config(["data=coco", f"data.root={root}", *ROBOFLOW]).data
    train, val = build_dataset(cfg, "train", train_augment=False), build_dataset(cfg, "val", train_augment=False)
    assert (train.ann_file, val.ann_file) == (root / cfg.train_ann, root / cfg.val_ann)
    assert (len(train), len(val)) == (SMALL.num_train, SMALL.num_val)
    reference = CocoDetection(built_in, "val2017")
    assert val.coco.dataset == reference.coco.dataset and val[1][1]["labels"].tolist() == \
        reference[1][1]["labels"].tolist()
    assert compose_config([]).data.train_ann is None  # the default keeps annotations/instances_<split>.json
    with pytest.raises(DataError, match=r"annotation file .*nowhere\.json not found .* data\.train_ann"):
        CocoDetection(root, "train", ann_file="nowhere.json")
    with pytest.raises(ConfigError, match="data.val_ann=''"):
        DataConfig(val_ann="")


# -- through train.py -------------------------------------------------------------------------------------------
TRAIN_FAULTS = {
    "duplicate ids": (lambda data: data["annotations"][1].update(id=data["annotations"][0]["id"]),
                      ["annotations[1] (id", "repeats an earlier annotation's id"]),
    "huge category id": (lambda data: data["categories"][0].update(id=5_000_000),
                         ["categories[0] has id 5000000", "renumber the categories 1..N"]),
    "file outside": (lambda data: data["images"][0].update(file_name="/etc/hostname"),
                     ["images[0] has file_name '/etc/hostname'"]),
}


@pytest.mark.parametrize("case", list(TRAIN_FAULTS))
def test_train_stops_with_one_line_before_training(data_copy, tmp_path, case):
    change, expected = TRAIN_FAULTS[case]
    path = edit(data_copy, change)
    run = tmp_path / "run"
    result = run_train(run, TINY + ["data=coco", f"data.root={data_copy}"], check=False, timeout=300)
    assert_one_error_line(result, f"annotation file {path}", *expected)
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint_last.pt").exists()


def test_root_that_is_a_file_through_train(tmp_path):
    (tmp_path / "coco.tar").write_bytes(b"not a folder")
    result = run_train(tmp_path / "run", TINY + ["data=coco", f"data.root={tmp_path / 'coco.tar'}"], check=False,
                       timeout=300)
    assert_one_error_line(result, f"data root {tmp_path / 'coco.tar'} is a file, not a folder")


@pytest.mark.slow  # two train.py processes, one of which trains an epoch: about 20 s under load
def test_run_folder_survives_a_run_that_fails_on_bad_data(data_copy, tmp_path):
    run, overrides = tmp_path / "run", TINY + ["data=coco", f"data.root={data_copy}", "trainer.epochs=1"]
    run_train(run, overrides, timeout=300)
    before = {name: (run / name).read_bytes() for name in ("checkpoint_last.pt", "metrics.jsonl")}
    edit(data_copy, many_problems)
    result = run_train(run, overrides[:-1] + ["trainer.epochs=2"], check=False, timeout=300)
    assert_one_error_line(result, "has 7 problems", "4 duplicate annotation ids")
    assert {name: (run / name).read_bytes() for name in before} == before
    assert load_checkpoint(run / "checkpoint_last.pt")["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]
