"""What DETR, Conditional DETR and DAB-DETR share: backbone, encoder, heads and the forward pass.

Each model implements the query interface the forward pass (and the denoising module) relies on:

- ``matching_queries(batch_size) -> (content [B,N,d], position)``: the learned matching queries.
- ``dn_position(boxes [B,P,4]) -> position``: how a (noised) ground-truth box becomes this model's positional query.
- ``decode(content, position, memory, padding_mask, pos, self_attn_mask) -> (hs [L,B,N,d], references)``
- ``predict_boxes(hs, references) -> [L,B,N,4]`` (sigmoid cxcywh).

``position`` is a dict of [B, N, ...] tensors (its keys are the model's own), so matching and denoising queries
concatenate key by key along the query axis.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..config import DNConfig, ModelConfig
from ..dn import Denoising
from .backbone import Backbone
from .position_encoding import image_position_encoding
from .transformer import Encoder, EncoderLayer, mlp, mlp_last_linear

Position = Dict[str, torch.Tensor]


class DetrBase(nn.Module, ABC):
    def __init__(self, cfg: ModelConfig, num_classes: int, dn_cfg: Optional[DNConfig] = None,
                 train_backbone: bool = True):
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        self.num_classes = num_classes
        self.hidden_dim = d
        self.backbone = Backbone(cfg.backbone, train_backbone)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, kernel_size=1)
        encoder_layer = EncoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation)
        self.encoder = Encoder(encoder_layer, cfg.enc_layers, d, scale_pos=(cfg.name == "dab"))
        # CE models keep a no-object logit (last index); focal models predict one sigmoid per class.
        self.class_embed = nn.Linear(d, num_classes + (1 if cfg.class_loss == "ce" else 0))
        self.bbox_embed = mlp(d, d, 4, 3)
        if cfg.class_loss == "focal":
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        self.dn = Denoising(dn_cfg, num_classes, d) if dn_cfg is not None and dn_cfg.groups > 0 else None

    def zero_init_box_head(self) -> None:
        """Conditional and DAB predict offsets from a reference, so the last box layer starts at zero."""
        last = mlp_last_linear(self.bbox_embed)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    # -- the query interface, implemented by each model ------------------------------------------------------
    @abstractmethod
    def matching_queries(self, batch_size: int) -> Tuple[torch.Tensor, Position]:
        """The learned matching queries: content [B,N,d] and position."""

    @abstractmethod
    def dn_position(self, boxes: torch.Tensor) -> Position:
        """Positional query of (noised) ground-truth boxes [B,P,4]."""

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
        self_attn_mask, dn_meta = None, None
        if self.dn is not None:
            content = content + self.dn.matching_content()
            if self.training and targets is not None:
                content, position, self_attn_mask, dn_meta = self.dn.prepare(targets, content, position,
                                                                              self.dn_position)
        hs, references = self.decode(content, position, memory, padding_mask, pos, self_attn_mask)
        logits, boxes = self.class_embed(hs), self.predict_boxes(hs, references)
        outputs = {}
        if dn_meta is not None:
            (logits, boxes), outputs["dn"] = self.dn.split(logits, boxes, dn_meta)
        outputs["pred_logits"], outputs["pred_boxes"] = logits[-1], boxes[-1]
        if self.cfg.aux_loss:
            outputs["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return outputs
