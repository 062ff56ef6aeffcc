"""DAB-DETR (Liu et al. 2022): 4-D anchor boxes as queries, refined layer by layer.

Per layer: the anchor's sine embedding gives the positional query (ref_point_head) and, scaled by
query_scale(f) and by the width/height modulation ref_anchor_head(f) / (w, h), the spatial cross-attention
query. After each layer the shared box head refines the anchor; the refined anchor is detached before the next.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig, check
from .base import DetrBase
from .conditional import conditional_decoder
from .position_encoding import box_sine_embedding
from .registry import register_model
from .transformer import inverse_sigmoid, mlp, xavier_init

ANCHOR_EPS = 1e-3  # DAB-DETR's inverse_sigmoid epsilon (Conditional DETR uses 1e-5)


@dataclass
class DABConfig(ModelConfig):
    num_patterns: int = 0  # pattern embeddings: num_patterns * num_queries queries (DAB-DETR's "3 patterns")
    random_refpoints_xy: bool = False  # anchor centres start uniform in the image (and stay trainable)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_patterns >= 0, "model.num_patterns", self.num_patterns, "must be >= 0")


@register_model("dab", DABConfig)
class DABDETR(DetrBase):
    encoder_scales_pos = True
    official_mlps = DetrBase.official_mlps + ("query_scale", "ref_point_head", "ref_anchor_head")
    # DAB-DETR stores the shared box head a second time under the decoder.
    official_aliases = {"transformer.decoder.bbox_embed.": "bbox_embed."}

    def __init__(self, cfg, num_classes, **options):
        super().__init__(cfg, num_classes, **options)
        d = cfg.hidden_dim
        self.decoder = conditional_decoder(cfg)
        self.decoder.ref_point_head = mlp(2 * d, d, d, 2)
        self.decoder.ref_anchor_head = mlp(d, d, 2, 2)
        xavier_init(self.encoder, self.decoder)
        self.refpoint_embed = nn.Embedding(cfg.num_queries, 4)
        if cfg.random_refpoints_xy:
            # As in the official code, x,y start uniform in the image but remain trainable.
            with torch.no_grad():
                self.refpoint_embed.weight[:, :2].uniform_(0, 1)
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(self.refpoint_embed.weight[:, :2])
        self.patterns = nn.Embedding(cfg.num_patterns, d) if cfg.num_patterns > 0 else None
        self.zero_init_box_head()

    def matching_queries(self, batch_size):
        anchors = self.refpoint_embed.weight
        content = anchors.new_zeros(anchors.shape[0], self.hidden_dim)
        if self.patterns is not None:
            # Pattern-major: every pattern is paired with every anchor (num_patterns * num_queries queries).
            content = self.patterns.weight.repeat_interleave(anchors.shape[0], dim=0)
            anchors = anchors.repeat(self.cfg.num_patterns, 1)
        return content[None].expand(batch_size, -1, -1), {"anchor": anchors[None].expand(batch_size, -1, -1)}

    def box_query_position(self, boxes):
        return {"anchor": inverse_sigmoid(boxes, ANCHOR_EPS)}

    def decode(self, content, position, memory, padding_mask, pos, self_attn_mask):
        d, num_layers = self.hidden_dim, len(self.decoder.layers)
        anchors = position["anchor"].sigmoid()
        references, hs, out = [anchors], [], content
        for i, layer in enumerate(self.decoder.layers):
            sine = box_sine_embedding(anchors, d // 2)  # (y, x, w, h) parts
            query_pos = self.decoder.ref_point_head(sine)
            query_sine = sine[..., :d] if i == 0 else sine[..., :d] * self.decoder.query_scale(out)
            # Modulate the y and x parts by the predicted reference size over the anchor's own size.
            ref_hw = self.decoder.ref_anchor_head(out).sigmoid()
            modulation = torch.cat(((ref_hw[..., 1] / anchors[..., 3])[..., None].expand(-1, -1, d // 2),
                                    (ref_hw[..., 0] / anchors[..., 2])[..., None].expand(-1, -1, d // 2)), dim=-1)
            out = layer(out, memory, padding_mask, pos, query_pos, query_sine * modulation, self_attn_mask)
            hs.append(self.decoder.norm(out))
            if i < num_layers - 1:
                refined = (self.bbox_embed(out) + inverse_sigmoid(anchors, ANCHOR_EPS)).sigmoid()
                references.append(refined)
                anchors = refined.detach()
        return torch.stack(hs), torch.stack(references)

    def predict_boxes(self, hs, references):
        return (self.bbox_embed(hs) + inverse_sigmoid(references, ANCHOR_EPS)).sigmoid()
