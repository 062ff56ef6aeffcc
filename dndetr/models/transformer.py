"""Transformer pieces shared by the three models. Tensors are batch-first: [B, N, d].

Encoder layers and DETR's decoder layer use packed in-projections (``in_proj_weight`` [3d, d], the layout and key
names of nn.MultiheadAttention in the official DETR). The conditional decoder layer (Conditional DETR, DAB-DETR)
projects queries and keys explicitly so that content and spatial parts can be concatenated per head; its attention
therefore has an output projection only.

Speed: attention runs in PyTorch's fused SDPA kernels whenever that computes the same thing (no dropout, or on a
GPU, where SDPA fuses dropout too). Dropout on the CPU draws its masks from random 64-bit words, four elements per
word, as float 0/1 masks, instead of torch's per-element Bernoulli kernel (several times faster on the CPU; p is
rounded to a multiple of 2^-16, and the scale is 1 / (1 - that p), so the output stays unbiased).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import MLP


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> MLP:
    """DETR's MLP (Linear-ReLU-...-Linear). torchvision's MLP puts its Linears at indices 0, 3, 6, ..."""
    return MLP(in_dim, [hidden_dim] * (num_layers - 1) + [out_dim], activation_layer=nn.ReLU)


def mlp_last_linear(module: MLP) -> nn.Linear:
    return [m for m in module if isinstance(m, nn.Linear)][-1]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def activation_module(name: str) -> nn.Module:
    # PReLU carries one learnable scalar per layer (DAB-DETR); relu/gelu have no parameters.
    return {"relu": nn.ReLU, "prelu": nn.PReLU, "gelu": nn.GELU}[name]()


LANE_STEPS = 2 ** 16  # dropout draws one 16-bit lane per element, four per random 64-bit word


def fast_dropout_applies(x: torch.Tensor, p: float) -> bool:
    """Our CPU dropout path: p must round to a multiple of 2^-16 strictly between 0 and 1."""
    return x.device.type == "cpu" and 0 < round(p * LANE_STEPS) < LANE_STEPS


def keep_probability(p: float) -> float:
    """The keep probability our CPU dropout uses: 1 - p with p rounded to a multiple of 2^-16 (p = 0.1: 0.8999939)."""
    return 1.0 - round(p * LANE_STEPS) / LANE_STEPS


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A 0/1 mask in ``x``'s dtype and shape, each element 1 with probability ``keep_probability(p)``, independently.

    random_ over the whole int64 range fills 64 uniform bits per word; viewed as int16, each lane is a uniform
    signed 16-bit number, kept when it is >= -2^15 + round(p * 2^16). torch's CPU bernoulli_ draws (and converts) a
    double per element, and boolean kernels (where, masked_fill, multiplying by a bool tensor) run several times
    slower on the CPU than a float multiply, so the mask comes out as numbers.
    """
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
    lanes = words.view(torch.int16)[:n].view(x.shape)
    mask = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # written directly: no bool tensor to convert
    return torch.ge(lanes, round(p * LANE_STEPS) - LANE_STEPS // 2, out=mask)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout with cheaper masks on the CPU (elsewhere torch's fused kernel is already fast)."""
    if not training or not fast_dropout_applies(x, p):
        return F.dropout(x, p, training)
    # The scale is a separate multiply so that bf16 inputs are scaled by the exact factor, not by a bf16 mask value.
    return x * keep_mask(x, p) * (1.0 / keep_probability(p))


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention_by_parts(q, k, v, nheads: int, dropout_p: float, parts) -> torch.Tensor:
    """Self-attention under a block-structured mask (``parts``: plugins.base.AttentionPart in query-axis order),
    each part over only the keys it sees: the masked attention's result (a blocked key has weight 0 either way)
    without the blocked products. A part that sees nothing outside its rows puts its groups on the batch axis, as
    Group DETR's authors stack theirs (11 groups of 300 queries: 11 x 300^2 scores instead of 3300^2); a part that
    also sees shared keys (DN groups of a few queries and the matching queries) attends once over its rows and those
    keys, its groups kept apart by a small mask: torch's fused CPU kernel is slow on many short batch rows."""
    outputs = []
    for part in parts:
        batch, groups = q.shape[0], part.groups
        rows = part.rows.stop - part.rows.start
        if not part.also_sees:  # [B, R, d] -> [B * G, R / G, d]: row b * G + g is image b's group g
            q_part, k_part, v_part = (t[:, part.rows].reshape(batch * groups, -1, t.shape[-1]) for t in (q, k, v))
            out = attention(q_part, k_part, v_part, nheads, dropout_p)
        else:
            k_part, v_part = (torch.cat([t[:, part.rows]] + [t[:, seen] for seen in part.also_sees], dim=1)
                              for t in (k, v))
            blocked = None
            if groups > 1:
                group_of = torch.arange(rows, device=q.device) // (rows // groups)
                blocked = F.pad(group_of[:, None] != group_of[None, :], (0, k_part.shape[1] - rows))
            out = attention(q[:, part.rows], k_part, v_part, nheads, dropout_p, blocked)
        outputs.append(out.reshape(batch, rows, -1))
    return torch.cat(outputs, dim=1)


def attention(q, k, v, nheads: int, dropout_p: float, attn_mask=None, padding_mask=None) -> torch.Tensor:
    """Multi-head attention over projected q [B,Nq,d], k [B,Nk,d], v [B,Nk,dv] -> [B,Nq,dv], dropout on the
    attention weights. ``attn_mask`` [Nq,Nk] and ``padding_mask`` [B,Nk] mark what may NOT be attended (True);
    ``attn_mask`` may instead be self-attention's tuple of parts (training-time query blocks, plugins.base)."""
    if isinstance(attn_mask, tuple):
        if padding_mask is not None:
            raise ValueError("attention: attention parts are for self-attention, which has no padding mask")
        return attention_by_parts(q, k, v, nheads, dropout_p, attn_mask)
    B, Nq = q.shape[:2]
    q, k, v = (t.view(B, t.shape[1], nheads, -1).transpose(1, 2) for t in (q, k, v))
    blocked = None
    if attn_mask is not None:
        blocked = attn_mask[None, None]
    if padding_mask is not None:
        padded = padding_mask[:, None, None, :]
        blocked = padded if blocked is None else blocked | padded
    # On the CPU the explicit product path below runs attention with dropout (SDPA's CPU kernels cannot drop
    # weights) and, without dropout, attention under bf16 autocast: torch's fused CPU kernel is several times slower
    # in bf16 than in fp32, and even in fp32 slower than two bf16 products at all but the smallest of our sizes
    # (benchmarks/bench_attention.py); the products then round like any other matmul under autocast.
    explicit = fast_dropout_applies(q, dropout_p) or (q.device.type == "cpu" and q.dtype != torch.float32
                                                      and dropout_p == 0)
    if not explicit:
        # SDPA's boolean mask marks what may be attended: the opposite convention.
        allowed = None if blocked is None else ~blocked
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
    else:
        # Both scalings go to the smaller operands: q before the product, 1 / (1 - p) on the output.
        weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if blocked is not None:
            # Adding the (small, broadcast) 0/-inf mask costs far less than masked_fill over the whole weights.
            additive = torch.zeros(blocked.shape, dtype=weights.dtype, device=weights.device)
            weights = weights + additive.masked_fill_(blocked, float("-inf"))
        probs = weights.softmax(-1)
        if dropout_p == 0:
            out = probs @ v
        else:
            out = (probs * keep_mask(probs, dropout_p)) @ v * (1.0 / keep_probability(dropout_p))
    return out.transpose(1, 2).reshape(B, Nq, -1)


class ProjectedAttention(nn.Module):
    """Multi-head attention over already-projected q, k, v (Conditional DETR's attention has no in-projection)."""

    def __init__(self, out_dim: int, nheads: int, dropout: float):
        super().__init__()
        self.nheads = nheads
        self.dropout = dropout
        self.out_proj = nn.Linear(out_dim, out_dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q, k, v, attn_mask=None, padding_mask=None):
        return self.out_proj(attention(q, k, v, self.nheads, self.dropout if self.training else 0.0,
                                       attn_mask, padding_mask))


class MultiheadAttention(ProjectedAttention):
    """nn.MultiheadAttention's function, parameters, names and initialisation (batch-first, no attention weights
    returned); the query and key projections share one matmul when query and key are the same tensor."""

    def __init__(self, d_model: int, nheads: int, dropout: float):
        super().__init__(d_model, nheads, dropout)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query, key, value, attn_mask=None, padding_mask=None):
        d = query.shape[-1]
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k = F.linear(query, weight[:2 * d], bias[:2 * d]).chunk(2, dim=-1)
        else:
            q, k = F.linear(query, weight[:d], bias[:d]), F.linear(key, weight[d:2 * d], bias[d:2 * d])
        v = F.linear(value, weight[2 * d:], bias[2 * d:])
        return super().forward(q, k, v, attn_mask, padding_mask)


class FeedForward(nn.Module):
    """The post-norm FFN block; attribute names follow the official checkpoints (linear1, linear2, activation)."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, activation: str):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.activation = activation_module(activation)
        self.dropout = Dropout(dropout)
        self.dropout_out = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout_out(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, activation: str):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, src, padding_mask, pos):
        q = k = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(q, k, src, padding_mask=padding_mask)))
        return self.norm2(src + self.ffn(src))


class Encoder(nn.Module):
    """Post-norm encoder. With ``scale_pos`` (DAB-DETR) the image PE is rescaled by an MLP of the running content."""

    def __init__(self, layer: EncoderLayer, num_layers: int, d_model: int, scale_pos: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.query_scale = mlp(d_model, d_model, d_model, 2) if scale_pos else None

    def forward(self, src, padding_mask, pos):
        for layer in self.layers:
            layer_pos = pos if self.query_scale is None else pos * self.query_scale(src)
            src = layer(src, padding_mask, layer_pos)
        return src


class DetrDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, activation: str):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.multihead_attn = MultiheadAttention(d_model, nheads, dropout)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout1, self.dropout2 = Dropout(dropout), Dropout(dropout)

    def forward(self, tgt, memory, padding_mask, pos, query_pos, self_attn_mask=None):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, attn_mask=self_attn_mask)))
        attended = self.multihead_attn(tgt + query_pos, memory + pos, memory, padding_mask=padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.ffn(tgt))


def concat_per_head(content: torch.Tensor, spatial: torch.Tensor, nheads: int) -> torch.Tensor:
    """[B,N,d] x2 -> [B,N,2d] laid out head by head, so each head's dot product is content.content + spatial.spatial."""
    B, N, d = content.shape
    return torch.cat((content.view(B, N, nheads, -1), spatial.view(B, N, nheads, -1)), dim=-1).view(B, N, 2 * d)


class ConditionalDecoderLayer(nn.Module):
    """Conditional DETR's decoder layer (also DAB-DETR's). ``query_pos`` feeds self-attention and, in the first
    layer only, the cross-attention query; ``query_sine`` is the spatial query concatenated per head."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, activation: str,
                 first: bool):
        super().__init__()
        self.nheads = nheads
        linear = lambda: nn.Linear(d_model, d_model)  # noqa: E731
        self.sa_qcontent_proj, self.sa_qpos_proj, self.sa_kcontent_proj = linear(), linear(), linear()
        self.sa_kpos_proj, self.sa_v_proj = linear(), linear()
        self.self_attn = ProjectedAttention(d_model, nheads, dropout)
        self.ca_qcontent_proj, self.ca_kcontent_proj, self.ca_kpos_proj = linear(), linear(), linear()
        self.ca_v_proj, self.ca_qpos_sine_proj = linear(), linear()
        # Only the first layer adds the positional query to the content query (absent from later layers' weights).
        self.ca_qpos_proj = linear() if first else None
        self.cross_attn = ProjectedAttention(d_model, nheads, dropout)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout1, self.dropout2 = Dropout(dropout), Dropout(dropout)

    def self_attention(self, tgt, query_pos, self_attn_mask=None):
        """The self-attention block: returns the new tgt and the self-attention query (used by subclasses)."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, self.sa_v_proj(tgt), attn_mask=self_attn_mask)))
        return tgt, q

    def cross_queries_keys(self, tgt, memory, pos, query_pos, query_sine):
        """Cross-attention q [B,N,2d] and k [B,S,2d]: content and spatial parts concatenated per head."""
        q_content, k_content = self.ca_qcontent_proj(tgt), self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        return (concat_per_head(q_content, self.ca_qpos_sine_proj(query_sine), self.nheads),
                concat_per_head(k_content, k_pos, self.nheads))

    def forward(self, tgt, memory, padding_mask, pos, query_pos, query_sine, self_attn_mask=None):
        tgt, _ = self.self_attention(tgt, query_pos, self_attn_mask)
        q, k = self.cross_queries_keys(tgt, memory, pos, query_pos, query_sine)
        attended = self.cross_attn(q, k, self.ca_v_proj(memory), padding_mask=padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.ffn(tgt))


def xavier_init(*modules: nn.Module) -> None:
    """DETR initialises every transformer weight matrix with xavier_uniform_ (heads keep PyTorch defaults)."""
    for module in modules:
        for p in module.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)


class DecoderStack(nn.Module):
    """Decoder layers plus the final LayerNorm applied to every layer's output (DETR's intermediate outputs).
    Models attach their own query heads to it (query_scale, ref_point_head, ...) to keep the official key layout."""

    def __init__(self, layers, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)
