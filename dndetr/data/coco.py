"""COCO-layout detection dataset (real COCO or the built-in synthetic data), batching, and ``build_dataset``.

Layout: ``<root>/<split>/<file_name>`` images and ``<root>/annotations/instances_<split>.json``, or another
annotation file relative to the root (``data.train_ann``, ``data.val_ann``).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from hydra.utils import to_absolute_path
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

from dndetr.data import DataError
from dndetr.data.annotations import bomb_limit, load_annotations
from dndetr.data.synthetic import ensure_synthetic
from dndetr.data.transforms import build_transforms, drop_degenerate

DEFAULT_ANN = "annotations/instances_{split}.json"


class CocoDetection(torch.utils.data.Dataset):
    """Items are ``transforms(image, target)``; without transforms, a PIL image and absolute XYXY boxes.

    ``self.coco`` is the pycocotools index of the annotation file (the ground truth for COCOeval).
    """

    def __init__(self, root, split: str, transforms=None, max_images: int | None = None,
                 ann_file: str | None = None, check_files: bool = False):
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise DataError(f"data root {root} is a file, not a folder")
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist")
        self.image_dir = root / split
        self.ann_file = root / (ann_file or DEFAULT_ANN.format(split=split))
        if not self.ann_file.is_file():
            raise DataError(f"annotation file {self.ann_file} not found (COCO layout: "
                            "<root>/annotations/instances_<split>.json, or set data.train_ann / data.val_ann)")
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} not found (COCO layout: <root>/<split>/)")
        self.coco, self.notes = load_coco(self.ann_file, self.image_dir if check_files else None)
        self.ids = sorted(self.coco.imgs)[:max_images]
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = self.load_image(image_id)
        target = coco_target(image_id, self.coco.imgToAnns[image_id], *image.size)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def load_image(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as file:
                image = file.convert("RGB")
        except Image.DecompressionBombError:
            raise DataError(f"image file {path} has more than {bomb_limit()} pixels, PIL's decompression-bomb "
                            "limit: downscale it") from None
        except FileNotFoundError:
            raise DataError(f"image file {path} is missing (image id {image_id} in {self.ann_file})") from None
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for unknown formats and broken data
            raise DataError(f"image file {path} is unreadable or corrupt: {err}") from None
        declared = (info["width"], info["height"])  # ints, checked when the annotation file was read
        if declared != image.size:
            raise DataError(f"image file {path} is {image.width}x{image.height} but {self.ann_file} says "
                            f"{declared[0]}x{declared[1]}")
        return image


def coco_target(image_id: int, annotations: list, width: int, height: int) -> dict:
    """DETR's ConvertCocoPolysToMask for boxes: drop crowds, xywh -> xyxy, clamp to the image, drop degenerate."""
    annotations = [ann for ann in annotations if not ann["iscrowd"]]
    boxes = torch.tensor([ann["bbox"] for ann in annotations], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    return drop_degenerate({
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([ann["category_id"] for ann in annotations], dtype=torch.int64),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
    })


def load_coco(path: Path, image_dir: Path | None = None) -> tuple:
    """The pycocotools index of a checked and cleaned annotation file (see check.py), and what cleaning did."""
    data, notes = load_annotations(path, image_dir)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco, notes


def collate(batch: list):
    """Pad the images to the largest height and width of the batch; mask is True on the padding."""
    images, targets = zip(*batch)
    height, width = max(image.shape[1] for image in images), max(image.shape[2] for image in images)
    padded = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    masks = torch.ones(len(images), height, width, dtype=torch.bool)
    for image, pad, mask in zip(images, padded, masks):
        pad[:, :image.shape[1], :image.shape[2]] = image
        mask[:image.shape[1], :image.shape[2]] = False
    return padded, masks, list(targets)


def build_dataset(data_cfg, split: str, train_augment: bool) -> CocoDetection:
    """``split`` is "train" or "val"; relative roots resolve against the directory the job was started from."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is invalid: must be 'train' or 'val'")
    root = Path(to_absolute_path(data_cfg.root))
    if data_cfg.name == "synthetic":
        root = ensure_synthetic(root, data_cfg.synthetic)
    folder = data_cfg.train_split if split == "train" else data_cfg.val_split
    max_images = data_cfg.max_train_images if split == "train" else data_cfg.max_val_images
    ann_file = data_cfg.train_ann if split == "train" else data_cfg.val_ann
    return CocoDetection(root, folder, build_transforms(data_cfg, train=train_augment), max_images, ann_file)


def num_classes(dataset: CocoDetection) -> int:
    """Category ids are the class indices: max id + 1 (91 for COCO)."""
    return max(dataset.coco.cats) + 1
