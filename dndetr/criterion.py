"""Set criterion (Hungarian losses, aux losses, DN reconstruction losses) and post-processing.

Every loss is a sum normalised by the number of target boxes (all-reduced across ranks for the Hungarian part;
per rank for DN, as the official DN-DETR does). CE models use a weighted mean over queries with the no-object
class down-weighted by ``eos_coef``, as DETR does.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from .config import ModelConfig
from .matcher import HungarianMatcher

TERMS = ("loss_ce", "loss_bbox", "loss_giou")


def global_box_count(targets: List[dict], device) -> float:
    count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count /= dist.get_world_size()
    return max(count.item(), 1.0)


class SetCriterion(nn.Module):
    def __init__(self, matcher: HungarianMatcher, num_classes: int, cfg: ModelConfig, dn_loss_weight: float = 1.0):
        super().__init__()
        self.matcher, self.num_classes, self.cfg = matcher, num_classes, cfg
        self.weights = {"loss_ce": cfg.loss_class, "loss_bbox": cfg.loss_bbox, "loss_giou": cfg.loss_giou}
        self.dn_loss_weight = dn_loss_weight
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = cfg.eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def class_loss(self, logits: torch.Tensor, target_classes: torch.Tensor, normaliser: float) -> torch.Tensor:
        """logits [B,Q,K]; target_classes [B,Q] with num_classes meaning no object."""
        if self.cfg.class_loss == "ce":
            return F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        return sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma, "sum") / normaliser

    @staticmethod
    def box_losses(pred: torch.Tensor, target: torch.Tensor, normaliser: float):
        l1 = F.l1_loss(pred, target, reduction="sum") / normaliser
        giou = torch.diag(generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"),
                                              box_convert(target, "cxcywh", "xyxy")))
        return l1, (1 - giou).sum() / normaliser

    def matching_losses(self, outputs: dict, targets: List[dict], num_boxes: float) -> Dict[str, torch.Tensor]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        indices = self.matcher(outputs, targets)
        image = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        query = torch.cat([q for q, _ in indices]).to(logits.device)
        matched_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        matched_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[image, query] = matched_labels
        l1, giou = self.box_losses(boxes[image, query], matched_boxes, num_boxes)
        return {"loss_ce": self.class_loss(logits, target_classes, num_boxes), "loss_bbox": l1, "loss_giou": giou}

    def dn_losses(self, dn: dict, num_aux: int) -> Dict[str, Dict[str, torch.Tensor]]:
        """Reconstruction losses on the real DN slots of the last layer and the ``num_aux`` layers before it (the
        same layers as the Hungarian losses); no matching: slot k's target is fixed by construction."""
        num_layers, num_dn = dn["logits"].shape[0], len(dn["labels"])
        per_layer = {}
        for layer in range(num_layers - 1 - num_aux, num_layers):
            suffix = "" if layer == num_layers - 1 else f"_{layer}"
            if num_dn == 0:  # keep the DN branch in the graph so every parameter gets a (zero) gradient
                zero = dn["logits"][layer].sum() * 0 + dn["pred_boxes"][layer].sum() * 0
                per_layer[suffix] = {term: zero for term in TERMS}
                continue
            logits = dn["logits"][layer][dn["image"], dn["slot"]]
            boxes = dn["pred_boxes"][layer][dn["image"], dn["slot"]]
            l1, giou = self.box_losses(boxes, dn["boxes"], num_dn)
            per_layer[suffix] = {"loss_ce": self.class_loss(logits[None], dn["labels"][None], num_dn),
                                 "loss_bbox": l1, "loss_giou": giou}
        return per_layer

    def forward(self, outputs: dict, targets: List[dict]) -> Dict[str, torch.Tensor]:
        """Weighted loss terms (``loss_ce``, ``loss_bbox_0``, ``dn_loss_giou``, ...); the training loss is their sum."""
        num_boxes = global_box_count(targets, outputs["pred_logits"].device)
        layers = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        groups = [("", suffix, self.matching_losses(out, targets, num_boxes), 1.0) for suffix, out in layers]
        if "enc_outputs" in outputs:  # two-stage proposals: class-agnostic, every object is class 0
            agnostic = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            groups.append(("", "_enc", self.matching_losses(outputs["enc_outputs"], agnostic, num_boxes), 1.0))
        if "dn" in outputs:
            groups += [("dn_", suffix, terms, self.dn_loss_weight)
                       for suffix, terms in self.dn_losses(outputs["dn"], len(layers) - 1).items()]
        return {prefix + term + suffix: value * self.weights[term] * factor
                for prefix, suffix, terms, factor in groups for term, value in terms.items()}


@torch.no_grad()
def postprocess(outputs: dict, target_sizes: torch.Tensor, class_loss: str, num_select: int) -> List[dict]:
    """Detections per image in absolute xyxy of ``target_sizes`` ([B,2] as h, w)."""
    logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
    if class_loss == "ce":
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    else:
        num_classes = logits.shape[-1]
        k = min(num_select, logits.shape[1] * num_classes)
        scores, flat = logits.sigmoid().flatten(1).topk(k, dim=1)
        labels = flat % num_classes
        boxes = torch.gather(boxes, 1, (flat // num_classes)[..., None].expand(-1, -1, 4))
    h, w = target_sizes.unbind(1)
    scale = torch.stack((w, h, w, h), dim=1)[:, None, :].to(boxes.dtype)
    boxes = box_convert(boxes, "cxcywh", "xyxy") * scale
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
