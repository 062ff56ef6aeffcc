"""DAB-Deformable-DETR (DAB-DETR's deformable variant; with ``dn=dn_detr`` DN-DETR's DN-Deformable-DETR++).

Deformable DETR with 4-D anchor boxes as queries: a learned content query (tgt_embed) and a learned unsigmoided
anchor (refpoint_embed) per query. Every layer samples with the anchor as a box reference, its positional query
is ref_point_head(sine(anchor)), scaled by query_scale(f) after the first layer, and box refinement is always on.
DN/DAB conventions (not Deformable DETR's): inverse_sigmoid eps 1e-3, two learning-rate groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dab import DABDETR
from .deformable_base import DeformableBase, MultiScaleConfig
from .deformable_transformer import DeformableDecoderLayer, decoder_stack, reset_deformable_attention
from .position_encoding import box_sine_embedding
from .registry import register_model
from .transformer import inverse_sigmoid, mlp


@dataclass
class DABDeformableConfig(MultiScaleConfig):
    random_refpoints_xy: bool = False  # anchor centres start uniform in the image (and stay trainable)


@register_model("dab_deformable", DABDeformableConfig)
class DABDeformableDETR(DeformableBase):
    inverse_sigmoid_eps = 1e-3
    official_aliases = {"transformer.decoder.bbox_embed.": "bbox_embed."}  # the refinement box heads, twice
    # With denoising, the matching content stays tgt_embed alone (the official DN-DAB-Deformable-DETR; DN-DAB-DETR
    # adds the "unknown" label embedding instead).
    plugin_content = False
    query_modules = ("refpoint_embed", "tgt_embed")
    init_anchors = DABDETR.init_anchors  # random_refpoints_xy, as DAB-DETR

    def __init__(self, cfg, num_classes, **options):
        super().__init__(cfg, num_classes, **options)
        d = cfg.hidden_dim
        layer = DeformableDecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation,
                                       cfg.num_feature_levels, cfg.dec_n_points)
        self.decoder = nn.Module()
        self.decoder.layers = decoder_stack(layer, cfg.dec_layers)
        self.decoder.query_scale = mlp(d, d, d, 2)
        self.decoder.ref_point_head = mlp(2 * d, d, d, 2)
        reset_deformable_attention(self.encoder, self.decoder)
        self.reset_level_embed()
        self.refpoint_embed = nn.Embedding(cfg.num_queries, 4)
        self.init_anchors(self.refpoint_embed.weight)
        self.build_heads(cfg.dec_layers, shared=False)
        # With box-query plug-ins (denoising), the last content channel is DN's indicator bit (0 for matching).
        # Drawn last, so that turning DN on changes no other initial value.
        self.tgt_embed = nn.Embedding(cfg.num_queries, d - 1 if self.box_queries else d)

    def new_query_rows(self, count):
        rows = DeformableBase.new_query_rows(self, count)
        self.init_anchors(rows["refpoint_embed"])
        return rows

    def matching_queries(self, batch_size, rows=None):
        content = self.query_rows("tgt_embed", rows)
        if self.box_queries:
            content = torch.cat((content, content.new_zeros(content.shape[0], 1)), dim=-1)
        anchors = self.query_rows("refpoint_embed", rows)
        return content[None].expand(batch_size, -1, -1), {"anchor": anchors[None].expand(batch_size, -1, -1)}

    def box_query_position(self, boxes):
        return {"anchor": inverse_sigmoid(boxes, self.inverse_sigmoid_eps)}

    def initial_reference(self, position):
        return position["anchor"].sigmoid()

    def layer_query_pos(self, index, position, level_refs, out):
        # The sine embedding of the level-0 (valid-ratio scaled) box, in y, x, w, h order.
        query_pos = self.decoder.ref_point_head(box_sine_embedding(level_refs[:, :, 0], self.hidden_dim // 2))
        return query_pos if index == 0 else query_pos * self.decoder.query_scale(out)
