"""The optimizer: torch's fused AdamW, handed channels_last convolution weights as the contiguous tensors they are.

The fused kernel works on contiguous tensors only. A convolution weight stored channels_last (the backbone's
default, ``backbone.py``) is not contiguous in torch's sense, so on every step the kernel would clone it, its
gradient and both moments, and copy the results back: about 2 ms of the default job's 110 ms step and 8 ms of the
bench DAB-DETR step (docs/benchmarks.md). In memory such a [O, I, kH, kW] weight is a dense [O, kH, kW, I] tensor;
permuted to that order it is a contiguous view of the same memory, which the kernel updates in place. AdamW is
elementwise, so every value is bitwise the same as with torch's own class; the parameters, their state and the
state dict are the same tensors.
"""
from __future__ import annotations

from typing import List

import torch

TO_CHANNELS_LAST_ORDER = (0, 2, 3, 1)


def dense_channels_last(tensor: torch.Tensor) -> bool:
    return (tensor.dim() == 4 and not tensor.is_contiguous()
            and tensor.is_contiguous(memory_format=torch.channels_last))


def contiguous_views(per_parameter: List[List[torch.Tensor]]) -> None:
    """In place: each parameter's tensors (one list per role, index-aligned) become contiguous views where all of
    them are dense channels_last; any other parameter keeps its tensors, since the roles must stay elementwise
    aligned."""
    for index, tensors in enumerate(zip(*per_parameter)):
        if all(dense_channels_last(tensor) for tensor in tensors):
            for role, tensor in zip(per_parameter, tensors):
                role[index] = tensor.permute(TO_CHANNELS_LAST_ORDER)


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (fused by default) whose fused step takes channels_last weights without copies."""

    def __init__(self, params, **kwargs):
        kwargs.setdefault("fused", True)
        super().__init__(params, **kwargs)

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        has_complex = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        if group["fused"]:
            roles = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if group["amsgrad"] else [])
            contiguous_views(roles)
        return has_complex
