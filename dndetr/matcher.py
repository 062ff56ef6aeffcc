"""Hungarian matching between predictions and ground truth (scipy's linear_sum_assignment, one image at a time).

Cost = cost_class * class cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU). The class cost follows the loss
(``loss.class_loss``): -p[class] with softmax probabilities for the CE loss (DETR), the focal-loss difference pos - neg
on sigmoid probabilities for the focal loss (Conditional, DAB), with the loss's alpha, gamma and GIoU epsilon.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from .boxes import cxcywh_to_xyxy, generalized_box_iou
from .config import LossConfig, MatcherConfig


class HungarianMatcher:
    def __init__(self, cfg: MatcherConfig, loss: LossConfig):
        self.cfg, self.loss = cfg, loss

    def class_cost(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss.class_loss == "ce":
            return -logits.softmax(-1)[:, labels]
        alpha, gamma = self.loss.focal_alpha, self.loss.focal_gamma
        prob = logits.sigmoid()[:, labels]
        negative = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        return positive - negative

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: List[dict]) -> List[torch.Tensor]:
        """One [Q, n_i] cost matrix per image, on the CPU."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        B, Q = logits.shape[:2]
        labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets])
        if len(labels) == 0:
            return [logits.new_zeros(Q, 0).cpu() for _ in targets]
        logits, boxes = logits.flatten(0, 1).float(), boxes.flatten(0, 1).float()
        cost = (self.cfg.cost_bbox * torch.cdist(boxes, target_boxes, p=1)
                + self.cfg.cost_class * self.class_cost(logits, labels)
                - self.cfg.cost_giou * generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target_boxes),
                                                           self.loss.giou_eps))
        if not torch.isfinite(cost).all():
            raise FloatingPointError("non-finite matching cost: the model's outputs contain NaN or Inf")
        sizes = [len(t["labels"]) for t in targets]
        return [c[i] for i, c in enumerate(cost.view(B, Q, -1).cpu().split(sizes, dim=-1))]

    def assign(self, costs: List[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        indices = []
        for cost in costs:
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def __call__(self, outputs: dict, targets: List[dict]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per image: (query indices, target indices), sorted by query index."""
        return self.assign(self.cost_matrices(outputs, targets))
