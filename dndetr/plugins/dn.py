"""Query denoising (DN-DETR), training only, for any model that turns boxes into positional queries.

Ground-truth objects are copied into ``groups`` groups, each copy gets its own box noise (centre shift within
lambda1*w/2, size scaled within (1 +- lambda2)) and label flipping; the noised label is embedded as the content
query (plus an indicator bit = 1), the noised box becomes the model's positional query. DN queries come first,
padded per group to the batch's largest object count; the self-attention mask keeps matching queries from seeing
them and groups from seeing each other. Their outputs are trained to reconstruct the clean boxes and labels at
every supervised decoder layer; there is no matching: slot k's target is fixed by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from ..config import check
from .base import QueryBlock, QueryPlugin, register_plugin


@dataclass
class DNConfig:
    groups: int = 0  # 0 turns denoising off exactly
    box_noise: float = 0.4  # sets both center_shift (lambda1) and box_scale (lambda2) unless they are given
    center_shift: Optional[float] = None
    box_scale: Optional[float] = None
    label_noise: float = 0.2
    attn_mask: bool = True
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        check(self.groups >= 0, "dn.groups", self.groups, "must be an integer >= 0 (0 = off)")
        check(0.0 <= self.box_noise < 1.0, "dn.box_noise", self.box_noise, "must be in [0, 1)")
        for key in ("center_shift", "box_scale"):
            value = getattr(self, key)
            check(value is None or 0.0 <= value < 1.0, f"dn.{key}", value, "must be null or in [0, 1)")
        check(0.0 <= self.label_noise <= 1.0, "dn.label_noise", self.label_noise, "must be in [0, 1]")
        check(self.loss_weight >= 0, "dn.loss_weight", self.loss_weight, "must be >= 0")

    @property
    def lambda1(self) -> float:
        return self.box_noise if self.center_shift is None else self.center_shift

    @property
    def lambda2(self) -> float:
        return self.box_noise if self.box_scale is None else self.box_scale


@register_plugin
class Denoising(QueryPlugin):
    group = "dn"
    schema = DNConfig
    needs_box_queries = True
    official_prefixes = {"label_enc.": "label_enc."}  # DN-DETR's checkpoints keep the label embedding at the top

    def __init__(self, cfg: DNConfig, num_classes: int, hidden_dim: int):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        # Row num_classes is the "unknown" label: the content of every matching query (as in DN-DAB-DETR).
        self.label_enc = nn.Embedding(num_classes + 1, hidden_dim - 1)

    @staticmethod
    def enabled(cfg: DNConfig) -> bool:
        return cfg.groups > 0

    def adjust_matching(self, content, position):
        unknown = self.label_enc.weight[self.num_classes]
        return content + torch.cat((unknown, unknown.new_zeros(1))), position  # indicator 0: a matching query

    def noise(self, labels: torch.Tensor, boxes: torch.Tensor):
        flip = torch.rand(labels.shape, device=labels.device) < self.cfg.label_noise
        random_labels = torch.randint(0, self.num_classes, labels.shape, device=labels.device)
        labels = torch.where(flip, random_labels, labels)
        wh = boxes[:, 2:]
        span = torch.cat((wh / 2 * self.cfg.lambda1, wh * self.cfg.lambda2), dim=1)
        boxes = boxes + (torch.rand_like(boxes) * 2 - 1) * span
        return labels, boxes.clamp(0, 1)

    def build(self, targets: List[dict], content: torch.Tensor, model) -> Optional[QueryBlock]:
        groups, batch_size, device = self.cfg.groups, content.shape[0], content.device
        counts = [len(t["labels"]) for t in targets]
        per_group = max(counts, default=0)
        pad_size = per_group * groups
        labels = torch.cat([t["labels"] for t in targets]).repeat(groups)
        boxes = torch.cat([t["boxes"] for t in targets]).repeat(groups, 1)
        image = torch.cat([torch.full((n,), b, device=device) for b, n in enumerate(counts)]).long().repeat(groups)
        within = torch.cat([torch.arange(n, device=device) for n in counts]).long()
        slot = (within[None] + per_group * torch.arange(groups, device=device)[:, None]).flatten()

        noised_labels, noised_boxes = self.noise(labels, boxes)
        # Padding slots: zero content (indicator 0) and the centred box (0.5, 0.5, 0.5, 0.5); never supervised.
        dn_content = content.new_zeros(batch_size, pad_size, content.shape[-1])
        dn_content = dn_content.index_put((image, slot), torch.cat(
            (self.label_enc(noised_labels), content.new_ones(len(slot), 1)), dim=1))
        dn_boxes = content.new_full((batch_size, pad_size, 4), 0.5).index_put((image, slot), noised_boxes)
        self_mask = None
        if self.cfg.attn_mask:  # groups must not see each other (they would copy each other's answers)
            group_of = torch.arange(pad_size, device=device) // max(per_group, 1)
            self_mask = group_of[:, None] != group_of[None, :]
        meta = {"image": image, "slot": slot, "labels": labels, "boxes": boxes}
        return QueryBlock(self, dn_content, model.box_query_position(dn_boxes), self_mask=self_mask,
                          seen_by_matching=not self.cfg.attn_mask, meta=meta)

    def loss(self, block: QueryBlock, targets: List[dict], criterion, num_layers: int) -> Dict[str, torch.Tensor]:
        """Reconstruction losses on the real DN slots, normalised by their number on this rank (as the official
        DN-DETR does), weighted by the criterion's weights times ``dn.loss_weight``."""
        meta, total_layers = block.meta, block.logits.shape[0]
        num_dn = len(meta["labels"])
        terms = {}
        for layer in range(total_layers - num_layers, total_layers):
            suffix = "" if layer == total_layers - 1 else f"_{layer}"
            if num_dn == 0:  # keep the DN branch in the graph so every parameter gets a (zero) gradient
                zero = block.logits[layer].sum() * 0 + block.boxes[layer].sum() * 0
                values = {term: zero for term in criterion.weights}
            else:
                logits = block.logits[layer][meta["image"], meta["slot"]]
                boxes = block.boxes[layer][meta["image"], meta["slot"]]
                l1, giou = criterion.box_losses(boxes, meta["boxes"], num_dn)
                values = {"loss_ce": criterion.class_loss(logits[None], meta["labels"][None], num_dn),
                          "loss_bbox": l1, "loss_giou": giou}
            terms.update({term + suffix: value * criterion.weights[term] * self.cfg.loss_weight
                          for term, value in values.items()})
        return terms
