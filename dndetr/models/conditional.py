"""Conditional DETR (Meng et al. 2021): a 2-D reference point per query and a conditional spatial query.

The reference point s = sigmoid(ref_point_head(o_q)) is computed once and shared by all layers; layer l's spatial
query is sine(s) scaled element-wise by lambda_q = query_scale(f_{l-1}) (identity in layer 0); the box head
predicts the centre as an offset from s in logit space and the size directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .base import DetrBase
from .position_encoding import box_sine_embedding
from .registry import register_model
from .transformer import ConditionalDecoderLayer, DecoderStack, inverse_sigmoid, mlp, xavier_init


@dataclass
class ConditionalConfig(ModelConfig):
    pass


def conditional_decoder(cfg) -> DecoderStack:
    layers = [ConditionalDecoderLayer(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation,
                                      first=(i == 0)) for i in range(cfg.dec_layers)]
    decoder = DecoderStack(layers, cfg.hidden_dim)
    decoder.query_scale = mlp(cfg.hidden_dim, cfg.hidden_dim, cfg.hidden_dim, 2)
    return decoder


@register_model("conditional", ConditionalConfig)
class ConditionalDETR(DetrBase):
    official_mlps = DetrBase.official_mlps + ("query_scale", "ref_point_head")

    def __init__(self, cfg, num_classes, **options):
        super().__init__(cfg, num_classes, **options)
        d = cfg.hidden_dim
        self.decoder = conditional_decoder(cfg)
        self.decoder.ref_point_head = mlp(d, d, 2, 2)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        xavier_init(self.encoder, self.decoder)
        self.zero_init_box_head()
        # A box query's centre is the reference point itself; its positional query o_q is a learned projection
        # of the box's sine embedding (so its width and height reach the decoder too).
        self.box_query_proj = self.box_query_head()

    def matching_queries(self, batch_size):
        query_pos = self.query_embed.weight[None].expand(batch_size, -1, -1)
        reference = self.decoder.ref_point_head(query_pos).sigmoid()
        return torch.zeros_like(query_pos), {"pos": query_pos, "ref": reference}

    def box_query_position(self, boxes):
        return {"pos": self.box_query_proj(box_sine_embedding(boxes, self.hidden_dim // 2)), "ref": boxes[..., :2]}

    def decode(self, content, position, memory, padding_mask, pos, self_attn_mask):
        reference_sine = box_sine_embedding(position["ref"], self.hidden_dim // 2)
        out, hs = content, []
        for i, layer in enumerate(self.decoder.layers):
            query_sine = reference_sine if i == 0 else reference_sine * self.decoder.query_scale(out)
            out = layer(out, memory, padding_mask, pos, position["pos"], query_sine, self_attn_mask)
            hs.append(self.decoder.norm(out))
        return torch.stack(hs), position["ref"]

    def predict_boxes(self, hs, references):
        offset = torch.cat((inverse_sigmoid(references), torch.zeros_like(references)), dim=-1)
        return (self.bbox_embed(hs) + offset).sigmoid()
