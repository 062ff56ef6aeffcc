"""Deformable DETR (Zhu et al., ICLR 2021): plain, with iterative box refinement, and two-stage.

- plain: 300 learned queries; query_embed holds (query_pos, content); a 2-D reference point per query
  (sigmoid(Linear(query_pos))) shared by all layers; ONE class head and ONE box head reused at every layer.
- ``box_refine``: one head per layer; after layer l the reference becomes that layer's (detached) box, so layers
  1.. sample with box references.
- ``two_stage`` (needs ``box_refine``, as the official code): every encoder token proposes a box; the top-k by the
  class-0 logit become the references, and their sine embedding (through pos_trans) the queries.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import ConfigError
from .deformable_base import DeformableBase, MultiScaleConfig
from .deformable_transformer import (DeformableDecoderLayer, decoder_stack, encoder_proposals,
                                     reset_deformable_attention, topk_proposals)
from .position_encoding import box_sine_embedding
from .registry import register_model


@dataclass
class DeformableConfig(MultiScaleConfig):
    box_refine: bool = False  # iterative box refinement: one head per layer, references updated layer by layer
    two_stage: bool = False  # encoder proposals become the queries (needs box_refine, as the official code)


@register_model("deformable", DeformableConfig)
class DeformableDETR(DeformableBase):
    # Official main.py: parameters whose name contains these train at lr x 0.1 (substring match, as there).
    linear_proj_names = ("reference_points", "sampling_offsets")
    # The refinement heads are stored a second time under the decoder (box heads; two-stage: class heads too).
    official_aliases = {"transformer.decoder.bbox_embed.": "bbox_embed.",
                        "transformer.decoder.class_embed.": "class_embed."}

    def __init__(self, cfg, num_classes, **options):
        if cfg.two_stage and not cfg.box_refine:
            raise ConfigError("model.two_stage=true is invalid without model.box_refine=true (the official "
                              "two-stage model refines boxes layer by layer)")
        super().__init__(cfg, num_classes, **options)
        d, num_layers = cfg.hidden_dim, cfg.dec_layers
        layer = DeformableDecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation,
                                       cfg.num_feature_levels, cfg.dec_n_points)
        self.decoder = nn.Module()
        self.decoder.layers = decoder_stack(layer, num_layers)
        if cfg.two_stage:
            self.enc_output, self.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
            self.pos_trans, self.pos_trans_norm = nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d)
        else:
            self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)  # (query_pos, content) per query
            self.query_modules = ("query_embed",)
            self.reference_points = nn.Linear(d, 2)
        reset_deformable_attention(self.encoder, self.decoder, *([self.enc_output, self.pos_trans]
                                                                 if cfg.two_stage else [self.reference_points]))
        if not cfg.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        self.reset_level_embed()
        # Two-stage: no size bias at all (the proposals already carry sizes).
        self.build_heads(num_layers, shared=not cfg.box_refine, extra=int(cfg.two_stage),
                         first_size_bias=0.0 if cfg.two_stage else -2.0)
        # A box query (denoising) enters as a learned projection of its sine embedding, its centre (two-stage:
        # the box) as the reference.
        self.box_query_proj = self.box_query_head()
        self.more_proposals, self.extra_proposals = 0, None

    def official_export_aliases(self) -> dict:
        """The aliases this configuration's official model has: none (plain), box heads, or both (two-stage)."""
        kept = ("bbox_embed.", "class_embed.") if self.cfg.two_stage else ("bbox_embed.",) if self.cfg.box_refine \
            else ()
        return {alias: ours for alias, ours in self.official_aliases.items() if ours in kept}

    # -- queries ------------------------------------------------------------------------------------------------
    def propose(self, memory):
        if not self.cfg.two_stage:
            return None
        tokens, proposal_logits = encoder_proposals(memory.src, memory.mask, memory.shapes)
        tokens = self.enc_output_norm(self.enc_output(tokens))
        logits = self.class_embed[-1](tokens)
        coords = self.bbox_embed[-1](tokens) + proposal_logits
        # Class-agnostic ranking by the first class logit (the encoder loss uses label 0 for every object). The
        # top N of the top N + more are the top N, so the matching queries are those of a run without the extra.
        count = self.cfg.num_queries + (self.more_proposals if self.training else 0)
        top = topk_proposals(logits[..., 0], coords, count)
        self.extra_proposals = {"top": top[:, self.cfg.num_queries:]} if count > self.cfg.num_queries else None
        return {"logits": logits, "boxes": coords.sigmoid(), "top": top[:, :self.cfg.num_queries]}

    def rank_more_proposals(self, count):
        if self.cfg.two_stage:
            self.more_proposals += count
        return self.cfg.two_stage

    def proposal_queries(self, proposals):
        boxes, d = proposals["top"].sigmoid(), self.hidden_dim
        embedded = self.pos_trans_norm(self.pos_trans(box_sine_embedding(boxes, d // 2, yx_first=False)))
        query_pos, content = embedded.split(d, dim=-1)
        return content, {"pos": query_pos, "ref": boxes}

    def matching_queries(self, batch_size, rows=None):
        query_pos, content = self.query_rows("query_embed", rows)[None].expand(batch_size, -1, -1).split(
            self.hidden_dim, dim=-1)
        return content, {"pos": query_pos, "ref": self.reference_points(query_pos).sigmoid()}

    def new_query_rows(self, count):
        if self.cfg.two_stage:  # hybrid matching ranks more proposals instead (rank_more_proposals)
            raise ConfigError("model.two_stage=true is invalid with extra learned matching queries (Group DETR): "
                              "two-stage Deformable DETR's queries are the encoder's top-k proposals, not learned "
                              "rows (use model.two_stage=false, or hybrid matching, which ranks more proposals)")
        return DeformableBase.new_query_rows(self, count)

    def box_query_position(self, boxes):
        reference = boxes if self.cfg.two_stage else boxes[..., :2]
        return {"pos": self.box_query_proj(box_sine_embedding(boxes, self.hidden_dim // 2)), "ref": reference}

    # -- decoder ----------------------------------------------------------------------------------------------
    @property
    def refines(self) -> bool:
        return self.cfg.box_refine

    def initial_reference(self, position):
        return position["ref"]

    def layer_query_pos(self, index, position, level_refs, out):
        return position["pos"]  # static: the same positional query in every layer
