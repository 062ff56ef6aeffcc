"""DETR (Carion et al. 2020): learned positional queries, zero content, boxes predicted directly."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .base import DetrBase
from .position_encoding import box_sine_embedding
from .registry import register_model
from .transformer import DecoderStack, DetrDecoderLayer, xavier_init


@dataclass
class DETRConfig(ModelConfig):
    pass


@register_model("detr", DETRConfig)
class DETR(DetrBase):
    def __init__(self, cfg, num_classes, **options):
        super().__init__(cfg, num_classes, **options)
        d = cfg.hidden_dim
        layer = DetrDecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation)
        self.decoder = DecoderStack([copy.deepcopy(layer) for _ in range(cfg.dec_layers)], d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        xavier_init(self.encoder, self.decoder)
        # A box enters as a learned projection of its sine embedding (DN-DETR's vanilla-DETR variant).
        self.box_query_proj = self.box_query_head()

    def matching_queries(self, batch_size):
        query_pos = self.query_embed.weight[None].expand(batch_size, -1, -1)
        return torch.zeros_like(query_pos), {"pos": query_pos}

    def box_query_position(self, boxes):
        return {"pos": self.box_query_proj(box_sine_embedding(boxes, self.hidden_dim // 2))}

    def decode(self, content, position, memory, padding_mask, pos, self_attn_mask):
        out, hs = content, []
        for layer in self.decoder.layers:
            out = layer(out, memory, padding_mask, pos, position["pos"], self_attn_mask)
            hs.append(self.decoder.norm(out))
        return torch.stack(hs), None

    def predict_boxes(self, hs, references):
        return self.bbox_embed(hs).sigmoid()
