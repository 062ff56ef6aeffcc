"""The decoder layer of DN-Deformable-DETR's "deformable encoder only" variant (DN-DETR, CVPR 2022).

It is DAB-DETR's conditional decoder layer whose cross-attention reads a multi-scale memory densely: every query
attends to every token of each level separately (per head, content and spatial parts concatenated: 2 x head_dim
for queries and keys, no input/output projection inside the attention), and the per-level results are mixed with
weights softmax(lvl_attn(q_sa)) over levels, where q_sa is the layer's self-attention query. A shared
``ca_out_v_proj`` then projects the mix. Parameter names follow the official checkpoint. The official per-level
attention also applies dropout to its attention weights; it is 0 in every published setting and omitted here.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .transformer import ConditionalDecoderLayer


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor, nheads: int):
    """q [B,Q,2d], k [B,S,2d], v [B,S,d], padding_mask [B,S] -> [B,Q,d]. Scaled by 1/sqrt(2d/heads).

    Padded keys get the most negative finite score rather than -inf, so that a level that is all padding for an
    image (a thin image at stride 64) averages its zeroed-out values instead of producing NaN."""
    B, Q, _ = q.shape
    q, k, v = (t.view(B, t.shape[1], nheads, -1).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, Q, -1)


class MultiLevelDecoderLayer(ConditionalDecoderLayer):
    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, activation: str,
                 first: bool, n_levels: int):
        super().__init__(d_model, nheads, dim_feedforward, dropout, activation, first)
        del self.cross_attn  # replaced by per-level attention without projections
        self.ca_out_v_proj = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.ca_out_v_proj.bias)
        self.lvl_attn = nn.Linear(d_model, n_levels)

    def forward(self, tgt, memory, padding_mask, pos, query_pos, query_sine, self_attn_mask=None):
        """The conditional layer's signature, with ``memory`` a MultiScaleMemory (its tokens ``src`` and level
        ``shapes`` are used); padding_mask and pos [B,S,d] (with the level embedding) are memory.mask/memory.pos."""
        shapes = memory.shapes
        memory = memory.src
        tgt, q_sa = self.self_attention(tgt, query_pos, self_attn_mask)
        level_weights = self.lvl_attn(q_sa).softmax(-1)  # [B, Q, L]
        q, k = self.cross_queries_keys(tgt, memory, pos, query_pos, query_sine)
        v = self.ca_v_proj(memory)
        sizes = [h * w for h, w in shapes]
        mixed = 0
        for lvl, (k_l, v_l, mask_l) in enumerate(zip(k.split(sizes, 1), v.split(sizes, 1),
                                                     padding_mask.split(sizes, 1))):
            mixed = mixed + level_weights[..., lvl:lvl + 1] * attend(q, k_l, v_l, mask_l, self.nheads)
        # The output projection is linear and the level weights sum to 1: projecting the mix equals mixing the
        # projected per-level outputs, as the official layer does.
        tgt = self.norm2(tgt + self.dropout2(self.ca_out_v_proj(mixed)))
        return self.norm3(tgt + self.ffn(tgt))
