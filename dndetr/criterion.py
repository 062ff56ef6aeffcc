"""Set criterion (Hungarian losses on the matching queries, aux losses, the query plug-ins' own losses) and
post-processing. ``build_criterion(cfg, num_classes)`` assembles matcher and criterion from the ``loss`` and
``matcher`` groups, so the matching cost and the loss always use the same class-probability model.

Every loss is a sum normalised by the number of target boxes (all-reduced across ranks for the Hungarian part).
CE models use a weighted mean over queries with the no-object class down-weighted by ``eos_coef``, as DETR does.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from .boxes import cxcywh_to_xyxy, paired_box_iou, paired_generalized_box_iou
from .config import LossConfig
from .matcher import HungarianMatcher


def global_box_count(targets: List[dict], device) -> float:
    count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count /= dist.get_world_size()
    return max(count.item(), 1.0)


class SetCriterion(nn.Module):
    def __init__(self, matcher: HungarianMatcher, num_classes: int, cfg: LossConfig):
        super().__init__()
        self.matcher, self.num_classes, self.cfg = matcher, num_classes, cfg
        self.weights = {"loss_ce": cfg.weight_class, "loss_bbox": cfg.weight_bbox, "loss_giou": cfg.weight_giou}
        # Plug-ins with fixed targets (DN) use the plain class loss, which Stable-DINO weighs on its own.
        class_dn = cfg.weight_class if cfg.weight_class_dn is None else cfg.weight_class_dn
        self.fixed_target_weights = dict(self.weights, loss_ce=class_dn)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = cfg.eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def class_loss(self, logits: torch.Tensor, target_classes: torch.Tensor, normaliser: float) -> torch.Tensor:
        """logits [B,Q,K]; target_classes [B,Q] with num_classes meaning no object. The stable loss's plain
        form (for fixed targets such as DN's) is the focal loss."""
        if self.cfg.class_loss == "ce":
            return F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        return sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma, "sum") / normaliser

    def box_losses(self, pred: torch.Tensor, target: torch.Tensor, normaliser: float):
        """L1 and 1 - GIoU of paired cxcywh boxes, summed and normalised."""
        l1 = F.l1_loss(pred, target, reduction="sum") / normaliser
        giou = paired_generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target), self.cfg.giou_eps)
        return l1, (1 - giou).sum() / normaliser

    def matching_losses(self, outputs: dict, targets: List[dict], num_boxes: float,
                        indices=None) -> Dict[str, torch.Tensor]:
        """Hungarian losses of one layer's outputs; ``indices`` is that layer's assignment, if already matched."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if indices is None:
            indices = self.matcher(outputs, targets)
        image = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        query = torch.cat([q for q, _ in indices]).to(logits.device)
        matched_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        matched_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[image, query] = matched_labels
        l1, giou = self.box_losses(boxes[image, query], matched_boxes, num_boxes)
        if self.cfg.class_loss == "stable":
            ious = paired_box_iou(cxcywh_to_xyxy(boxes[image, query]), cxcywh_to_xyxy(matched_boxes), self.cfg.giou_eps)
            class_term = self.stable_class_loss(logits, image, query, matched_labels, ious, num_boxes)
        else:
            class_term = self.class_loss(logits, target_classes, num_boxes)
        return {"loss_ce": class_term, "loss_bbox": l1, "loss_giou": giou}

    def layers_matching_losses(self, layers: List[dict], targets: List[dict],
                               num_boxes: float) -> List[Dict[str, torch.Tensor]]:
        """``matching_losses`` of several decoder layers (same batch and query count): their cost matrices are
        computed in one batched pass with one host transfer (``HungarianMatcher.match_layers``)."""
        indices = self.matcher.match_layers(layers, targets)
        return [self.matching_losses(out, targets, num_boxes, ix) for out, ix in zip(layers, indices)]

    def stable_class_loss(self, logits, image, query, labels, ious, normaliser: float) -> torch.Tensor:
        """Stable-DINO's position-supervised loss: a matched (query, class) entry's target is t = IoU^power,
        rescaled per image so that its best positive has target >= 1 (t * max(1, 1 / max t)), detached;
        positives weigh alpha |t - p|^gamma BCE(p, t), every other entry (1 - alpha) p^gamma BCE(p, 0)."""
        alpha, gamma = self.cfg.focal_alpha, self.cfg.focal_gamma
        target = ious.detach() ** self.cfg.stable_power
        best = target.new_zeros(logits.shape[0]).scatter_reduce(0, image, target, "amax", include_self=False)
        target = target * (1 / best.clamp(min=1e-12)).clamp(min=1)[image]
        targets = torch.zeros_like(logits)
        targets[image, query, labels] = target.to(logits.dtype)
        positive = torch.zeros_like(logits, dtype=torch.bool)
        positive[image, query, labels] = True
        prob = logits.sigmoid()
        weight = torch.where(positive, alpha * (targets - prob).abs() ** gamma, (1 - alpha) * prob ** gamma)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return (weight * bce).sum() / normaliser

    def forward(self, outputs: dict, targets: List[dict]) -> Dict[str, torch.Tensor]:
        """Weighted loss terms (``loss_ce``, ``loss_bbox_0``, ``dn_loss_giou``, ...); the training loss is their sum.
        Terms of the query plug-ins' blocks carry the plug-in's prefix."""
        num_boxes = global_box_count(targets, outputs["pred_logits"].device)
        layers = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        blocks = outputs.get("query_blocks", [])
        scale = math.prod(block.plugin.matching_loss_scale for block in blocks)
        values = self.layers_matching_losses([out for _, out in layers], targets, num_boxes)
        supervised = [(suffix, layer_values, scale) for (suffix, _), layer_values in zip(layers, values)]
        if "enc_outputs" in outputs:  # two-stage proposals: class-agnostic, every object is class 0
            agnostic = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            supervised.append(("_enc", self.matching_losses(outputs["enc_outputs"], agnostic, num_boxes), 1.0))
        losses = {term + suffix: value * self.weights[term] * layer_scale
                  for suffix, layer_values, layer_scale in supervised for term, value in layer_values.items()}
        for block in blocks:
            prefix = block.plugin.group + "_"
            losses.update({prefix + name: value
                           for name, value in block.plugin.loss(block, targets, self, len(layers)).items()})
        return losses


def build_criterion(cfg, num_classes: int) -> SetCriterion:
    """The matcher and criterion of a composed configuration (engine, benchmarks and tests use this one place)."""
    return SetCriterion(HungarianMatcher(cfg.matcher, cfg.loss), num_classes, cfg.loss)


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
    boxes = cxcywh_to_xyxy(boxes) * scale
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
