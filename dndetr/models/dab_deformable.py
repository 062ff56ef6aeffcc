"""DAB-Deformable-DETR (DAB-DETR's deformable variant; with ``dn=dn_detr`` DN-DETR's DN-Deformable-DETR++).

Deformable DETR with 4-D anchor boxes as queries: a learned content query (tgt_embed) and a learned unsigmoided
anchor (refpoint_embed) per query. Every layer samples with the anchor as a box reference, its positional query
is ref_point_head(sine(anchor)), scaled by query_scale(f) after the first layer, and box refinement is always on.
DN/DAB conventions (not Deformable DETR's): inverse_sigmoid eps 1e-3, two learning-rate groups.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from .deformable_base import DeformableBase, random_anchor_centres
from .deformable_transformer import DeformableDecoderLayer, decoder_stack, reset_deformable_attention
from .position_encoding import box_sine_embedding
from .transformer import inverse_sigmoid, mlp


class DABDeformableDETR(DeformableBase):
    inverse_sigmoid_eps = 1e-3
    official_aliases = ("bbox_embed.",)  # the official decoder holds the refinement box heads too
    # With DN the matching content is tgt_embed alone (DN-DAB-DETR's is the "unknown" label embedding).
    adds_unknown_label = False

    def __init__(self, cfg, num_classes, dn_cfg=None, train_backbone=True):
        for key in ("two_stage", "num_patterns"):
            if getattr(cfg, key):
                raise ConfigError(f"model.{key}={getattr(cfg, key)!r} is invalid for dab_deformable: not supported "
                                  "(the DN-DETR code fails on it; use model=deformable for two-stage)")
        super().__init__(cfg, num_classes, dn_cfg, train_backbone)
        d = cfg.hidden_dim
        layer = DeformableDecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation,
                                       cfg.num_feature_levels, cfg.dec_n_points)
        self.decoder = nn.Module()
        self.decoder.layers = decoder_stack(layer, cfg.dec_layers)
        self.decoder.query_scale = mlp(d, d, d, 2)
        self.decoder.ref_point_head = mlp(2 * d, d, d, 2)
        reset_deformable_attention(self.encoder, self.decoder)
        self.reset_level_embed()
        # With denoising, the last content channel is DN's indicator bit (0 for matching queries).
        self.tgt_embed = nn.Embedding(cfg.num_queries, d - 1 if self.dn is not None else d)
        self.refpoint_embed = nn.Embedding(cfg.num_queries, 4)
        if cfg.random_refpoints_xy:
            random_anchor_centres(self.refpoint_embed)
        self.build_heads(cfg.dec_layers, shared=False)

    def matching_queries(self, memory, proposals):
        batch_size, content = memory.src.shape[0], self.tgt_embed.weight
        if self.dn is not None:
            content = torch.cat((content, content.new_zeros(content.shape[0], 1)), dim=-1)
        anchors = self.refpoint_embed.weight
        return content[None].expand(batch_size, -1, -1), {"anchor": anchors[None].expand(batch_size, -1, -1)}

    def dn_position(self, boxes):
        return {"anchor": inverse_sigmoid(boxes, self.inverse_sigmoid_eps)}

    def initial_reference(self, position):
        return position["anchor"].sigmoid()

    def layer_query_pos(self, index, position, level_refs, out):
        # The sine embedding of the level-0 (valid-ratio scaled) box, in y, x, w, h order.
        query_pos = self.decoder.ref_point_head(box_sine_embedding(level_refs[:, :, 0], self.hidden_dim // 2))
        return query_pos if index == 0 else query_pos * self.decoder.query_scale(out)
