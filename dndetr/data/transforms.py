"""DETR's data augmentation (facebookresearch/detr datasets/transforms.py), with every size set by DataConfig.

Every transform maps (image, target) to (image, target). Until the final step the image is a PIL image and
``target["boxes"]`` a ``tv_tensors.BoundingBoxes`` in absolute XYXY pixels, so torchvision.transforms.v2 moves the
boxes with every flip, resize and crop. All randomness comes from torch's global RNG, so seeding torch (or restoring
its checkpointed state) reproduces the augmentation.
"""
from __future__ import annotations

from functools import partial

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dndetr.config import check

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def drop_degenerate(target: dict) -> dict:
    """Keep the boxes with positive width and height, and their labels (DETR's rule)."""
    boxes = target["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {**target, "boxes": tv_tensors.wrap(boxes[keep], like=boxes), "labels": target["labels"][keep]}


def resized_size(height: int, width: int, size: int, max_size: int | None) -> tuple:
    """Shorter side -> ``size``, unless the longer side would then exceed ``max_size`` (DETR's rounding)."""
    if max_size is not None:
        short, long = min(height, width), max(height, width)
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize(image, target: dict, size: int, max_size: int | None = None):
    new_size = list(resized_size(*F.get_size(image), size, max_size))
    return F.resize(image, new_size), {**target, "boxes": F.resize(target["boxes"], new_size)}


def random_int(low: int, high: int) -> int:
    """Uniform on [low, high], both included."""
    return int(torch.randint(low, high + 1, ()))


class RandomResize:
    def __init__(self, sizes, max_size: int | None = None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target: dict):
        return resize(image, target, self.sizes[random_int(0, len(self.sizes) - 1)], self.max_size)


class RandomSizeCrop:
    """A crop with width and height ~ U[min_size, min(image side, max_size)]; a side shorter than min_size is kept."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target: dict):
        height, width = F.get_size(image)
        crop_h, crop_w = (random_int(min(self.min_size, side), min(self.max_size, side)) for side in (height, width))
        top, left = random_int(0, height - crop_h), random_int(0, width - crop_w)
        boxes = F.crop(target["boxes"], top, left, crop_h, crop_w)  # clamps the boxes to the crop
        return F.crop(image, top, left, crop_h, crop_w), drop_degenerate({**target, "boxes": boxes})


def to_model_target(image: torch.Tensor, target: dict):
    """Plain tensors for the model: boxes become (cx, cy, w, h) normalised by the transformed image size."""
    height, width = image.shape[-2:]
    boxes = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
    boxes = boxes.as_subclass(torch.Tensor).float() / torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = boxes.clamp(0, 1)  # a full-image box comes out of a resize as 1.0000001
    target = {**target, "boxes": boxes, "size": torch.tensor([height, width])}
    return image.as_subclass(torch.Tensor), target


def build_transforms(data_cfg, train: bool) -> v2.Compose:
    """DETR's training augmentation (``train``) or its evaluation resize, then ImageNet normalisation."""
    finish = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
              to_model_target]
    if not train:
        return v2.Compose([partial(resize, size=data_cfg.val_size, max_size=data_cfg.max_size), *finish])
    augment = RandomResize(data_cfg.train_scales, data_cfg.max_size)
    if data_cfg.crop:
        check(len(data_cfg.crop_resize) > 0 and min(data_cfg.crop_resize) >= 1, "data.crop_resize",
              data_cfg.crop_resize, "must be a non-empty list of positive sizes when data.crop is on")
        crop = v2.Compose([RandomResize(data_cfg.crop_resize), RandomSizeCrop(data_cfg.crop_min, data_cfg.crop_max),
                           RandomResize(data_cfg.train_scales, data_cfg.max_size)])
        augment = v2.RandomChoice([augment, crop])  # DETR's RandomSelect, p = 0.5
    flip = [v2.RandomHorizontalFlip(0.5)] if data_cfg.hflip else []
    return v2.Compose([*flip, augment, *finish])
