"""DAB-Deformable-DETR with a deformable ENCODER only; with ``dn=dn_detr`` this is the CVPR 2022 paper's
DN-Deformable-DETR (DN-DETR repository, ``dn_dab_deformable_detr_deformable_encoder_only``).

Encoder: Deformable DETR's (4 levels, deformable self-attention). Decoder: DAB-DETR's, unchanged (anchor boxes,
sine positional queries, width/height-modulated cross-attention, one shared box head refining the anchors, the
decoder norm on every output), except that its cross-attention reads the multi-scale memory densely, level by level
(dndetr/models/multilevel_decoder.py). The decoder loop, the matching queries (anchors, optional patterns) and DN's
box encoding are therefore DAB-DETR's own methods (dndetr/models/dab.py), called on this model.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import check
from .dab import DABDETR
from .deformable_base import PRIOR_BIAS, DeformableBase, MultiScaleConfig
from .multilevel_decoder import MultiLevelDecoderLayer
from .registry import register_model
from .transformer import DecoderStack, mlp, xavier_init


@dataclass
class DABDeformableEncConfig(MultiScaleConfig):
    num_patterns: int = 0  # pattern embeddings: num_patterns * num_queries queries (the README uses 3)
    random_refpoints_xy: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_patterns >= 0, "model.num_patterns", self.num_patterns, "must be >= 0")


@register_model("dab_deformable_enc", DABDeformableEncConfig)
class DABDeformableEncOnly(DeformableBase):
    pe_offset = 0.0  # its sine PE (PositionEmbeddingSineHW, temperature 20) has no half-pixel offset
    inverse_sigmoid_eps = 1e-3
    official_aliases = {"transformer.decoder.bbox_embed.": "bbox_embed."}  # the shared box head, twice

    def __init__(self, cfg, num_classes, **options):
        super().__init__(cfg, num_classes, **options)
        d = cfg.hidden_dim
        layers = [MultiLevelDecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation,
                                         first=(i == 0), n_levels=cfg.num_feature_levels)
                  for i in range(cfg.dec_layers)]
        self.decoder = DecoderStack(layers, d)
        self.decoder.query_scale = mlp(d, d, d, 2)
        self.decoder.ref_point_head = mlp(2 * d, d, d, 2)
        self.decoder.ref_anchor_head = mlp(d, d, 2, 2)
        self.patterns = nn.Embedding(cfg.num_patterns, d) if cfg.num_patterns > 0 else None
        # The official transformer xavier-initialises every matrix it holds and does NOT give the deformable
        # attention its own init back: sampling_offsets / attention_weights weights end up xavier, not zero
        # (their radial / zero biases survive).
        xavier_init(self.encoder, self.decoder, *([self.patterns] if self.patterns is not None else []))
        self.reset_level_embed()
        self.refpoint_embed = nn.Embedding(cfg.num_queries, 4)
        self.init_anchors(self.refpoint_embed.weight)
        self.query_modules = ("refpoint_embed",) + (("patterns",) if self.patterns is not None else ())
        # One class head and one box head for all layers; the box head keeps PyTorch's default init.
        self.class_embed = nn.Linear(d, num_classes)
        nn.init.constant_(self.class_embed.bias, PRIOR_BIAS)
        self.bbox_embed = mlp(d, d, 4, 3)

    # DAB-DETR's query code: anchors (random_refpoints_xy) and patterns, rows drawn and read as DAB-DETR does.
    init_anchors = DABDETR.init_anchors
    new_query_rows = DABDETR.new_query_rows
    matching_queries = DABDETR.matching_queries

    def box_query_position(self, boxes):
        return DABDETR.box_query_position(self, boxes)

    def decode(self, content, position, memory, self_attn_mask):
        # DAB-DETR's loop; the layers take the whole multi-scale memory in place of a single-scale one.
        return DABDETR.decode(self, content, position, memory, memory.mask, memory.pos, self_attn_mask)

    def predict(self, hs, references):
        return self.class_embed(hs), DABDETR.predict_boxes(self, hs, references)
