"""Hungarian matching between predictions and ground truth (scipy's linear_sum_assignment, one image at a time).

Cost = cost_class * class cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU). The class cost follows the loss
(``loss.class_loss``): -p[class] with softmax probabilities for the CE loss (DETR), the focal-loss difference pos - neg
on sigmoid probabilities for the focal loss (Conditional, DAB), with the loss's alpha, gamma and GIoU epsilon.
With ``matcher.position_beta`` > 0 (Stable-DINO) the sigmoid probability is multiplied by a per-pair position score.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from .boxes import cxcywh_to_xyxy, generalized_box_iou
from .config import ConfigError, LossConfig, MatcherConfig

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def position_modulation(giou: torch.Tensor, batch_size: int, sizes: List[int]) -> torch.Tensor:
    """Stable-DINO's s' = (GIoU + 1) / 2 for every (query, target) pair of the flattened batch [B*Q, T], rescaled
    per image by max(1, 1 / the image's largest s'). Stable-DINO's code scatters s' by class id, which mixes
    objects of the same class (even across images); here each (query, object) pair keeps its own value."""
    s = (giou + 1) / 2
    device = giou.device
    row_image = torch.arange(batch_size, device=device).repeat_interleave(giou.shape[0] // batch_size)
    col_image = torch.arange(batch_size, device=device).repeat_interleave(torch.as_tensor(sizes, device=device))
    same_image = row_image[:, None] == col_image[None, :]
    best = s.masked_fill(~same_image, 0).view(batch_size, -1).amax(dim=1)
    scale = torch.where(best > 0, 1 / best.clamp(min=1e-12), torch.ones_like(best)).clamp(min=1)
    # An image's own pairs end at most at 1; pairs with other images' objects (never assigned) are capped there too.
    return (s * scale[row_image][:, None]).clamp(max=1)


class HungarianMatcher:
    def __init__(self, cfg: MatcherConfig, loss: LossConfig):
        self.cfg, self.loss = cfg, loss
        if cfg.position_beta > 0 and loss.class_loss == "ce":
            raise ConfigError(f"matcher.position_beta={cfg.position_beta!r} is invalid: the position-modulated cost "
                              "needs sigmoid probabilities (loss.class_loss=focal or stable)")

    def class_cost(self, logits: torch.Tensor, labels: torch.Tensor, modulation=None) -> torch.Tensor:
        """[Q, T] class cost; ``modulation`` [Q, T] multiplies the sigmoid probabilities (Stable-DINO)."""
        if self.loss.class_loss == "ce":
            return -logits.softmax(-1)[:, labels]
        alpha, gamma = self.loss.focal_alpha, self.loss.focal_gamma
        prob = logits.sigmoid()[:, labels]
        if modulation is not None:
            prob = prob * modulation
        negative = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        return positive - negative

    @torch.no_grad()
    def layer_costs(self, layers: List[dict], targets: List[dict]) -> List[List[torch.Tensor]]:
        """Per layer, one [Q, n_i] cost matrix per image, on the CPU: every layer's predictions against every
        target box in one batched computation and one device-to-host copy (the layers must share B and Q)."""
        logits = torch.stack([out["pred_logits"] for out in layers])
        boxes = torch.stack([out["pred_boxes"] for out in layers])
        L, B, Q = logits.shape[:3]
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            return [[logits.new_zeros(Q, 0).cpu() for _ in targets] for _ in layers]
        labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets]).float()
        logits, boxes = logits.flatten(0, 2).float(), boxes.flatten(0, 2).float()
        giou = generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target_boxes), self.loss.giou_eps)
        modulation = None
        if self.cfg.position_beta > 0:  # per layer: the rescaling is per image
            modulation = torch.cat([position_modulation(layer, B, sizes) for layer in giou.view(L, B * Q, -1)])
            modulation = modulation ** self.cfg.position_beta
        cost = (self.cfg.cost_bbox * torch.cdist(boxes, target_boxes, p=1)
                + self.cfg.cost_class * self.class_cost(logits, labels, modulation) - self.cfg.cost_giou * giou)
        cost = cost.cpu()  # the only host sync; the finiteness check below runs on the copy
        if not torch.isfinite(cost).all():
            raise FloatingPointError("non-finite matching cost: the model's outputs contain NaN or Inf")
        per_image = cost.view(L, B, Q, -1).split(sizes, dim=-1)  # per image: [L, B, Q, n_i]
        return [[c[layer, i] for i, c in enumerate(per_image)] for layer in range(L)]

    def cost_matrices(self, outputs: dict, targets: List[dict]) -> List[torch.Tensor]:
        """One [Q, n_i] cost matrix per image, on the CPU."""
        return self.layer_costs([outputs], targets)[0]

    def assign(self, costs: List[torch.Tensor]) -> Indices:
        indices = []
        for cost in costs:
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def __call__(self, outputs: dict, targets: List[dict]) -> Indices:
        """Per image: (query indices, target indices), sorted by query index."""
        return self.assign(self.cost_matrices(outputs, targets))

    def match_layers(self, layers: List[dict], targets: List[dict]) -> List[Indices]:
        """``__call__`` for several decoder layers' outputs at once (e.g. the last layer and the aux outputs):
        the same assignments, with one batched cost computation and one host transfer instead of one per layer."""
        return [self.assign(costs) for costs in self.layer_costs(layers, targets)]
