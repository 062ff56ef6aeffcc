"""H-DETR's hybrid matching, hybrid-branch scheme (Jia et al., CVPR 2023), training only.

A one-to-many branch of ``hybrid.queries`` extra matching queries (their own parameters, drawn as the model draws
its own) is matched by the same Hungarian matcher to the ground truth repeated ``hybrid.k`` times, so every object
gets up to k positives. The branch and the one-to-one (matching) queries cannot see each other in self-attention,
and DN queries do not see it either, so the one-to-one branch computes what it computes at inference, where the
branch does not exist. Its loss terms (prefix ``hybrid_``) are the usual ones with num_boxes = k x #GT, times
``hybrid.loss_weight``. On a two-stage model the branch's queries are the encoder proposals ranked N+1..N+T
(H-DETR's two-stage form) instead of learned rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..config import check
from ..criterion import global_box_count
from .base import QueryBlock, QueryPlugin, matching_block_losses, register_plugin
from .group import own_rows


@dataclass
class HybridConfig:
    queries: int = 0  # one-to-many queries T; 0 = off (H-DETR: 1500 beside 300 one-to-one queries)
    k: int = 6  # each ground-truth object is repeated k times for the one-to-many matching
    loss_weight: float = 1.0  # lambda

    def __post_init__(self) -> None:
        check(self.queries >= 0, "hybrid.queries", self.queries, "must be an integer >= 0 (0 = off)")
        check(self.k >= 1, "hybrid.k", self.k, "must be an integer >= 1")
        check(self.loss_weight >= 0, "hybrid.loss_weight", self.loss_weight, "must be >= 0")


def repeat_targets(targets: List[dict], k: int) -> List[dict]:
    """Each image's objects tiled k times: [o_0 .. o_n-1, o_0 .. o_n-1, ...] (H-DETR's train_hybrid)."""
    return [dict(t, labels=t["labels"].repeat(k), boxes=t["boxes"].repeat(k, 1)) for t in targets]


@register_plugin
class HybridMatching(QueryPlugin):
    group = "hybrid"
    schema = HybridConfig

    def __init__(self, cfg: HybridConfig, num_classes: int, hidden_dim: int):
        super().__init__()
        self.cfg = cfg
        self.rows = None

    @staticmethod
    def enabled(cfg: HybridConfig) -> bool:
        return cfg.queries > 0

    def attach(self, model) -> None:
        # Two-stage models give the branch the proposals ranked N+1..N+T (H-DETR's two-stage form); the others
        # give it T more learned query rows.
        ranked = getattr(model, "rank_more_proposals", lambda count: False)(self.cfg.queries)
        self.rows = None if ranked else own_rows(model, self.cfg.queries)

    def build(self, targets: List[dict], content: torch.Tensor, model) -> Optional[QueryBlock]:
        if self.rows is None:
            content, position = model.queries(content.shape[0], proposals=model.extra_proposals)
        else:
            content, position = model.queries(content.shape[0], dict(self.rows))
        return QueryBlock(self, content, position, sees_matching=False, before_matching=False)

    def loss(self, block: QueryBlock, targets: List[dict], criterion, num_layers: int) -> Dict[str, torch.Tensor]:
        repeated = repeat_targets(targets, self.cfg.k)
        num_boxes = global_box_count(repeated, block.logits.device)
        return matching_block_losses(block, repeated, criterion, num_layers, num_boxes, scale=self.cfg.loss_weight)
