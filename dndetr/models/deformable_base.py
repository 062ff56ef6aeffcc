"""What Deformable DETR, DAB-Deformable-DETR and DN-Deformable-DETR share: the multi-scale backbone (C3-C5 + a
stride-64 level), input projections, level embeddings, the deformable encoder and the forward pass.

Each model implements the same query interface as the single-scale models (dndetr/models/base.py), with the
multi-scale memory (:class:`MultiScaleMemory`, encoded) in place of (memory, padding_mask, pos), so the query
plug-ins (dndetr/plugins/, e.g. denoising) work unchanged:

- ``propose(memory) -> dict or None``: two-stage encoder proposals (``enc_outputs`` and the top-k boxes)
- ``matching_queries(batch_size, rows=None) -> (content [B,N,d], position)``: the learned matching queries (or those
  of ``rows``, over ``query_modules``, as in base.py); two-stage models make theirs with ``proposal_queries``
- ``box_query_position(boxes [B,P,4]) -> position``
- ``decode(content, position, memory, self_attn_mask) -> (hs [L,B,N,d], references)``
- ``predict(hs, references) -> (logits [L,B,N,K], boxes [L,B,N,4])``

The deformable decoders (Deformable DETR, DAB-Deformable-DETR) share :meth:`DeformableBase.decode` and differ in
``initial_reference`` and ``layer_query_pos``; the encoder-only DN variant has its own decoder.
"""
from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import ConfigError, ModelConfig, check
from ..plugins.base import outputs_of_plugins, with_plugin_queries
from .backbone import Backbone
from .base import DetrBase
from .deformable_transformer import (DeformableEncoder, DeformableEncoderLayer, MultiScaleMemory, flatten_levels,
                                     input_projection, level_references, project_levels, refine)
from .transformer import mlp, mlp_last_linear

PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: every class starts at probability 0.01
LINEAR_PROJ_LR_MULT = 0.1


@dataclass
class MultiScaleConfig(ModelConfig):
    """What the deformable models add to every model's settings."""
    num_feature_levels: int = 4  # C3-C5 + extra stride-2 convolutions on C5
    enc_n_points: int = 4  # deformable sampling points per head and level (encoder)
    dec_n_points: int = 4  # (decoder; unused by the encoder-only variant)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("num_feature_levels", "enc_n_points", "dec_n_points"):
            check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "must be >= 1")


def backbone_layers(num_levels: int) -> List[str]:
    """C3-C5 for multi-scale models (extra levels are convolutions on C5), C5 alone for one level."""
    return ["layer4"] if num_levels == 1 else ["layer2", "layer3", "layer4"]


def class_head(d: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(d, num_classes)
    nn.init.constant_(head.bias, PRIOR_BIAS)
    return head


def zero_box_head(d: int):
    """Box MLP whose last layer starts at zero (the box is the reference at init)."""
    head = mlp(d, d, 4, 3)
    nn.init.zeros_(mlp_last_linear(head).weight)
    nn.init.zeros_(mlp_last_linear(head).bias)
    return head


class DeformableBase(nn.Module, ABC):
    registry_name = ""  # set by @register_model
    official_mlps: Tuple[str, ...] = ("bbox_embed", "query_scale", "ref_point_head", "ref_anchor_head")
    official_aliases: Dict[str, str] = {}
    # GroupNorm over each level and the stride-2 extra level see padded positions too (as in the official models):
    # features at padded positions influence the outputs a little (tests/test_models.py).
    padding_invariant = False
    pe_offset = -0.5  # Deformable DETR's sine PE measures pixel centres; the encoder-only DN variant does not
    linear_proj_names: tuple = ()
    inverse_sigmoid_eps = 1e-5  # Deformable DETR; the DN/DAB repositories use 1e-3
    refines = True  # the box references are updated layer by layer (Deformable DETR: model.box_refine)
    # Whether plug-ins may change the matching queries' content (DN-DETR adds the "unknown" label embedding).
    plugin_content = True
    # The nn.Embedding modules whose rows are the matching queries (as in base.py); none for two-stage models.
    query_modules: Tuple[str, ...] = ()
    query_rows = DetrBase.query_rows
    new_query_rows = DetrBase.new_query_rows

    def __init__(self, cfg: MultiScaleConfig, num_classes: int, no_object_class: bool = False,
                 box_queries: bool = False, train_backbone: bool = True):
        super().__init__()
        if no_object_class:
            raise ConfigError(f"loss.class_loss='ce' is invalid for model {cfg.name!r}: the deformable models are "
                              "trained with the sigmoid focal loss (loss.class_loss=focal)")
        d, levels = cfg.hidden_dim, cfg.num_feature_levels
        self.cfg, self.num_classes, self.hidden_dim, self.box_queries = cfg, num_classes, d, box_queries
        self.plugins = nn.ModuleDict()  # training-time query plug-ins, set by build_model
        self.backbone = Backbone(cfg.backbone, train_backbone, layers=backbone_layers(levels))
        self.input_proj = input_projection(self.backbone.channels, d, levels)
        layer = DeformableEncoderLayer(d, cfg.dim_feedforward, cfg.dropout, cfg.activation, levels, cfg.nheads,
                                       cfg.enc_n_points)
        self.encoder = DeformableEncoder(layer, cfg.enc_layers)
        self.level_embed = nn.Parameter(torch.empty(levels, d))

    def reset_level_embed(self) -> None:
        nn.init.normal_(self.level_embed)

    # -- the query interface ------------------------------------------------------------------------------------
    def propose(self, memory: MultiScaleMemory) -> Optional[dict]:
        """Two-stage models: predictions on the encoder tokens (``logits``, ``boxes``) and what the queries need."""
        return None

    @abstractmethod
    def matching_queries(self, batch_size: int, rows: Optional[Dict[str, torch.Tensor]] = None):
        """The learned matching queries (or those of ``rows``): content [B,N,d] and position."""

    def rank_more_proposals(self, count: int) -> bool:
        """Two-stage models: rank ``count`` more encoder proposals per image in training (after the model's own top
        N, H-DETR's two-stage hybrid branch), kept in ``extra_proposals`` during each training forward pass for
        the plug-in that asked. False where the queries are learned rows."""
        return False

    def proposal_queries(self, proposals: dict):
        """Two-stage models: the matching queries made from the encoder's proposals."""
        raise TypeError(f"{type(self).__name__} makes no encoder proposals (it is not a two-stage model)")

    def queries(self, batch_size: int, rows: Optional[Dict[str, torch.Tensor]] = None, proposals=None):
        """Matching queries as the decoder receives them: the model's own (or from ``proposals``), changed by every
        plug-in."""
        content, position = self.matching_queries(batch_size, rows) if proposals is None else \
            self.proposal_queries(proposals)
        for plugin in self.plugins.values():
            adjusted, position = plugin.adjust_matching(content, position)
            # Ignored changes stay in the graph at weight 0 (every parameter gets a gradient, as DDP wants; the
            # official DN-DAB-Deformable-DETR adds label_enc.weight[0][0] * 0 for the same reason).
            content = adjusted if self.plugin_content else content + 0.0 * (adjusted - content)
        return content, position

    @abstractmethod
    def box_query_position(self, boxes: torch.Tensor):
        """Positional query of (noised) boxes [B,P,4] (sigmoid cxcywh)."""

    def box_query_head(self) -> Optional[nn.Module]:
        return DetrBase.box_query_head(self)  # built only when a plug-in needs box queries

    def initial_reference(self, position) -> torch.Tensor:
        """The first layer's references [B,N,2|4] in [0,1] of the image (models that use the shared decoder loop)."""
        raise TypeError(f"{type(self).__name__} does not use the shared deformable decoder loop")

    def layer_query_pos(self, index: int, position, level_refs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The positional query of decoder layer ``index`` (level_refs: [B,N,L,2|4]; out: the layer's input), for
        models that use the shared decoder loop."""
        raise TypeError(f"{type(self).__name__} does not use the shared deformable decoder loop")

    def build_heads(self, num_layers: int, shared: bool, extra: int = 0, first_size_bias: float = -2.0) -> None:
        """``shared``: one class and one box head under every layer's index (as the official plain model).
        Otherwise independent copies, ``extra`` more for the encoder proposals, and only the first box head's
        size logits start at ``first_size_bias``."""
        d = self.hidden_dim
        cls, box = class_head(d, self.num_classes), zero_box_head(d)
        if shared:
            self.class_embed = nn.ModuleList([cls] * num_layers)
            self.bbox_embed = nn.ModuleList([box] * num_layers)
        else:  # copies of one initialised head, as the official _get_clones: equal initial weights
            self.class_embed = nn.ModuleList(copy.deepcopy(cls) for _ in range(num_layers + extra))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(box) for _ in range(num_layers + extra))
        nn.init.constant_(mlp_last_linear(self.bbox_embed[0]).bias[2:], first_size_bias)

    def decode(self, content, position, memory: MultiScaleMemory, self_attn_mask):
        """Returns hs [L,B,N,d] (raw layer outputs, no final norm) and each layer's reference."""
        reference = self.initial_reference(position)
        references, hs, out = [reference], [], content
        num_layers = len(self.decoder.layers)
        for i, layer in enumerate(self.decoder.layers):
            level_refs = level_references(reference, memory.valid_ratios)
            query_pos = self.layer_query_pos(i, position, level_refs, out)
            out = layer(out, query_pos, level_refs, memory.src, memory.shapes, memory.mask, self_attn_mask)
            hs.append(out)
            if self.refines and i < num_layers - 1:
                # Detached: a layer's box loss does not reach earlier layers through its reference.
                reference = refine(self.bbox_embed[i](out), reference, self.inverse_sigmoid_eps).detach()
                references.append(reference)
        return torch.stack(hs), references

    def predict(self, hs, references):
        """Layer l: its own heads (or the shared ones), added to the reference it attended with."""
        logits = torch.stack([self.class_embed[i](h) for i, h in enumerate(hs)])
        boxes = torch.stack([refine(self.bbox_embed[i](h), references[min(i, len(references) - 1)],
                                    self.inverse_sigmoid_eps) for i, h in enumerate(hs)])
        return logits, boxes

    # -- the shared forward pass --------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, masks: torch.Tensor) -> MultiScaleMemory:
        levels = project_levels(self.input_proj, self.backbone.levels(images, masks), masks)
        memory = flatten_levels(levels, self.level_embed, self.cfg.pe_temperature, self.pe_offset)
        return memory._replace(src=self.encoder(memory))

    def forward(self, images: torch.Tensor, masks: torch.Tensor, targets=None, probe: bool = False) -> dict:
        memory = self.encode(images, masks)
        proposals = self.propose(memory)
        content, position = self.queries(memory.src.shape[0], proposals=proposals)
        content, position, self_attn_mask, blocks = with_plugin_queries(self, content, position, targets, probe)
        hs, references = self.decode(content, position, memory, self_attn_mask)
        outputs = {}
        logits, boxes = outputs_of_plugins(blocks, *self.predict(hs, references), outputs)
        outputs["pred_logits"], outputs["pred_boxes"] = logits[-1], boxes[-1]
        if self.cfg.aux_loss:
            outputs["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if proposals is not None:  # trained class-agnostically by the criterion (loss suffix _enc)
            outputs["enc_outputs"] = {"pred_logits": proposals["logits"], "pred_boxes": proposals["boxes"]}
        return outputs

    def param_groups(self, lr: float, lr_backbone: float) -> List[dict]:
        """Backbone at lr_backbone; parameters named by ``linear_proj_names`` (Deformable DETR only) at
        lr x 0.1; the rest at lr. The DN/DAB repositories have only the first two groups."""
        groups = {"rest": [], "proj": [], "backbone": []}
        for name, param in self.named_parameters():
            if param.requires_grad:
                kind = ("backbone" if name.startswith("backbone.") else
                        "proj" if any(k in name for k in self.linear_proj_names) else "rest")
                groups[kind].append(param)
        rates = {"rest": lr, "proj": lr * LINEAR_PROJ_LR_MULT, "backbone": lr_backbone}
        return [{"params": params, "lr": rates[kind]} for kind, params in groups.items() if params]
