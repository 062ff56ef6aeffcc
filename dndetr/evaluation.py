"""COCO box AP of a model (pycocotools COCOeval), per class too, and the eval-mode switch the matching recorder
shares."""
from __future__ import annotations

import contextlib
import io
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch

from .criterion import postprocess
from .sampling import targets_to

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PER_CLASS = "AP_per_class"


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluation mode inside the block; the model's previous mode afterwards, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model, loader, device, class_loss: str, num_select: int, coco,
             on_outputs: Optional[Callable] = None, progress: bool = False) -> dict:
    """COCO box AP of the model on ``loader``'s images, as fractions in [0, 1], and AP per class
    (``AP_per_class``). ``on_outputs(outputs, targets)`` sees every batch's raw outputs (the matching recorder rides
    along); ``progress`` shows a tqdm bar over the batches."""
    detections, image_ids = [], []
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc="evaluating", leave=False, dynamic_ncols=True)
    with eval_mode(model):
        for images, masks, targets in batches:
            outputs = model(images.to(device), masks.to(device))
            if on_outputs is not None:
                on_outputs(outputs, targets_to(targets, device))
            sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
            for target, result in zip(targets, postprocess(outputs, sizes, class_loss, num_select)):
                image_ids.append(int(target["image_id"]))
                boxes = result["boxes"].cpu()
                boxes[:, 2:] -= boxes[:, :2]  # COCO wants x, y, w, h
                detections += [{"image_id": image_ids[-1], "category_id": int(label), "bbox": box, "score": score}
                               for box, score, label in zip(boxes.tolist(), result["scores"].tolist(),
                                                            result["labels"].tolist())]
    return coco_ap(coco, detections, image_ids)


def coco_ap(coco, detections: List[dict], image_ids: Optional[List[int]] = None) -> dict:
    """COCOeval's six AP numbers, None where COCOeval has nothing to measure (it reports -1), and ``AP_per_class``:
    {class name: AP at IoU 0.50:0.95, all areas}, None for a class without ground truth in these images. The mean of
    the per-class values that are not None is AP (COCOeval averages the same precisions)."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {**{k: 0.0 for k in AP_KEYS}, PER_CLASS: {name: 0.0 for name in class_names(coco).values()}}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its whole table
        evaluator = COCOeval(coco, coco.loadRes(detections), iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    result = {k: (float(v) if v >= 0 else None) for k, v in zip(AP_KEYS, evaluator.stats[:6])}
    result[PER_CLASS] = per_class_ap(evaluator, class_names(coco))
    return result


def class_names(coco) -> Dict[int, str]:
    """{category id: name}; a name shared by several categories gets its id appended, so no class hides another."""
    names = {cat_id: str(cat.get("name", cat_id)) for cat_id, cat in sorted(coco.cats.items())}
    counts = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {cat_id: name if counts[name] == 1 else f"{name} ({cat_id})" for cat_id, name in names.items()}


def per_class_ap(evaluator, names: Dict[int, str]) -> Dict[str, Optional[float]]:
    """AP of each category from COCOeval's precision array [IoU, recall, category, area, max dets] (all areas,
    100 detections), the way COCOeval's summary computes AP but per category; -1 entries mean no ground truth."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    result = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k]
        values = values[values > -1]
        result[names.get(cat_id, str(cat_id))] = float(np.mean(values)) if values.size else None
    return result


def per_class_line(row: dict) -> str:
    """``name=AP, ...`` of a metrics row's AP_per_class ('' when it has none), for the run log."""
    per_class = row.get(PER_CLASS) or {}
    return ", ".join(f"{name}={'n/a' if ap is None else f'{ap:.4g}'}" for name, ap in per_class.items())


def improves(rows: List[dict], row: dict) -> bool:
    """Whether ``row`` has an AP higher than every earlier epoch's in ``rows`` (metrics.jsonl lines)."""
    earlier = [r["AP"] for r in rows if r["epoch"] < row["epoch"] and r.get("AP") is not None]
    return row.get("AP") is not None and (not earlier or row["AP"] > max(earlier))
