"""Checks of a COCO annotation file, read once before training starts: every problem in one go, as one line.

The training job stops with ``AnnotationProblems`` (a ``DataError``): one line with the count of each kind of
problem and the first few of each; ``python -m dndetr.data.check`` prints them all. Image files are not opened
(``image_dir`` only checks that they exist). What is not an error is normalised, counted and logged once per file
(see ``clean``). Objects per image come from the index too, for the warning about too few queries.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image

from dndetr.data import DataError

log = logging.getLogger("dndetr")

# Labels index the classifier directly (class index = category id, as in DETR, so COCO's ids up to 90 keep the
# layout of the official checkpoints): the classifier gets largest id + 1 outputs. An id of 5,000,000 would make
# a 5M-way classifier of several GB, so ids are capped; LVIS (1203) and Objects365 (365) fit.
MAX_CATEGORY_ID = 10_000
FIRST = 3  # examples of each kind in the one-line message


def bomb_limit() -> int | None:
    """PIL refuses to open images of more pixels than this (a warning already from half of it); None: no limit."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


class AnnotationProblems(DataError):
    """Every problem found in one annotation file: ``{kind: [detail, ...]}`` in the order found.

    ``str()`` is the one-line summary (a single problem is said in full), ``report()`` the readable list.
    """

    def __init__(self, path: Path, problems: dict):
        self.path, self.problems = path, problems
        self.count = sum(len(details) for details in problems.values())
        super().__init__(self.summary())

    def __reduce__(self):  # picklable like other exceptions (a DataLoader worker or a sweep job may pass it on)
        return type(self), (self.path, self.problems)

    def summary(self) -> str:
        if self.count == 1:
            return f"annotation file {self.path}: {next(iter(self.problems.values()))[0]}"
        kinds = [f"{len(details)} {kind} (first: {', '.join(details[:FIRST])}{', ...' if len(details) > FIRST else ''})"
                 for kind, details in self.problems.items()]
        return f"annotation file {self.path} has {self.count} problems: {'; '.join(kinds)}"

    def report(self, first: int | None = None) -> list:
        """Readable lines: each kind with its count and its first ``first`` problems (all of them for None)."""
        lines = [f"{self.path}: {self.count} problem{'s' * (self.count > 1)}"]
        for kind, details in self.problems.items():
            lines.append(f"  {len(details)} {kind}:")
            lines += [f"    {detail}" for detail in details[:first]]
            if len(details) > len(details[:first]):
                lines.append(f"    ... and {len(details) - first} more (--first 0 lists all)")
        return lines


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_box(value) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(is_number(v) for v in value)


def outside_folder(file_name: str) -> bool:
    """An absolute name or one with a '..' part would read a file outside the image folder."""
    parts = PurePosixPath(file_name).parts + PureWindowsPath(file_name).parts
    return (PurePosixPath(file_name).is_absolute() or PureWindowsPath(file_name).is_absolute()
            or bool(PureWindowsPath(file_name).drive) or ".." in parts)


def read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except ValueError as err:
        raise DataError(f"annotation file {path} is not valid JSON: {err}") from None


def find_problems(data, path: Path, image_dir: Path | None = None) -> dict:
    """``{kind: [detail, ...]}`` for everything wrong in ``data``; ``image_dir`` also checks the files exist."""
    lists = ("images", "annotations", "categories")
    missing = [key for key in lists if not isinstance(data, dict) or not isinstance(data.get(key), list)]
    if missing:  # nothing else can be checked
        return {"files not in COCO format": [f"not in COCO format: no {', '.join(missing)} list"]}
    problems: dict = {}

    def add(kind: str, detail: str) -> None:
        problems.setdefault(kind, []).append(detail)

    image_ids = check_images(data["images"], add, image_dir)
    category_ids = check_categories(data["categories"], add)
    check_annotations(data["annotations"], add, image_ids, category_ids)
    return problems


def check_images(images: list, add, image_dir: Path | None) -> set:
    ids = set()
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not is_int(image.get("id")) or not isinstance(image.get("file_name"), str):
            add("malformed image entries", f"images[{i}] must be an object with an int id and a string file_name")
            continue
        if image["id"] in ids:
            add("duplicate image ids", f"images[{i}] repeats image id {image['id']}")
        ids.add(image["id"])
        width, height = image.get("width"), image.get("height")
        if not (is_int(width) and is_int(height) and width > 0 and height > 0):
            add("image sizes that are not positive ints",
                f"images[{i}] has width {width!r} and height {height!r}, expected positive ints")
        elif bomb_limit() is not None and width * height > bomb_limit():
            add("images over PIL's decompression-bomb limit", f"images[{i}] is {width}x{height}, more than "
                f"{bomb_limit()} pixels: downscale it")
        if outside_folder(image["file_name"]):
            add("file_names outside the image folder",
                f"images[{i}] has file_name {image['file_name']!r} (absolute or with '..')")
        elif image_dir is not None and not (image_dir / image["file_name"]).is_file():
            add("missing image files", f"images[{i}] file {image_dir / image['file_name']} does not exist")
    return ids


def check_categories(categories: list, add) -> set:
    if not categories:
        add("empty category lists", "the categories list is empty")
    ids = set()
    for i, category in enumerate(categories):
        value = category.get("id") if isinstance(category, dict) else None
        if not is_int(value) or value < 0:
            add("malformed categories", f"categories[{i}] has id {value!r}, expected an int >= 0")
            continue
        if value in ids:
            add("duplicate category ids", f"categories[{i}] repeats category id {value}")
        elif value > MAX_CATEGORY_ID:
            add(f"category ids above {MAX_CATEGORY_ID}", f"categories[{i}] has id {value} (the class index is the "
                f"category id, so the classifier would get {value + 1} outputs): renumber the categories 1..N")
        ids.add(value)
    return ids


def check_annotations(annotations: list, add, image_ids: set, category_ids: set) -> None:
    ids = set()
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]" + (f" (id {ann['id']!r})" if isinstance(ann, dict) and "id" in ann else "")
        keys = ("id", "image_id", "category_id", "bbox")
        if not isinstance(ann, dict) or any(key not in ann for key in keys):
            add("malformed annotations", f"{where} must be an object with keys {', '.join(keys)}")
            continue
        if not is_int(ann["id"]):
            add("annotation ids that are not ints", f"{where} has id {ann['id']!r}, expected an int")
        elif ann["id"] in ids:
            add("duplicate annotation ids", f"{where} repeats an earlier annotation's id")
        else:
            ids.add(ann["id"])
        if not is_box(ann["bbox"]):
            add("bad bboxes", f"{where} has bbox {ann['bbox']!r}, expected [x, y, width, height]")
        if not (is_int(ann["image_id"]) and ann["image_id"] in image_ids):
            add("unknown image_ids", f"{where} refers to unknown image_id {ann['image_id']!r}")
        if not (is_int(ann["category_id"]) and ann["category_id"] in category_ids):
            add("unknown category_ids", f"{where} has unknown category_id {ann['category_id']!r}")
        if ann.get("iscrowd") not in (None, 0, 1):  # True and False equal 1 and 0
            add("bad iscrowd values", f"{where} has iscrowd {ann['iscrowd']!r}, expected 0, 1 or null")
        if ann.get("area") is not None and not (is_number(ann["area"]) and ann["area"] >= 0):
            add("bad areas", f"{where} has area {ann['area']!r}, expected a number >= 0 or null")


def clean(data: dict) -> dict:
    """Fill in what COCOeval needs and leave out what training leaves out; returns ``{what was done: count}``.

    - ``iscrowd`` missing or null becomes 0 and ``area`` missing or null the box area (COCOeval reads both);
    - boxes with no width or height left once clipped to the image are removed from the index, as training drops
      them: COCOeval would otherwise count them as objects no detection can ever match (AP capped below 1).
    """
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    notes = dict.fromkeys(("iscrowd missing or null, set to 0", "area missing or null, set to the box area",
                           "boxes with no width or height inside the image, left out"), 0)
    kept = []
    for ann in data["annotations"]:
        if ann.get("iscrowd") is None:
            ann["iscrowd"] = 0
            notes["iscrowd missing or null, set to 0"] += 1
        if ann.get("area") is None:
            ann["area"] = ann["bbox"][2] * ann["bbox"][3]
            notes["area missing or null, set to the box area"] += 1
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        if min(x + w, width) > max(x, 0) and min(y + h, height) > max(y, 0):
            kept.append(ann)
        else:
            notes["boxes with no width or height inside the image, left out"] += 1
    data["annotations"] = kept
    return {what: count for what, count in notes.items() if count}


def load_annotations(path: Path, image_dir: Path | None = None) -> tuple:
    """Read, check and clean an annotation file: ``(data, notes)``; raises AnnotationProblems (one line)."""
    data = read_json(path)
    problems = find_problems(data, path, image_dir)
    if problems:
        raise AnnotationProblems(path, problems)
    notes = clean(data)
    if notes:
        log.warning("annotation file %s: %s", path, "; ".join(f"{count} {what}" for what, count in notes.items()))
    return data, notes


# -- objects per image -------------------------------------------------------------------------------------------
def object_counts(dataset) -> list:
    """Objects the training target of each image of a CocoDetection holds (no crowds), from the index alone."""
    return [sum(not ann["iscrowd"] for ann in dataset.coco.imgToAnns[image_id]) for image_id in dataset.ids]


def object_stats(dataset) -> tuple:
    """``(max, mean)`` objects per image; (0, 0.0) for no images."""
    counts = object_counts(dataset)
    return max(counts, default=0), sum(counts) / max(len(counts), 1)


def queries_warning(dataset, num_queries: int) -> str | None:
    """One line when some images hold more objects than there are queries (recall is then capped), else None."""
    counts = object_counts(dataset)
    over = [count for count in counts if count > num_queries]
    if not over:
        return None
    return (f"{len(over)} of {len(counts)} images of {dataset.ann_file} hold more objects than "
            f"model.num_queries={num_queries} (up to {max(over)}): each query detects at most one object, so "
            "their recall is capped; raise model.num_queries")
