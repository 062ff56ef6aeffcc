"""Query denoising (DN-DETR), training only, for any model that turns boxes into positional queries.

Ground-truth objects are copied into ``groups`` groups, each copy gets its own box noise (centre shift within
lambda1*w/2, size scaled within (1 +- lambda2)) and label flipping; the noised label is embedded as the content
query (plus an indicator bit = 1), the noised box becomes the model's positional query. DN queries come first,
padded per group to the batch's largest object count; the self-attention mask keeps matching queries from seeing
them and groups from seeing each other. Their outputs are trained to reconstruct the clean boxes and labels at
every supervised decoder layer; there is no matching: slot k's target is fixed by construction.

DINO's contrastive denoising (``dn.contrastive``) gives every object of a group a second, negative query noised
farther (corner shifts in (1, 2) x box_noise x half the side instead of (0, 1)) and trained towards "no object".
DINO's ``dn_number`` budget is ``dn.num_queries``: the number of groups follows the batch's largest object count,
so the DN part has at most num_queries positives. Any configuration is cut to ``dn.max_queries`` DN slots per image.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn
from torchvision.ops import box_convert

from ..boxes import cxcywh_to_xyxy
from ..config import check
from .base import QueryBlock, QueryPlugin, layer_suffixes, register_plugin


log = logging.getLogger(__name__)


@dataclass
class DNConfig:
    groups: int = 0  # fixed number of DN groups; 0 (and num_queries 0) turns denoising off exactly
    # DINO's budget (dn_number): groups = max(1, num_queries // largest object count of the batch); 0 = use groups
    num_queries: int = 0
    contrastive: bool = False  # DINO: each group also holds a negative (farther noised, "no object") per object
    # cap on the DN slots per image (negatives and padding included): fewer groups for that batch, logged once
    max_queries: int = 1000
    box_noise: float = 0.4  # sets both center_shift (lambda1) and box_scale (lambda2) unless they are given
    center_shift: Optional[float] = None
    box_scale: Optional[float] = None
    label_noise: float = 0.2
    attn_mask: bool = True
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        check(self.groups >= 0, "dn.groups", self.groups, "must be an integer >= 0 (0 = off)")
        check(self.num_queries >= 0, "dn.num_queries", self.num_queries, "must be an integer >= 0 (0 = use dn.groups)")
        check(not (self.groups and self.num_queries), "dn.num_queries", self.num_queries,
              f"must be 0 when dn.groups={self.groups} is set (give the number of groups or the budget, not both)")
        check(self.max_queries >= 1, "dn.max_queries", self.max_queries, "must be an integer >= 1")
        check(self.num_queries * self.copies <= self.max_queries, "dn.num_queries", self.num_queries,
              f"needs at most dn.max_queries={self.max_queries} DN slots ({self.copies} per query)")
        # DINO-style configs use box noise 1.0: a corner moves by at most the box's side, which is still a box.
        check(0.0 <= self.box_noise < 1.0 or (self.contrastive and self.box_noise == 1.0), "dn.box_noise",
              self.box_noise, "must be in [0, 1) ([0, 1] with dn.contrastive)")
        for key in ("center_shift", "box_scale"):
            value = getattr(self, key)
            check(value is None or 0.0 <= value < 1.0, f"dn.{key}", value, "must be null or in [0, 1)")
        check(0.0 <= self.label_noise <= 1.0, "dn.label_noise", self.label_noise, "must be in [0, 1]")
        check(self.loss_weight >= 0, "dn.loss_weight", self.loss_weight, "must be >= 0")

    @property
    def copies(self) -> int:
        """DN queries per object and group: a positive, and a negative when contrastive."""
        return 2 if self.contrastive else 1

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
        self.capped = False  # the max_queries cap has been logged

    @staticmethod
    def enabled(cfg: DNConfig) -> bool:
        return cfg.groups > 0 or cfg.num_queries > 0

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

    def contrastive_noise(self, labels: torch.Tensor, boxes: torch.Tensor, negative: torch.Tensor):
        """DINO: labels flipped with probability label_noise / 2; every corner moved by a random sign times
        r * (w/2 or h/2) * box_noise, r ~ U(0, 1) for positives and U(1, 2) for negatives, in xyxy space."""
        flip = torch.rand(labels.shape, device=labels.device) < self.cfg.label_noise * 0.5
        random_labels = torch.randint(0, self.num_classes, labels.shape, device=labels.device)
        labels = torch.where(flip, random_labels, labels)
        half = boxes[:, 2:].repeat(1, 2) / 2
        sign = torch.randint(0, 2, boxes.shape, device=boxes.device) * 2 - 1
        r = torch.rand_like(boxes) + negative[:, None].to(boxes.dtype)
        corners = (cxcywh_to_xyxy(boxes) + sign * r * half * self.cfg.box_noise).clamp(0, 1)
        return labels, box_convert(corners, "xyxy", "cxcywh")

    def num_groups(self, per_group: int) -> int:
        """The fixed ``groups`` or DINO's budget, cut to ``max_queries`` DN slots per image (never below one)."""
        slots = max(per_group, 1) * self.cfg.copies
        groups = self.cfg.groups or max(1, self.cfg.num_queries // max(per_group, 1))
        if groups * slots > self.cfg.max_queries and groups > 1:
            capped = max(1, self.cfg.max_queries // slots)
            if not self.capped:
                log.warning("dn: %d groups x %d slots exceed dn.max_queries=%d; using %d groups for such batches "
                            "(logged once)", groups, slots, self.cfg.max_queries, capped)
                self.capped = True
            groups = capped
        return groups

    def build(self, targets: List[dict], content: torch.Tensor, model) -> Optional[QueryBlock]:
        batch_size, device, copies = content.shape[0], content.device, self.cfg.copies
        counts = [len(t["labels"]) for t in targets]
        per_group = max(counts, default=0)
        groups = self.num_groups(per_group)
        pad_size = per_group * groups * copies
        # Group-major; inside a group the positives, then (contrastive) the negatives: part p = g * copies + c.
        parts = groups * copies
        labels = torch.cat([t["labels"] for t in targets]).repeat(parts)
        boxes = torch.cat([t["boxes"] for t in targets]).repeat(parts, 1)
        image = torch.cat([torch.full((n,), b, device=device) for b, n in enumerate(counts)]).long().repeat(parts)
        within = torch.cat([torch.arange(n, device=device) for n in counts]).long()
        part = torch.arange(parts, device=device)[:, None].expand(-1, len(within)).flatten()
        slot = within.repeat(parts) + per_group * part
        negative = part % copies == 1

        if self.cfg.contrastive:
            noised_labels, noised_boxes = self.contrastive_noise(labels, boxes, negative)
        else:
            noised_labels, noised_boxes = self.noise(labels, boxes)
        # Padding slots: zero content (indicator 0) and the centred box (0.5, 0.5, 0.5, 0.5); never supervised.
        dn_content = content.new_zeros(batch_size, pad_size, content.shape[-1])
        dn_content = dn_content.index_put((image, slot), torch.cat(
            (self.label_enc(noised_labels), content.new_ones(len(slot), 1)), dim=1))
        dn_boxes = content.new_full((batch_size, pad_size, 4), 0.5).index_put((image, slot), noised_boxes)
        # Negatives are trained towards "no object" (class index num_classes) and get no box loss.
        meta = {"image": image, "slot": slot, "labels": labels.masked_fill(negative, self.num_classes),
                "boxes": boxes, "positive": ~negative, "groups": groups}
        # With the mask, groups must not see each other (they would copy each other's answers).
        return QueryBlock(self, dn_content, model.box_query_position(dn_boxes),
                          groups=groups if self.cfg.attn_mask else 1, seen_by_matching=not self.cfg.attn_mask,
                          meta=meta)

    def loss(self, block: QueryBlock, targets: List[dict], criterion, num_layers: int) -> Dict[str, torch.Tensor]:
        """Reconstruction losses on the real DN slots, normalised by the number of positive DN queries on this
        rank (as the official DN-DETR does): the class loss on positives and negatives (whose target is no
        object), the box losses on positives; weighted by the criterion's fixed-target weights x dn.loss_weight."""
        meta, weights = block.meta, criterion.fixed_target_weights
        positive = meta["positive"]
        num_dn = int(positive.sum())
        supervised = layer_suffixes(block.logits.shape[0], num_layers)
        first = supervised[0][0]
        if num_dn == 0:  # keep the DN branch in the graph so every parameter gets a (zero) gradient
            zero = block.logits[first:].sum() * 0 + block.boxes[first:].sum() * 0
            values = {term: zero.expand(len(supervised)) for term in weights}
        else:  # every supervised layer at once: [L, N] slots
            logits = block.logits[first:, meta["image"], meta["slot"]]
            boxes = block.boxes[first:, meta["image"], meta["slot"]][:, positive]
            target_boxes = meta["boxes"][positive].expand_as(boxes)
            l1, giou = criterion.box_losses(boxes, target_boxes, num_dn)
            labels = meta["labels"].expand(len(supervised), -1)
            values = {"loss_ce": criterion.class_loss(logits, labels, num_dn), "loss_bbox": l1, "loss_giou": giou}
        terms = {}
        for index, (_, suffix) in enumerate(supervised):
            terms.update({term + suffix: value[index] * weights[term] * self.cfg.loss_weight
                          for term, value in values.items()})
        return terms
