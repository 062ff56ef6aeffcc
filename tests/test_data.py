import json
import multiprocessing
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from dndetr.config import ConfigError, DataConfig, SyntheticConfig
from dndetr.data import CocoDetection, DataError, build_dataset, build_transforms, collate, ensure_synthetic, num_classes
from dndetr.data import synthetic
from dndetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomSizeCrop
from dndetr.sampling import SeededSamples

torch.set_num_threads(1)
COCO_MINI = Path(os.environ.get("DNDETR_COCO_MINI", Path(__file__).resolve().parents[2] / "shared/data/coco_mini"))
SMALL = SyntheticConfig(num_train=12, num_val=4, image_size=64, min_objects=2, max_objects=6, seed=3)
# the small-image settings of the default CPU job
CPU_DATA = dict(train_scales=[96, 112, 128], max_size=160, val_size=128, crop_min=64, crop_max=128,
                crop_resize=[96, 112, 128])


def read_tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic"), SMALL)


# ---------------------------------------------------------------- synthetic data

def test_synthetic_is_deterministic(tmp_path, small_synthetic):
    again = ensure_synthetic(tmp_path / "a", SMALL)
    assert again.name == small_synthetic.name
    assert read_tree(again) == read_tree(small_synthetic)
    other = ensure_synthetic(tmp_path / "b", SyntheticConfig(**{**vars(SMALL), "seed": 4}))
    assert other.name != again.name
    assert load_json(other / "annotations/instances_train2017.json")["annotations"] != \
        load_json(again / "annotations/instances_train2017.json")["annotations"]


def test_synthetic_layout_counts_and_classes(small_synthetic):
    for split, count in (("train2017", SMALL.num_train), ("val2017", SMALL.num_val)):
        data = load_json(small_synthetic / f"annotations/instances_{split}.json")
        assert len(data["images"]) == count == len(list((small_synthetic / split).glob("*.png")))
        assert [c["id"] for c in data["categories"]] == list(range(1, SMALL.num_classes + 1))
        assert [c["name"] for c in data["categories"]] == ["red rectangle", "green ellipse", "blue triangle"]
        per_image = [sum(a["image_id"] == image["id"] for a in data["annotations"]) for image in data["images"]]
        assert all(SMALL.min_objects <= n <= SMALL.max_objects for n in per_image)
        assert len({a["category_id"] for a in data["annotations"]}) == SMALL.num_classes
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= SMALL.image_size and y + h <= SMALL.image_size
            assert SMALL.min_size * SMALL.image_size - 1 <= max(w, h) <= SMALL.max_size * SMALL.image_size + 1
            assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0


def test_synthetic_images_are_stored_uncompressed_and_lossless(small_synthetic):
    """Uncompressed PNGs decode 5x faster (GENERATOR_VERSION 2); the pixels are the drawn ones either way."""
    from dndetr.data.synthetic import draw_image

    rng = np.random.default_rng([SMALL.seed, 0])  # the train split's stream
    pixels, _ = draw_image(rng, SMALL)
    first = small_synthetic / "train2017/000000000001.png"
    assert first.stat().st_size >= pixels.nbytes
    assert np.array_equal(np.asarray(Image.open(first).convert("RGB")), pixels)


def test_synthetic_boxes_are_tight(small_synthetic):
    """The last-drawn object of each image is unoccluded: each side of its box touches its colour and all its pixels
    (its area) lie inside the box (an earlier object of the same class may add more)."""
    data = load_json(small_synthetic / "annotations/instances_train2017.json")
    names = {c["id"]: c["name"] for c in data["categories"]}
    for image in data["images"]:
        pixels = np.asarray(Image.open(small_synthetic / "train2017" / image["file_name"]))
        top = [a for a in data["annotations"] if a["image_id"] == image["id"]][-1]
        colour = synthetic.COLOURS[names[top["category_id"]].split()[0]]
        x, y, w, h = map(int, top["bbox"])
        inside = np.all(pixels[y:y + h, x:x + w] == colour, axis=-1)
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert inside.sum() >= top["area"]


def test_ensure_synthetic_reuses_existing_data(tmp_path):
    first = ensure_synthetic(tmp_path, SMALL)
    stamp = (first / "annotations/instances_val2017.json").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, SMALL) == first
    assert (first / "annotations/instances_val2017.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_killed_generation_leaves_nothing(tmp_path, monkeypatch):
    def write_then_die(out, cfg):
        (out / "annotations").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_dataset", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path, SMALL)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_generation_is_safe(tmp_path):
    with multiprocessing.get_context("fork").Pool(3) as pool:
        paths = pool.starmap(ensure_synthetic, [(tmp_path, SMALL)] * 3)
    assert len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]
    assert len(CocoDetection(paths[0], "train2017")) == SMALL.num_train


def test_synthetic_rejects_too_many_classes(tmp_path):
    with pytest.raises(ConfigError, match="data.synthetic.num_classes=29"):
        ensure_synthetic(tmp_path, SyntheticConfig(num_classes=29))
    assert ensure_synthetic(tmp_path, SyntheticConfig(num_train=2, num_val=1, num_classes=28)).is_dir()


@pytest.mark.slow
def test_synthetic_generation_is_fast(tmp_path):
    import time
    start = time.perf_counter()
    ensure_synthetic(tmp_path, SyntheticConfig(num_train=500, num_val=1))
    assert time.perf_counter() - start < 15


# ---------------------------------------------------------------- loader, batching, build_dataset

def test_build_dataset_on_synthetic_with_cpu_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(root="relative/cache", synthetic=SMALL, **CPU_DATA)
    train, val = build_dataset(cfg, "train", train_augment=True), build_dataset(cfg, "val", train_augment=False)
    assert str(train.ann_file).startswith(str(tmp_path / "relative/cache"))
    assert (len(train), len(val), num_classes(train)) == (SMALL.num_train, SMALL.num_val, SMALL.num_classes + 1)
    torch.manual_seed(0)
    for image, target in [train[i] for i in range(len(train))] * 3:
        height, width = image.shape[1:]
        assert max(height, width) <= cfg.max_size and tuple(target["size"].tolist()) == (height, width)
        assert target["boxes"].shape == (len(target["labels"]), 4) and target["boxes"].dtype == torch.float32
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all() and (target["boxes"][:, 2:] > 0).all()
        assert target["orig_size"].tolist() == [SMALL.image_size] * 2
    image, target = val[0]
    assert image.shape[1:] == (cfg.val_size, cfg.val_size)
    assert max(CocoDetection(train.ann_file.parents[1], "train2017", max_images=5).ids) == 5


def test_collate_pads_and_masks():
    images = [torch.rand(3, 5, 7), torch.rand(3, 8, 4)]
    targets = [{"image_id": torch.tensor(i)} for i in range(2)]
    batch, masks, out_targets = collate(list(zip(images, targets)))
    assert batch.shape == (2, 3, 8, 7) and masks.shape == (2, 8, 7) and masks.dtype == torch.bool
    for image, padded, mask in zip(images, batch, masks):
        h, w = image.shape[1:]
        assert not mask[:h, :w].any() and mask.sum() == 8 * 7 - h * w
        assert torch.equal(padded[:, :h, :w], image) and padded[:, mask].abs().sum() == 0
    assert out_targets == targets


def coco_mini() -> Path:
    if not (COCO_MINI / "annotations/instances_val2017.json").is_file():
        pytest.skip(f"coco_mini not found at {COCO_MINI} (set DNDETR_COCO_MINI)")
    return COCO_MINI


def test_coco_mini_targets():
    root = coco_mini()
    raw = CocoDetection(root, "val2017")
    cfg = DataConfig(name="coco", root=str(root), **CPU_DATA)
    dataset = CocoDetection(root, "val2017", build_transforms(cfg, train=False))
    assert num_classes(dataset) == 91
    crowds = 0
    for index, image_id in enumerate(raw.ids):
        annotations = raw.coco.imgToAnns[image_id]
        crowds += sum(a["iscrowd"] for a in annotations)
        kept = [a for a in annotations if not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        image, target = raw[index]
        assert target["labels"].tolist() == [a["category_id"] for a in kept]
        assert target["orig_size"].tolist() == [image.height, image.width]
        _, target = dataset[index]
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all() and len(target["boxes"]) == len(kept)
        short, long = sorted(target["size"].tolist())
        assert long <= cfg.max_size and (short == cfg.val_size or long >= cfg.max_size - 1)  # DETR's rounding
    if crowds == 0:
        pytest.skip("coco_mini val2017 has no crowd annotation")


def test_coco_mini_collate_masks():
    root = coco_mini()
    cfg = DataConfig(name="coco", root=str(root), **CPU_DATA)
    dataset = CocoDetection(root, "train2017", build_transforms(cfg, train=True), max_images=4)
    torch.manual_seed(1)
    items = [dataset[i] for i in range(4)]
    batch, masks, targets = collate(items)
    for (image, target), mask in zip(items, masks):
        h, w = target["size"].tolist()
        assert image.shape[1:] == (h, w)
        assert not mask[:h, :w].any() and mask.sum() == mask.numel() - h * w


def test_seeded_samples_reseed_only_the_cpu_generator_and_restore_it(small_synthetic, monkeypatch):
    """Sample i's augmentation is what seeding torch with (seed, epoch, i) gives; the CUDA generators are never
    reseeded (fork_rng(devices=[]) would not restore them), and the CPU generator is left as it was."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    cfg = DataConfig(name="synthetic", root=str(small_synthetic), **CPU_DATA)
    dataset = CocoDetection(small_synthetic, "train2017", build_transforms(cfg, train=True))
    samples = SeededSamples(dataset, seed=3)
    samples.epoch = 2
    torch.manual_seed(0)
    reseeded.clear()
    state = torch.get_rng_state()
    image, target = samples[5]
    assert reseeded == [] and torch.equal(torch.get_rng_state(), state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3 * 1_000_003 + 2 * 10_007 + 5)
        expected_image, expected_target = dataset[5]
    assert torch.equal(image, expected_image) and torch.equal(target["boxes"], expected_target["boxes"])
    other_epoch = SeededSamples(dataset, seed=3)[5][0]
    assert other_epoch.shape != image.shape or not torch.equal(other_epoch, image)  # (seed, epoch) matters


# ---------------------------------------------------------------- transforms

def white_rectangle_sample(generator: torch.Generator, height=90, width=120):
    x0, y0 = (int(torch.randint(0, s - 20, (), generator=generator)) for s in (width, height))
    x1, y1 = x0 + int(torch.randint(8, width - x0, (), generator=generator)), y0 + int(torch.randint(8, height - y0, (), generator=generator))
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[y0:y1, x0:x1] = 255
    boxes = tv_tensors.BoundingBoxes([[x0, y0, x1, y1]], format="XYXY", canvas_size=(height, width), dtype=torch.float32)
    target = {"boxes": boxes, "labels": torch.tensor([1]), "image_id": torch.tensor(0),
              "orig_size": torch.tensor([height, width])}
    return Image.fromarray(pixels), target


def white_extent(image: torch.Tensor):
    """Box (x0, y0, x1, y1) of the pixels brighter than mid-grey in a normalised image, or None."""
    pixels = image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    white = pixels.mean(0) > 0.5
    if not white.any():
        return None
    rows, cols = torch.nonzero(white.any(1)).flatten(), torch.nonzero(white.any(0)).flatten()
    return torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)


@pytest.mark.parametrize("train", [True, False])
def test_boxes_follow_the_pixels(train):
    cfg = DataConfig(**{**CPU_DATA, "crop_min": 30, "crop_max": 400, "crop_resize": [50, 60]})
    transform, generator = build_transforms(cfg, train=train), torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    outcomes = set()
    for _ in range(40):
        image, target = transform(*white_rectangle_sample(generator))
        height, width = target["size"].tolist()
        extent = white_extent(image)
        if len(target["boxes"]) == 0:  # the crop missed the rectangle
            assert extent is None
            outcomes.add("dropped")
            continue
        cx, cy, w, h = (target["boxes"][0] * torch.tensor([width, height, width, height])).tolist()
        box = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        assert extent is not None and (box - extent).abs().max() <= 1.5, (box, extent)
        outcomes.add((height, width))
    assert len(outcomes) > (5 if train else 0)


def test_flip_twice_is_identity():
    image, target = white_rectangle_sample(torch.Generator().manual_seed(2))
    flip = v2.RandomHorizontalFlip(p=1.0)
    flipped_image, flipped = flip(image, target)
    assert not torch.equal(flipped["boxes"], target["boxes"])
    back_image, back = flip(flipped_image, flipped)
    assert torch.equal(back["boxes"], target["boxes"]) and back_image.tobytes() == image.tobytes()


def test_crop_larger_than_image_and_smaller_than_min():
    image, target = white_rectangle_sample(torch.Generator().manual_seed(3), height=40, width=50)
    for _ in range(10):
        cropped, out = RandomSizeCrop(64, 1000)(image, target)
        assert cropped.size == (50, 40) and torch.equal(out["boxes"], target["boxes"])
    cropped, out = RandomSizeCrop(10, 20)(image, target)
    assert 10 <= cropped.width <= 20 and 10 <= cropped.height <= 20 and tuple(out["boxes"].canvas_size) == cropped.size[::-1]


def test_transforms_use_only_torch_rng():
    transform = build_transforms(DataConfig(**CPU_DATA), train=True)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append([transform(*white_rectangle_sample(torch.Generator().manual_seed(i))) for i in range(6)])
    for (image_a, target_a), (image_b, target_b) in zip(*runs):
        assert torch.equal(image_a, image_b) and torch.equal(target_a["boxes"], target_b["boxes"])
    assert len({image.shape for image, _ in runs[0]}) > 1
    assert random.getstate() == python_state and str(np.random.get_state()) == str(numpy_state)


# ---------------------------------------------------------------- bad input and edge cases

def write_coco(root: Path, annotations: list, images=None, size=(32, 24)) -> Path:
    """A tiny COCO-layout dataset with two images (ids 1, 2) and two categories (ids 1, 5)."""
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    for image_id in (1, 2):
        Image.new("RGB", size, (image_id * 40, 0, 0)).save(root / "train2017" / f"{image_id}.png")
    images = images or [{"id": i, "file_name": f"{i}.png", "width": size[0], "height": size[1]} for i in (1, 2)]
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}]}
    (root / "annotations/instances_train2017.json").write_text(json.dumps(coco))
    return root


def ann(id=1, image_id=1, category_id=1, bbox=(2, 3, 10, 8), **extra):
    return {"id": id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox), **extra}


def without(entry: dict, key: str) -> dict:
    return {k: v for k, v in entry.items() if k != key}


ANNOTATION_FILE = "annotations/instances_train2017.json"
BAD_ANNOTATIONS = {
    "no bbox": ([without(ann(id=7), "bbox")], ["annotations[0] (id 7)", "bbox"]),
    "no image_id": ([ann(), without(ann(id=8), "image_id")], ["annotations[1] (id 8)", "image_id"]),
    "bad bbox": ([ann(id=9, bbox=(1, 2, 3))], ["annotations[0] (id 9)", "bbox [1, 2, 3]"]),
    "unknown category": ([ann(id=3, category_id=2)], ["annotations[0] (id 3)", "unknown category_id 2"]),
    "unknown image": ([ann(id=4, image_id=77)], ["annotations[0] (id 4)", "unknown image_id 77"]),
    "not an object": (["oops"], ["annotations[0]"]),
}


@pytest.mark.parametrize("case", list(BAD_ANNOTATIONS))
def test_bad_annotations_raise(tmp_path, case):
    annotations, expected = BAD_ANNOTATIONS[case]
    write_coco(tmp_path, annotations)
    with pytest.raises(DataError) as err:
        CocoDetection(tmp_path, "train2017")
    for text in [str(tmp_path / ANNOTATION_FILE), *expected]:
        assert text in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, expected", [
    ("{not json", "is not valid JSON"),
    ('{"images": [], "categories": []}', "no annotations list"),
    ("[1, 2]", "no images, annotations, categories list"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1}]}', "images[0]"),
    ('{"images": [], "annotations": [], "categories": []}', "categories list is empty"),
])
def test_bad_annotation_file_raises(tmp_path, content, expected):
    write_coco(tmp_path, [])
    (tmp_path / ANNOTATION_FILE).write_text(content)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / ANNOTATION_FILE)) + ".*" + re.escape(expected)):
        CocoDetection(tmp_path, "train2017")


def test_missing_root_annotation_or_folder_raise(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nowhere"))):
        CocoDetection(tmp_path / "nowhere", "train2017")
    write_coco(tmp_path, [])
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "annotations/instances_val2017.json"))):
        CocoDetection(tmp_path, "val2017")
    (tmp_path / "train2017/1.png").unlink()
    (tmp_path / "train2017/2.png").unlink()
    (tmp_path / "train2017").rmdir()
    with pytest.raises(DataError, match="image folder " + re.escape(str(tmp_path / "train2017"))):
        CocoDetection(tmp_path, "train2017")


@pytest.mark.parametrize("damage, expected", [
    (lambda path: path.unlink(), "is missing"),
    (lambda path: path.write_bytes(b"not an image at all"), "unreadable or corrupt"),
    (lambda path: path.write_bytes(path.read_bytes()[:60]), "unreadable or corrupt"),
    (lambda path: Image.new("RGB", (10, 10)).save(path), "is 10x10 but"),
])
def test_bad_image_file_raises_when_loaded(tmp_path, damage, expected):
    write_coco(tmp_path, [ann()], size=(64, 48))
    damage(tmp_path / "train2017/2.png")
    dataset = CocoDetection(tmp_path, "train2017")
    assert dataset[0][1]["labels"].tolist() == [1]
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "train2017/2.png")) + ".*" + expected):
        dataset[1]


def test_degenerate_crowd_and_outside_boxes_are_cleaned(tmp_path):
    annotations = [ann(1, bbox=(-4, -2, 10, 8)),  # clamped to (0, 0, 6, 6)
                   ann(2, bbox=(5, 5, 0, 4)), ann(3, bbox=(5, 5, -3, 4)),  # zero / negative width
                   ann(4, bbox=(40, 5, 5, 5)),  # outside the 32 px wide image
                   ann(5, category_id=5, bbox=(30, 20, 10, 10)),  # clamped to (30, 20, 32, 24)
                   ann(6, bbox=(1, 1, 5, 5), iscrowd=1)]
    write_coco(tmp_path, annotations)
    dataset = CocoDetection(tmp_path, "train2017")
    image, target = dataset[0]
    assert target["boxes"].tolist() == [[0, 0, 6, 6], [30, 20, 32, 24]] and target["labels"].tolist() == [1, 5]
    assert dataset.coco.anns[1]["area"] == 80 and dataset.coco.anns[1]["iscrowd"] == 0  # COCOeval's keys filled in
    assert num_classes(dataset) == 6


def test_empty_image_and_many_objects(tmp_path):
    boxes = [(x, y, 3, 2) for x in range(0, 500, 20) for y in range(0, 400, 20)]
    write_coco(tmp_path, [ann(i + 1, image_id=2, bbox=box) for i, box in enumerate(boxes)], size=(510, 410))
    dataset = CocoDetection(tmp_path, "train2017", build_transforms(DataConfig(**CPU_DATA), train=False))
    (_, empty), (_, crowded) = dataset[0], dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert len(boxes) == 500 and crowded["boxes"].shape == (500, 4)
    assert ((crowded["boxes"] >= 0) & (crowded["boxes"] <= 1)).all()
    batch, masks, targets = collate([dataset[0], dataset[1]])
    assert [len(t["boxes"]) for t in targets] == [0, 500]
