"""Deformable DETR's multi-scale input, encoder, decoder layer, box refinement and two-stage proposals.

Tensors are batch-first. A multi-scale memory is the levels' tokens flattened and concatenated (stride 8, 16, 32, 64),
described by ``shapes`` ((H, W) per level, Python ints) and ``valid_ratios`` [B, L, 2] (x, y): the share of each
level map that is image rather than padding. Reference points are normalised to the PADDED map of each level.
"""
from __future__ import annotations

import copy
from typing import List, NamedTuple, Sequence, Tuple

import torch
from torch import nn

from ..config import ConfigError
from .backbone import downsample_mask
from .deformable_attention import MSDeformAttn
from .position_encoding import image_position_encoding
from .transformer import Dropout, FeedForward, MultiheadAttention, inverse_sigmoid

Shapes = List[Tuple[int, int]]


class MultiScaleMemory(NamedTuple):
    src: torch.Tensor  # [B, S, d]
    pos: torch.Tensor  # [B, S, d] sine PE + level embedding
    mask: torch.Tensor  # [B, S] True = padding
    shapes: Shapes
    valid_ratios: torch.Tensor  # [B, L, 2] (x, y)


def input_projection(in_channels: Sequence[int], d_model: int, num_levels: int) -> nn.ModuleList:
    """One Conv1x1+GroupNorm per backbone level; each extra level is a 3x3 stride-2 conv on the RAW last backbone
    map (then on the previous projected level), halving the resolution. Convs: xavier weights, zero bias."""
    projections = [nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(32, d_model)) for c in in_channels]
    source = in_channels[-1]
    for _ in range(num_levels - len(in_channels)):
        projections.append(nn.Sequential(nn.Conv2d(source, d_model, 3, stride=2, padding=1), nn.GroupNorm(32, d_model)))
        source = d_model
    for proj in projections:
        nn.init.xavier_uniform_(proj[0].weight)
        nn.init.zeros_(proj[0].bias)
    return nn.ModuleList(projections)


def project_levels(input_proj: nn.ModuleList, backbone_levels, image_masks) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Backbone (features, mask) pairs -> projected (features, mask) per level, extra levels appended."""
    levels = [(proj(features), mask) for proj, (features, mask) in zip(input_proj, backbone_levels)]
    previous = backbone_levels[-1][0]
    for proj in input_proj[len(backbone_levels):]:
        features = proj(previous)
        levels.append((features, downsample_mask(image_masks, features.shape[-2:])))
        previous = features
    return levels


def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """Padding mask [B,H,W] -> [B,2] (valid width / W, valid height / H), read off the first row and column."""
    H, W = mask.shape[-2:]
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack((valid_w / W, valid_h / H), dim=-1).float()


def flatten_levels(levels, level_embed: torch.Tensor, pe_temperature: float, pe_offset: float) -> MultiScaleMemory:
    """Per-level (features [B,d,H,W], mask [B,H,W]) -> one flattened memory with sine PE + level embedding."""
    srcs, poses, masks, shapes = [], [], [], []
    for lvl, (features, mask) in enumerate(levels):
        d = features.shape[1]
        pos = image_position_encoding(mask, d // 2, pe_temperature, pe_offset).to(features.dtype)
        srcs.append(features.flatten(2).transpose(1, 2))
        poses.append(pos + level_embed[lvl])
        masks.append(mask.flatten(1))
        shapes.append((features.shape[-2], features.shape[-1]))
    ratios = torch.stack([valid_ratios(mask) for _, mask in levels], dim=1)
    return MultiScaleMemory(torch.cat(srcs, 1), torch.cat(poses, 1), torch.cat(masks, 1), shapes, ratios)


def encoder_reference_points(shapes: Shapes, ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level, normalised by the valid size, then seen from every level -> [B, S, L, 2]."""
    points = []
    for lvl, (h, w) in enumerate(shapes):
        y, x = torch.meshgrid(torch.arange(h, device=ratios.device, dtype=torch.float32) + 0.5,
                              torch.arange(w, device=ratios.device, dtype=torch.float32) + 0.5, indexing="ij")
        x = x.reshape(1, -1) / (ratios[:, None, lvl, 0] * w)
        y = y.reshape(1, -1) / (ratios[:, None, lvl, 1] * h)
        points.append(torch.stack((x, y), dim=-1))
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]


def level_references(references: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Decoder references [B,Q,2|4] in image coordinates -> [B,Q,L,2|4] in each padded level map."""
    scale = ratios if references.shape[-1] == 2 else torch.cat((ratios, ratios), dim=-1)
    return references[:, :, None] * scale[:, None]


class DeformableEncoderLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, activation: str,
                 n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, references, shapes, padding_mask):
        # Queries carry the position; the sampled values do not.
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, references, src, shapes, padding_mask)))
        return self.norm2(src + self.ffn(src))


class DeformableEncoder(nn.Module):
    """Post-norm stack without a final norm."""

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, memory: MultiScaleMemory) -> torch.Tensor:
        references = encoder_reference_points(memory.shapes, memory.valid_ratios)
        src = memory.src
        for layer in self.layers:
            src = layer(src, memory.pos, references, memory.shapes, memory.mask)
        return src


class DeformableDecoderLayer(nn.Module):
    """Self-attention, deformable cross-attention, FFN (post-norm). The norm names follow the official code:
    norm2 after self-attention, norm1 after cross-attention."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, activation: str,
                 n_levels: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, nheads, n_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, references, memory, shapes, padding_mask, self_attn_mask=None):
        """references [B,Q,L,2|4] (already scaled to each level, see :func:`level_references`)."""
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, attn_mask=self_attn_mask)))
        attended = self.cross_attn(tgt + query_pos, references, memory, shapes, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        return self.norm3(tgt + self.ffn(tgt))


def refine(delta: torch.Tensor, references: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Box head output (logit space) + reference -> box [.., 4] in [0,1]. A 2-D reference only moves the centre:
    the width and height are predicted directly."""
    if references.shape[-1] == 4:
        return (delta + inverse_sigmoid(references, eps)).sigmoid()
    centre = delta[..., :2] + inverse_sigmoid(references, eps)
    return torch.cat((centre, delta[..., 2:]), dim=-1).sigmoid()


def encoder_proposals(memory: torch.Tensor, padding_mask: torch.Tensor, shapes: Shapes, base_size: float = 0.05):
    """Two-stage: one proposal per encoder token, a box of size base_size * 2**level centred on the token (centres
    normalised by the level's valid size). Returns (memory with invalid tokens zeroed, proposal logits [B,S,4] with
    +inf where a coordinate leaves (0.01, 0.99) or the token is padding)."""
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        mask = padding_mask[:, start:start + h * w].view(-1, h, w)
        valid = torch.stack(((~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)), dim=-1).to(memory.dtype)  # (w, h)
        y, x = torch.meshgrid(torch.arange(h, device=memory.device, dtype=memory.dtype) + 0.5,
                              torch.arange(w, device=memory.device, dtype=memory.dtype) + 0.5, indexing="ij")
        centre = torch.stack((x, y), dim=-1).view(1, -1, 2) / valid[:, None]
        size = torch.full_like(centre, base_size * 2.0 ** lvl)
        proposals.append(torch.cat((centre, size), dim=-1))
        start += h * w
    proposals = torch.cat(proposals, 1)
    inside = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    logits = torch.log(proposals / (1 - proposals))
    logits = logits.masked_fill(padding_mask[..., None] | ~inside, float("inf"))
    memory = memory.masked_fill(padding_mask[..., None] | ~inside, 0.0)
    return memory, logits


def decoder_stack(layer: nn.Module, num_layers: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))


def reset_deformable_attention(*modules: nn.Module) -> None:
    """Deformable DETR's order: xavier on every matrix first, then every MSDeformAttn gets its own init back."""
    for module in modules:
        for p in module.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in module.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()


def topk_proposals(scores: torch.Tensor, coords: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k tokens by ``scores`` [B,S] -> their coordinates [B,k,4], detached (no gradient into the proposals)."""
    if k > scores.shape[1]:
        raise ConfigError(f"model.num_queries={k} (with any hybrid.queries) is invalid for these images: two-stage "
                          f"picks the queries among the {scores.shape[1]} encoder tokens of the batch (use larger "
                          "images or fewer queries)")
    index = scores.topk(k, dim=1).indices
    return coords.gather(1, index[..., None].expand(-1, -1, coords.shape[-1])).detach()
