"""Sine positional encodings: for image feature maps, and for boxes/points (conditional queries, anchors)."""
from __future__ import annotations

import math

import torch


def sine(values: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """[...] -> [..., num_feats] with interleaved sin/cos: [sin f0, cos f1, sin f2, cos f3, ...]."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=values.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = values[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def image_position_encoding(mask: torch.Tensor, num_feats: int, temperature: float,
                            offset: float = 0.0) -> torch.Tensor:
    """mask [B,H,W] (True = padding) -> [B, H*W, 2*num_feats] = cat(pos_y, pos_x), normalised to [0, 2*pi].

    ``offset`` is subtracted from the running pixel count: Deformable DETR uses -0.5 (pixel centres), DETR 0."""
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + 1e-6) * 2 * math.pi
    x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + 1e-6) * 2 * math.pi
    pos = torch.cat((sine(y_embed, num_feats, temperature), sine(x_embed, num_feats, temperature)), dim=-1)
    return pos.flatten(1, 2)


def box_sine_embedding(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0,
                       yx_first: bool = True) -> torch.Tensor:
    """Normalised points [..., 2] (cx, cy) or boxes [..., 4] (cx, cy, w, h) -> [..., k*num_feats].

    The order is y, x, then w, h, matching the image encoding's (y, x) layout so that queries and keys align;
    ``yx_first=False`` keeps x, y, w, h (Deformable DETR's two-stage proposal embedding).
    """
    scaled = boxes * (2 * math.pi)
    order = ([1, 0] if yx_first else [0, 1]) + list(range(2, boxes.shape[-1]))
    return torch.cat([sine(scaled[..., i], num_feats, temperature) for i in order], dim=-1)
