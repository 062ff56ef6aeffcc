"""Group DETR (Chen et al., ICCV 2023): K groups of matching queries in training, one at inference.

Groups 1..K-1 are extra copies of the model's matching queries (their own parameters, drawn as the model draws its
own, ``model.new_query_rows``); they share every other parameter. Each group sees only itself in the decoder's
self-attention (the groups go on the batch axis there; the matching queries are group 0 and never see the
others) and is matched one-to-one to the targets on its own, so every object gets K positives. The loss is the
average over groups of the usual loss, as the authors' code does it with num_boxes x K: group 0's terms are
scaled by 1/K through ``matching_loss_scale`` and the other groups' terms (prefix ``group_``) carry (K-1)/K of
their mean. At inference no block is built, so the model is the baseline model; the extra rows stay in the
state dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from ..config import ConfigError, check
from ..criterion import global_box_count
from .base import QueryBlock, QueryPlugin, matching_block_losses, register_plugin


@dataclass
class GroupConfig:
    groups: int = 1  # K groups of matching queries in training; 1 = off (Group DETR: 11)

    def __post_init__(self) -> None:
        check(self.groups >= 1, "group.groups", self.groups, "must be an integer >= 1 (1 = off)")


def concat_queries(parts: List[tuple]):
    """Concatenate (content, position) pairs along the query axis."""
    content = torch.cat([c for c, _ in parts], dim=1)
    position = {key: torch.cat([p[key] for _, p in parts], dim=1) for key in parts[0][1]}
    return content, position


def own_rows(model, count: int) -> nn.ParameterDict:
    """Parameters for ``count`` more of the model's matching queries (their own initial values)."""
    rows = model.new_query_rows(count)  # a model whose queries are not learned rows refuses (ConfigError) itself
    if not rows:
        raise ConfigError(f"model.name={model.registry_name!r} is invalid: it names no matching-query parameters "
                          "(query_modules), so it cannot make extra query groups")
    return nn.ParameterDict({name: nn.Parameter(value.clone()) for name, value in rows.items()})


@register_plugin
class GroupDETR(QueryPlugin):
    group = "group"
    schema = GroupConfig

    def __init__(self, cfg: GroupConfig, num_classes: int, hidden_dim: int):
        super().__init__()
        self.cfg = cfg
        self.extra = nn.ModuleList()  # one ParameterDict of query rows per extra group

    @staticmethod
    def enabled(cfg: GroupConfig) -> bool:
        return cfg.groups > 1

    def attach(self, model) -> None:
        self.extra = nn.ModuleList(own_rows(model, model.cfg.num_queries) for _ in range(self.cfg.groups - 1))

    @property
    def matching_loss_scale(self) -> float:
        return 1.0 / self.cfg.groups

    def build(self, targets: List[dict], content: torch.Tensor, model) -> Optional[QueryBlock]:
        batch_size = content.shape[0]
        content, position = concat_queries([model.queries(batch_size, dict(rows)) for rows in self.extra])
        return QueryBlock(self, content, position, groups=len(self.extra), sees_matching=False, before_matching=False,
                          meta={"group_size": content.shape[1] // len(self.extra)})

    def probe(self, content: torch.Tensor, model) -> Optional[QueryBlock]:
        return self.build([], content, model)  # every group's eval-mode outputs, for the per-group IS

    def loss(self, block: QueryBlock, targets: List[dict], criterion, num_layers: int) -> Dict[str, torch.Tensor]:
        extra = len(self.extra)
        num_boxes = global_box_count(targets, block.logits.device) * extra  # -> the mean over the extra groups
        return matching_block_losses(block, targets, criterion, num_layers, num_boxes,
                                     scale=extra / self.cfg.groups, copies=extra)
