"""COCO box AP of a model (pycocotools COCOeval), and the eval-mode switch the matching recorder shares."""
from __future__ import annotations

import contextlib
import io
from typing import Callable, Dict, Iterator, List, Optional

import torch

from .criterion import postprocess
from .sampling import targets_to

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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
             on_outputs: Optional[Callable] = None) -> Dict[str, Optional[float]]:
    """COCO box AP of the model on ``loader``'s images, as fractions in [0, 1]. ``on_outputs(outputs, targets)``
    sees every batch's raw outputs (the matching recorder rides along)."""
    detections, image_ids = [], []
    with eval_mode(model):
        for images, masks, targets in loader:
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


def coco_ap(coco, detections: List[dict], image_ids: Optional[List[int]] = None) -> Dict[str, Optional[float]]:
    """COCOeval's six AP numbers; None where COCOeval has nothing to measure (it reports -1)."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {k: 0.0 for k in AP_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its whole table
        evaluator = COCOeval(coco, coco.loadRes(detections), iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: (float(v) if v >= 0 else None) for k, v in zip(AP_KEYS, evaluator.stats[:6])}
