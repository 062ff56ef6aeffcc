"""What every model shares: backbone, encoder, heads and the forward pass with the query plug-ins.

Each model implements the query interface the forward pass (and the query plug-ins) rely on:

- ``matching_queries(batch_size) -> (content [B,N,d], position)``: the learned matching queries.
- ``box_query_position(boxes [B,P,4]) -> position``: how a (noised) box becomes this model's positional query
  (used by plug-ins that put boxes in as queries, such as denoising).
- ``decode(content, position, memory, padding_mask, pos, self_attn_mask) -> (hs [L,B,N,d], references)``
- ``predict_boxes(hs, references) -> [L,B,N,4]`` (sigmoid cxcywh).

``position`` is a dict of [B, N, ...] tensors (its keys are the model's own), so matching queries and plug-in
queries concatenate key by key along the query axis.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import ModelConfig
from ..plugins.base import assemble, isolated_init, split_outputs
from .backbone import Backbone
from .position_encoding import image_position_encoding
from .transformer import Encoder, EncoderLayer, mlp, mlp_last_linear

Position = Dict[str, torch.Tensor]


class DetrBase(nn.Module, ABC):
    registry_name = ""  # set by @register_model
    encoder_scales_pos = False  # DAB-DETR rescales the image PE by an MLP of the running content
    # Official checkpoint layout (dndetr/official.py): MLPs stored as ``<name>.layers.<i>``, and aliases under which
    # the official model stores one of our tensors a second time (official prefix -> our prefix).
    official_mlps: Tuple[str, ...] = ("bbox_embed",)
    official_aliases: Dict[str, str] = {}

    def __init__(self, cfg: ModelConfig, num_classes: int, no_object_class: bool = True, box_queries: bool = False,
                 train_backbone: bool = True):
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        self.num_classes = num_classes
        self.hidden_dim = d
        self.box_queries = box_queries
        self.plugins = nn.ModuleDict()  # training-time query plug-ins, set by build_model
        self.backbone = Backbone(cfg.backbone, train_backbone)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, kernel_size=1)
        encoder_layer = EncoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation)
        self.encoder = Encoder(encoder_layer, cfg.enc_layers, d, scale_pos=self.encoder_scales_pos)
        # CE models keep a no-object logit (last index); focal models predict one sigmoid per class.
        self.class_embed = nn.Linear(d, num_classes + (1 if no_object_class else 0))
        self.bbox_embed = mlp(d, d, 4, 3)
        if not no_object_class:
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))

    def zero_init_box_head(self) -> None:
        """Conditional and DAB predict offsets from a reference, so the last box layer starts at zero."""
        last = mlp_last_linear(self.bbox_embed)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def box_query_head(self) -> Optional[nn.Module]:
        """For models whose positional query is not a box: a learned projection of a box's sine embedding, built
        only when a plug-in needs box queries, from its own generator (so it shifts no other initial value)."""
        if not self.box_queries:
            return None
        with isolated_init("box_query_head"):
            return mlp(2 * self.hidden_dim, self.hidden_dim, self.hidden_dim, 2)

    def param_groups(self, lr: float, lr_backbone: float) -> List[dict]:
        """Optimiser parameter groups; a model with its own learning-rate rules overrides this."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if not n.startswith("backbone.")], "lr": lr}]
        backbone = [p for n, p in named if n.startswith("backbone.")]
        if backbone:
            groups.append({"params": backbone, "lr": lr_backbone})
        return groups

    # -- the query interface, implemented by each model ------------------------------------------------------
    @abstractmethod
    def matching_queries(self, batch_size: int) -> Tuple[torch.Tensor, Position]:
        """The learned matching queries: content [B,N,d] and position."""

    @abstractmethod
    def box_query_position(self, boxes: torch.Tensor) -> Position:
        """Positional query of (noised) boxes [B,P,4] (sigmoid cxcywh)."""

    @abstractmethod
    def decode(self, content, position, memory, padding_mask, pos, self_attn_mask):
        """Run the decoder: returns hs [L,B,N,d] and the model's box references."""

    @abstractmethod
    def predict_boxes(self, hs, references) -> torch.Tensor:
        """Boxes [L,B,N,4] (sigmoid cxcywh) from the decoder states."""

    # -- the shared forward pass -----------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, masks: torch.Tensor):
        features, padding_mask = self.backbone(images, masks)
        src = self.input_proj(features).flatten(2).transpose(1, 2)
        pos = image_position_encoding(padding_mask, self.hidden_dim // 2, self.cfg.pe_temperature).to(src.dtype)
        padding_mask = padding_mask.flatten(1)
        return self.encoder(src, padding_mask, pos), padding_mask, pos

    def forward(self, images: torch.Tensor, masks: torch.Tensor, targets=None) -> dict:
        memory, padding_mask, pos = self.encode(images, masks)
        content, position = self.matching_queries(images.shape[0])
        for plugin in self.plugins.values():
            content, position = plugin.adjust_matching(content, position)
        blocks = []
        if self.training and targets is not None:
            blocks = [block for plugin in self.plugins.values()
                      if (block := plugin.build(targets, content, self)) is not None]
        self_attn_mask = None
        if blocks:
            content, position, self_attn_mask, matching = assemble(blocks, content, position)
        hs, references = self.decode(content, position, memory, padding_mask, pos, self_attn_mask)
        logits, boxes = self.class_embed(hs), self.predict_boxes(hs, references)
        outputs = {}
        if blocks:
            logits, boxes = split_outputs(blocks, matching, logits, boxes)
            outputs["query_blocks"] = blocks
        outputs["pred_logits"], outputs["pred_boxes"] = logits[-1], boxes[-1]
        if self.cfg.aux_loss:
            outputs["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return outputs
