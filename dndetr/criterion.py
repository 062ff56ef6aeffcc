"""Set criterion (Hungarian losses on the matching queries, aux losses, the query plug-ins' own losses) and
post-processing. ``build_criterion(cfg, num_classes)`` assembles matcher and criterion from the ``loss`` and
``matcher`` groups, so the matching cost and the loss always use the same class-probability model.

Every loss is a sum normalised by the number of target boxes (all-reduced across ranks for the Hungarian part).
CE models use a weighted mean over queries with the no-object class down-weighted by ``eos_coef``, as DETR does.
"""
from __future__ import annotations

import itertools
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
        """Per layer [L]: logits [L, ..., K]; target_classes [L, ...] with num_classes meaning no object. The
        stable loss's plain form (for fixed targets such as DN's) is the focal loss."""
        if self.cfg.class_loss == "ce":  # DETR's weighted mean over each layer's queries
            weight = self.empty_weight.to(logits.dtype)
            weighted = F.cross_entropy(logits.movedim(-1, 1), target_classes, weight, reduction="none")
            return weighted.flatten(1).sum(1) / weight.to(weighted.dtype)[target_classes].flatten(1).sum(1)
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        focal = sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma, "none")
        return focal.flatten(1).sum(1) / normaliser

    def box_losses(self, pred: torch.Tensor, target: torch.Tensor, normaliser: float):
        """L1 and 1 - GIoU of paired cxcywh boxes [L, N, 4], summed per layer ([L] each) and normalised."""
        l1 = F.l1_loss(pred, target, reduction="none").flatten(1).sum(1) / normaliser
        giou = paired_generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target), self.cfg.giou_eps)
        return l1, (1 - giou).sum(1) / normaliser

    def matching_losses(self, outputs: dict, targets: List[dict], num_boxes: float,
                        indices=None) -> Dict[str, torch.Tensor]:
        """Hungarian losses of one layer's outputs; ``indices`` is that layer's assignment, if already matched."""
        return self.layers_matching_losses([outputs], targets, num_boxes, None if indices is None else [indices])[0]

    def layers_matching_losses(self, layers: List[dict], targets: List[dict], num_boxes: float,
                               indices=None) -> List[Dict[str, torch.Tensor]]:
        """Hungarian losses of several decoder layers (same batch and query count), each layer's terms as if
        computed alone: one batched matching with one host transfer (``HungarianMatcher.match_layers``), then
        every layer's terms from one set of ops, since each layer has the same number of matched pairs
        (min(Q, n_b) per image)."""
        if indices is None:
            indices = self.matcher.match_layers(layers, targets)
        logits = torch.stack([out["pred_logits"] for out in layers])
        boxes = torch.stack([out["pred_boxes"] for out in layers])
        device = logits.device
        first_target = [0, *itertools.accumulate(len(t["labels"]) for t in targets[:-1])]
        image = torch.stack([torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(ix)]) for ix in indices])
        query = torch.stack([torch.cat([q for q, _ in ix]) for ix in indices])
        target = torch.stack([torch.cat([j + first_target[b] for b, (_, j) in enumerate(ix)]) for ix in indices])
        image, query, target = image.to(device), query.to(device), target.to(device)
        layer = torch.arange(len(layers), device=device)[:, None].expand_as(image)
        matched_labels = torch.cat([t["labels"] for t in targets])[target]  # [L, N]
        matched_boxes = torch.cat([t["boxes"] for t in targets])[target]
        matched_pred = boxes[layer, image, query]
        l1, giou = self.box_losses(matched_pred, matched_boxes, num_boxes)
        if self.cfg.class_loss == "stable":
            ious = paired_box_iou(cxcywh_to_xyxy(matched_pred), cxcywh_to_xyxy(matched_boxes), self.cfg.giou_eps)
            class_term = self.stable_class_loss(logits, image, query, matched_labels, ious, num_boxes)
        else:
            target_classes = torch.full(logits.shape[:3], self.num_classes, dtype=torch.int64, device=device)
            target_classes[layer, image, query] = matched_labels
            class_term = self.class_loss(logits, target_classes, num_boxes)
        return [{"loss_ce": class_term[i], "loss_bbox": l1[i], "loss_giou": giou[i]} for i in range(len(layers))]

    def stable_class_loss(self, logits, image, query, labels, ious, normaliser: float) -> torch.Tensor:
        """Stable-DINO's position-supervised loss per layer [L] (logits [L, B, Q, K]; the matched pairs' image,
        query, label and IoU [L, N]): a matched (query, class) entry's target is t = IoU^power, rescaled per layer
        and image so that its best positive has target >= 1 (t * max(1, 1 / max t)), detached; positives weigh
        alpha |t - p|^gamma BCE(p, t), every other entry (1 - alpha) p^gamma BCE(p, 0)."""
        alpha, gamma = self.cfg.focal_alpha, self.cfg.focal_gamma
        num_layers, batch_size = logits.shape[:2]
        layer = torch.arange(num_layers, device=logits.device)[:, None].expand_as(image)
        layer_image = (layer * batch_size + image).flatten()
        target = ious.detach().flatten() ** self.cfg.stable_power
        best = target.new_zeros(num_layers * batch_size).scatter_reduce(0, layer_image, target, "amax",
                                                                        include_self=False)
        target = (target * (1 / best.clamp(min=1e-12)).clamp(min=1)[layer_image]).view_as(image)
        targets = torch.zeros_like(logits)
        targets[layer, image, query, labels] = target.to(logits.dtype)
        positive = torch.zeros_like(logits, dtype=torch.bool)
        positive[layer, image, query, labels] = True
        prob = logits.sigmoid()
        weight = torch.where(positive, alpha * (targets - prob).abs() ** gamma, (1 - alpha) * prob ** gamma)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return (weight * bce).flatten(1).sum(1) / normaliser

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
