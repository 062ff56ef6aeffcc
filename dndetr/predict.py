"""Detections on arbitrary images: load a checkpoint (ours or official), run the model on each image at the
evaluation size, draw the boxes, class names and scores, and write the detections in COCO results format.

The command is ``predict.py`` at the repository root; docs/tools.md describes its outputs.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from .config import Config, ConfigError
from .criterion import postprocess
from .data import DataError, build_dataset, build_transforms, collate
from .data.coco import coco_target
from .evaluation import class_names
from .files import atomic_write
from .models import build_model
from .official import load_checkpoint_file, load_into

log = logging.getLogger("dndetr")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Box colours by class id (matplotlib's tab10), so one class keeps its colour across images.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def image_files(images) -> List[Path]:
    """The files named by ``+images`` (a file, a folder of images, or a list of either), in order."""
    if images is None or images == "" or images == []:
        raise ConfigError("+images is missing: name image files or a folder, e.g. +images=photos/ or "
                          "+images=[a.jpg,b.jpg]")
    files = []
    for entry in [images] if isinstance(images, str) else list(images):
        path = Path(str(entry)).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise ConfigError(f"+images={entry} is invalid: the folder holds no image file "
                                  f"({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"+images={entry} is invalid: no such file or folder")
    return files


def checkpoint_classes(path: str, class_loss: str) -> int:
    """The number of class indices of a checkpoint's classifier (the no-object column of the CE loss excluded)."""
    state = load_checkpoint_file(path)
    weight = state.get("class_embed.weight")
    if weight is None:
        raise ConfigError(f"checkpoint {path!r} has no class_embed.weight: not a detector of this project's models")
    return weight.shape[0] - (1 if class_loss == "ce" else 0)


def load_model(cfg: Config, device: torch.device):
    """The configured model with ``model.init_from`` loaded strictly, in eval mode, and its class count."""
    if not cfg.model.init_from:
        raise ConfigError("model.init_from is missing: predict.py needs model.init_from=<checkpoint>")
    num_classes = checkpoint_classes(cfg.model.init_from, cfg.loss.class_loss)
    model = build_model(cfg, num_classes)
    load_into(model, cfg.model.init_from)
    return model.to(device).eval(), num_classes


def category_names(cfg: Config, num_classes: int) -> Dict[int, str]:
    """{class id: name} from the configured dataset's categories; ids as text when the dataset is not at hand."""
    names = {k: str(k) for k in range(num_classes)}
    try:
        names.update(class_names(build_dataset(cfg.data, "val", train_augment=False).coco))
    except (DataError, OSError) as err:
        log.warning("class names unknown (%s): boxes are labelled with class ids", err)
    return names


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as file:
            return file.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"image file {path} is unreadable or not an image: {err}") from None


@torch.no_grad()
def detect(model, image: Image.Image, cfg: Config, device: torch.device) -> dict:
    """{scores, labels, boxes (absolute xyxy in the image's own pixels)} of one image, on CPU."""
    transform = build_transforms(cfg.data, train=False)
    tensor, target = transform(image, coco_target(0, [], image.width, image.height))
    images, masks, _ = collate([(tensor, target)])
    outputs = model(images.to(device), masks.to(device))
    sizes = torch.tensor([[image.height, image.width]], device=device)
    result = postprocess(outputs, sizes, cfg.loss.class_loss, cfg.model.num_select)[0]
    return {k: v.float().cpu() if k != "labels" else v.cpu() for k, v in result.items()}


def pixel_box(box: Sequence[float], width: int, height: int) -> tuple:
    """The whole pixels a box covers, clipped to the image: (x0, y0, x1, y1), both ends included."""
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width - 1, math.ceil(box[2]) - 1), min(height - 1, math.ceil(box[3]) - 1)
    return x0, y0, x1, y1


def draw_detections(image: Image.Image, detections: List[dict], names: Dict[int, str]) -> Image.Image:
    """A copy of ``image`` with each detection's box outline and ``name score`` label. Labels are drawn inside
    their box and clipped to it, so the picture differs from the input only inside detected boxes."""
    drawn = image.copy()
    draw = ImageDraw.Draw(drawn)
    inside = Image.new("L", image.size, 0)
    inside_draw = ImageDraw.Draw(inside)
    line = max(1, round(min(image.size) / 150))
    font = ImageFont.load_default(max(11, round(min(image.size) / 26)))
    for det in sorted(detections, key=lambda d: d["score"]):  # the most confident box on top
        x0, y0, x1, y1 = pixel_box(det["box"], *image.size)
        if x1 < x0 or y1 < y0:
            continue
        colour = PALETTE[det["label"] % len(PALETTE)]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text = f"{names.get(det['label'], det['label'])} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x0 + line, y0 + line), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        draw.text((x0 + line, y0 + line), text, fill=(255, 255, 255), font=font)
        inside_draw.rectangle((x0, y0, x1, y1), fill=255)
    return Image.composite(drawn, image, inside)


def predict(cfg: Config, images, score_threshold: float, out: Path, device: torch.device) -> List[Path]:
    """Write ``<out>/<image stem>.png`` (detections with score >= score_threshold drawn), ``detections.json``
    (every detection, COCO results format) and ``images.json`` (image ids, files, sizes and categories)."""
    if not 0.0 <= score_threshold <= 1.0:
        raise ConfigError(f"+score_threshold={score_threshold} is invalid: must be in [0, 1]")
    files = image_files(images)
    model, num_classes = load_model(cfg, device)
    names = category_names(cfg, num_classes)
    out.mkdir(parents=True, exist_ok=True)
    results, entries, written, used = [], [], [], set()
    for image_id, path in enumerate(files, 1):
        image = read_image(path)
        found = detect(model, image, cfg, device)
        detections = [{"box": box, "score": score, "label": label} for box, score, label in
                      zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist())]
        results += [{"image_id": image_id, "category_id": d["label"], "score": d["score"],
                     "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]]}
                    for d in detections]
        name = path.stem if path.stem not in used else f"{path.stem}_{image_id}"
        used.add(name)
        shown = [d for d in detections if d["score"] >= score_threshold]
        picture = draw_detections(image, shown, names)
        written.append(atomic_write(out / f"{name}.png", lambda f: picture.save(f, format="PNG")))
        entries.append({"id": image_id, "file_name": str(path), "width": image.width, "height": image.height})
        log.info("%s: %d detections with score >= %.2f -> %s", path, len(shown), score_threshold, written[-1])
    categories = [{"id": k, "name": v} for k, v in sorted(names.items())]
    for name, content in (("detections.json", results), ("images.json", {"images": entries, "annotations": [],
                                                                         "categories": categories})):
        written.append(atomic_write(out / name, lambda f, c=content: f.write(json.dumps(c).encode())))
    return written
