"""DETR (Carion et al. 2020): learned positional queries, zero content, boxes predicted directly."""
from __future__ import annotations

import copy

import torch

from .base import DetrBase
from .position_encoding import box_sine_embedding
from .transformer import DecoderStack, DetrDecoderLayer, mlp, xavier_init
from torch import nn


class DETR(DetrBase):
    def __init__(self, cfg, num_classes, dn_cfg=None, train_backbone=True):
        super().__init__(cfg, num_classes, dn_cfg, train_backbone)
        d = cfg.hidden_dim
        layer = DetrDecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation)
        self.decoder = DecoderStack([copy.deepcopy(layer) for _ in range(cfg.dec_layers)], d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        xavier_init(self.encoder, self.decoder)
        # Denoising: a noised box enters as a learned projection of its sine embedding (DN-DETR's vanilla-DETR variant).
        self.dn_pos_head = mlp(2 * d, d, d, 2) if self.dn is not None else None

    def matching_queries(self, batch_size):
        query_pos = self.query_embed.weight[None].expand(batch_size, -1, -1)
        return torch.zeros_like(query_pos), {"pos": query_pos}

    def dn_position(self, boxes):
        return {"pos": self.dn_pos_head(box_sine_embedding(boxes, self.hidden_dim // 2))}

    def decode(self, content, position, memory, padding_mask, pos, self_attn_mask):
        out, hs = content, []
        for layer in self.decoder.layers:
            out = layer(out, memory, padding_mask, pos, position["pos"], self_attn_mask)
            hs.append(self.decoder.norm(out))
        return torch.stack(hs), None

    def predict_boxes(self, hs, references):
        return self.bbox_embed(hs).sigmoid()
