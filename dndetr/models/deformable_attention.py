"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in plain PyTorch.

Every query looks at ``n_points`` locations per head and per feature level, placed around its reference point by
learned offsets, and mixes the bilinearly sampled values with weights that are softmax-normalised jointly over
levels x points. The sampling is ``F.grid_sample(align_corners=False, padding_mode="zeros")``, which reads pixel
``loc * W - 0.5`` and counts neighbours outside the map as zero: the same arithmetic as the official CUDA kernel.
Weights are not renormalised when a point falls outside the map.

On the CPU, with 32 or more channels per head, the sampling and mixing are one weighted sum of value rows
(:func:`mix_rows`): every sample is its four bilinear corners, weighted by bilinear weight x attention weight,
summed by torch's embedding bag, whose forward never materialises the samples; its backward
(:class:`WeightedRows`) groups the corner indices by row once. Otherwise grid_sample samples every point and the
weighted sum follows (:func:`sample_and_mix`).

With grid_sample the sampled tensor [N*heads, head_dim, Lq, levels*points] is what autograd keeps for the backward
pass, and at COCO sizes in the encoder (Lq = S ~ 20k tokens) it is ~650 MiB per layer. ``max_sample_bytes`` caps
it: queries are processed in chunks, and while gradients are needed each chunk is checkpointed (its sampling is
recomputed during backward), so only one chunk's samples are alive at a time.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

Shapes = Sequence[Tuple[int, int]]  # (H, W) per level, as Python ints (no host sync when splitting)

DEFAULT_MAX_SAMPLE_BYTES = 256 * 2 ** 20


def split_levels(value: torch.Tensor, shapes: Shapes) -> List[torch.Tensor]:
    """value [N,S,M,D] -> per level [N*M, D, H, W], the layout grid_sample wants."""
    N, _, M, D = value.shape
    sizes = [h * w for h, w in shapes]
    return [v.flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
            for v, (h, w) in zip(value.split(sizes, dim=1), shapes)]


def sample_and_mix(value_levels: List[torch.Tensor], locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """value_levels per level [N*M,D,H,W]; locations [N,Lq,M,L,P,2] in [0,1] (x,y); weights [N,Lq,M,L,P]
    -> [N, Lq, M*D]."""
    N, Lq, M, L, P, _ = locations.shape
    grids = (2 * locations - 1).transpose(1, 2).flatten(0, 1)  # [N*M, Lq, L, P, 2] in grid_sample's [-1, 1]
    sampled = torch.stack([F.grid_sample(v, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                         align_corners=False) for level, v in enumerate(value_levels)], dim=-2)
    weights = weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (sampled.flatten(-2) * weights).sum(-1)  # [N*M, D, Lq]
    return out.view(N, -1, Lq).transpose(1, 2)


class WeightedRows(torch.autograd.Function):
    """out[b] = sum_k coef[b, k] * rows[index[b, k]]: rows [R, D], coef and index [B, K] -> [B, D].

    The forward is torch's embedding bag. Its dense weight gradient on the CPU sorts and scans the indices inside a
    slow generic kernel; here the rows' gradient is the same weighted sum over the transposed lookup (the indices
    grouped by row with one argsort, then one embedding bag over ``grad``), and coef's gradient is torch's own
    per-sample-weight gradient of the embedding bag (the forward recomputed without the rows' gradient)."""

    @staticmethod
    def forward(ctx, rows, coef, index):
        ctx.save_for_backward(rows, coef, index)
        return F.embedding_bag(index, rows, per_sample_weights=coef, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, coef, index = ctx.saved_tensors
        grad_rows = grad_coef = None
        if ctx.needs_input_grad[0]:
            flat = index.flatten()
            order = flat.argsort(stable=True)  # the same order, so the same sums, in every run (and faster)
            counts = torch.bincount(flat, minlength=rows.shape[0])
            grad_rows = F.embedding_bag(order // index.shape[1], grad, counts.cumsum(0) - counts,
                                        per_sample_weights=coef.flatten()[order], mode="sum")
        if ctx.needs_input_grad[1]:
            with torch.enable_grad():
                coef = coef.detach().requires_grad_()
                out = F.embedding_bag(index, rows.detach(), per_sample_weights=coef, mode="sum")
                grad_coef, = torch.autograd.grad(out, coef, grad)
        return grad_rows, grad_coef, None


def value_rows(value: torch.Tensor) -> torch.Tensor:
    """value [N,S,M,D] -> [N*M*S, D]: head m of image n reads rows (n*M + m)*S + s."""
    N, S, M, D = value.shape
    return value.transpose(1, 2).reshape(N * M * S, D)


def mix_rows(rows: torch.Tensor, shapes: Shapes, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sample_and_mix`` as one weighted sum of value rows: each sample is its 4 bilinear corners (grid_sample's
    arithmetic: pixel ``loc * W - 0.5``, corners outside the map weigh 0), each corner weighted by its bilinear
    weight times the sample's attention weight. rows from :func:`value_rows`; -> [N, Lq, M*D]."""
    N, Lq, M, L, P, _ = locations.shape
    maps = rows.shape[0] // (N * M)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=locations.dtype, device=locations.device)
    level_start = torch.tensor([0] + [h * w for h, w in shapes][:-1], device=locations.device).cumsum(0)
    width, height = size[:, None, 0].long(), size[:, None, 1].long()  # [L, 1]: broadcast over P
    pixel = locations * size[:, None, :] - 0.5  # [N, Lq, M, L, P, 2]
    corner = pixel.floor()
    fx, fy = (pixel - corner).unbind(-1)
    x0, y0 = corner.long().unbind(-1)
    first_row = (torch.arange(N * M, device=rows.device) * maps).view(N, 1, M, 1, 1) + level_start[:, None]
    index_dtype = torch.int32 if rows.shape[0] < 2 ** 31 else torch.int64  # int32 sorts faster in the backward
    index, coef = [], []
    for dx, dy, bilinear in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy),
                             (1, 1, fx * fy)):
        x, y = x0 + dx, y0 + dy
        inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
        index.append(torch.where(inside, first_row + y * width + x, 0).to(index_dtype))
        coef.append(bilinear * weights * inside)
    index, coef = (torch.stack(t, dim=-1).view(N * Lq * M, L * P * 4) for t in (index, coef))
    return WeightedRows.apply(rows, coef, index).view(N, Lq, M * rows.shape[1])


SAMPLINGS = ("rows", "grid_sample")
# The CPU's default is the row sums from this many channels per head: on the 2-core CPU of docs/benchmarks.md they
# take 0.5-0.8x grid_sample's time forward + backward with the published 32 channels, but 0.9-1.3x with 16 (the cpu
# experiments' width 128), where grid_sample's cost per channel is small against the row sums' cost per sample.
ROWS_MIN_HEAD_DIM = 32


def deformable_attention_core(value: torch.Tensor, shapes: Shapes, locations: torch.Tensor, weights: torch.Tensor,
                              max_sample_bytes: Optional[int] = None, sampling: Optional[str] = None) -> torch.Tensor:
    """value [N,S,M,D], locations [N,Lq,M,L,P,2], weights [N,Lq,M,L,P] -> [N,Lq,M*D].

    Half-precision inputs are computed in float32 (the official kernel has no half/bfloat16 path either) and the
    result is cast back. ``max_sample_bytes`` (None = no limit) bounds the sampled tensor of one query chunk (the
    rows path keeps less than that: the corner indices and weights). ``sampling``: "rows" (:func:`mix_rows`, one
    weighted sum of value rows; the default on the CPU from ``ROWS_MIN_HEAD_DIM`` channels per head) or
    "grid_sample" (:func:`sample_and_mix`, torch's kernels; the default otherwise). Both compute the same values
    and gradients.
    """
    if sampling is None:
        on_cpu = value.device.type == "cpu"
        sampling = "rows" if on_cpu and value.shape[-1] >= ROWS_MIN_HEAD_DIM else "grid_sample"
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling={sampling!r}: use one of {SAMPLINGS}")
    out_dtype = value.dtype
    compute = torch.promote_types(torch.promote_types(value.dtype, locations.dtype), torch.float32)
    value, locations, weights = value.to(compute), locations.to(compute), weights.to(compute)
    N, Lq, M, L, P, _ = locations.shape
    if sampling == "rows":
        prepared, mix = value_rows(value), functools.partial(mix_rows, shapes=shapes)
    else:
        prepared, mix = split_levels(value, shapes), sample_and_mix
    bytes_per_query = N * M * value.shape[-1] * L * P * value.element_size()
    chunk = Lq if max_sample_bytes is None else max(1, int(max_sample_bytes // bytes_per_query))
    if chunk >= Lq:
        return mix(prepared, locations=locations, weights=weights).to(out_dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (value, locations, weights))
    pieces = []
    for start in range(0, Lq, chunk):
        part = {"locations": locations[:, start:start + chunk], "weights": weights[:, start:start + chunk]}
        pieces.append(checkpoint(mix, prepared, use_reentrant=False, **part) if needs_grad else mix(prepared, **part))
    return torch.cat(pieces, dim=1).to(out_dtype)


def radial_offset_bias(n_heads: int, n_levels: int, n_points: int) -> torch.Tensor:
    """The published offset init: head m points along angle 2*pi*m/M (scaled so the larger coordinate is 1), point p
    sits (p+1) times further out; the same for every level. Flattened in (M, L, P, 2) order."""
    theta = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    directions = torch.stack((theta.cos(), theta.sin()), dim=-1)
    directions = directions / directions.abs().max(-1, keepdim=True).values
    scale = torch.arange(1, n_points + 1, dtype=torch.float32)[None, None, :, None]
    return (directions[:, None, None, :].repeat(1, n_levels, n_points, 1) * scale).flatten()


class MSDeformAttn(nn.Module):
    """Parameter names follow the official module (sampling_offsets, attention_weights, value_proj, output_proj)."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 max_sample_bytes: Optional[int] = DEFAULT_MAX_SAMPLE_BYTES):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.max_sample_bytes = max_sample_bytes
        self.sampling: Optional[str] = None  # deformable_attention_core's choice by device; benchmarks set it
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(radial_offset_bias(self.n_heads, self.n_levels, self.n_points))
        # Zero weights and bias: every sample starts with the same weight 1 / (levels * points).
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, values: torch.Tensor, shapes: Shapes,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query [N,Lq,d]; reference_points [N,Lq,L,2] (x,y) or [N,Lq,L,4] (cx,cy,w,h) in [0,1] of each PADDED
        level map; values [N,S,d] (levels flattened in ``shapes`` order); padding_mask [N,S] True = padding."""
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(values)
        if padding_mask is not None:
            # A multiply by the 0/1 mask: masked_fill (a boolean kernel) is several times slower on the CPU.
            value = value * (~padding_mask[..., None]).to(value.dtype)
        value = value.view(N, values.shape[1], M, -1)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        ref = reference_points[:, :, None, :, None, :]  # [N, Lq, 1, L, 1, 2|4]
        if reference_points.shape[-1] == 2:
            # 2-D reference: offsets are in pixels of each level.
            size = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            locations = ref + offsets / size[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # Box reference: offsets are in units of half the box size divided by the number of points.
            locations = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        out = deformable_attention_core(value, shapes, locations, weights, self.max_sample_bytes, self.sampling)
        return self.output_proj(out)
