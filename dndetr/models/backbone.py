"""ResNet backbone with frozen batch norm, as in DETR: the stem and layer1 stay frozen.

Single-scale models use one output (C5, or C4 at CPU scale); multi-scale models (Deformable DETR) ask for several
stages with ``layers`` and call :meth:`Backbone.levels`. The convolutions run channels_last (NHWC) by default:
oneDNN's and cuDNN's NHWC kernels are faster than NCHW ones (docs/benchmarks.md); only the memory layout of the
weights and activations changes, not their values.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import misc as torchvision_ops

from ..config import BackboneConfig, ConfigError


def load_resnet_weights(resnet: nn.Module, path: str) -> None:
    """Load a local torchvision ResNet state dict (e.g. resnet50-0676ba61.pth); the classifier is ignored."""
    if not Path(path).is_file():
        raise ConfigError(f"model.backbone.weights={path!r} is invalid: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"model.backbone.weights={path!r} is invalid: not a readable state dict ({err})") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ConfigError(f"model.backbone.weights={path!r} is invalid: {len(missing)} missing keys "
                          f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")


class FrozenBatchNorm2d(torchvision_ops.FrozenBatchNorm2d):
    """torchvision's frozen batch norm (same buffers and keys; fp32 results bitwise the same) computed in the
    input's precision. torchvision's multiplies by its fp32 statistics, which promotes a bf16 autocast input to fp32:
    every frozen norm, ReLU and residual add of the backbone then reads and writes twice the bytes, and the next
    convolution casts back to bf16 anyway (bf16 training steps 5 % faster: docs/benchmarks.md). fp16 inputs still
    compute in fp32: fp16's range could overflow ``x * scale`` where the normalised value does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else scale.dtype
        return x * scale.to(dtype)[:, None, None] + bias.to(dtype)[:, None, None]


class Backbone(nn.Module):
    def __init__(self, cfg: BackboneConfig, train_backbone: bool = True, layers: Optional[Sequence[str]] = None,
                 channels_last: bool = True):
        super().__init__()
        if cfg.dilation and cfg.name in ("resnet18", "resnet34"):
            raise ConfigError(f"model.backbone.dilation=True is invalid for {cfg.name}: DC5 needs resnet50/101")
        norm = FrozenBatchNorm2d if cfg.frozen_bn else nn.BatchNorm2d
        resnet = getattr(torchvision.models, cfg.name)(weights=None, norm_layer=norm,
                                                       replace_stride_with_dilation=[False, False, cfg.dilation])
        if cfg.weights:
            load_resnet_weights(resnet, cfg.weights)
        trainable_stages = ("layer4", "layer3", "layer2", "layer1", "conv1")[:cfg.trainable_layers]
        for name, param in resnet.named_parameters():
            stage = "conv1" if name.startswith(("conv1", "bn1")) else name.split(".")[0]
            param.requires_grad_(train_backbone and stage in trainable_stages)
        # IntermediateLayerGetter drops every module after the last returned layer (so layer3 output has no layer4).
        layers = list(layers or [cfg.output_layer])
        self.body = IntermediateLayerGetter(resnet, return_layers={name: str(i) for i, name in enumerate(layers)})
        pool_before_relu(self.body)
        widths = {"layer2": 128, "layer3": 256, "layer4": 512}
        scale = 1 if cfg.name in ("resnet18", "resnet34") else 4  # bottleneck blocks expand channels 4x
        self.channels = [widths[name] * scale for name in layers]
        self.num_channels = self.channels[-1]
        self.set_channels_last(channels_last)

    def set_channels_last(self, enabled: bool) -> None:
        """Lay the convolution weights (and, in forward, the images) out as NHWC, or back as NCHW."""
        self.channels_last = enabled
        self.body.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def levels(self, images: torch.Tensor, masks: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(features, padding mask) for every requested stage, in the order of ``layers``. The features stay NHWC:
        a 1x1 input projection then flattens them to [B, HW, d] without a copy."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return [(features, downsample_mask(masks, features.shape[-2:])) for features in self.body(images).values()]

    def forward(self, images: torch.Tensor, masks: torch.Tensor):
        return self.levels(images, masks)[-1]


def pool_before_relu(body: nn.Module) -> None:
    """Run the stem's max-pool before its ReLU. Both are monotone, so relu(maxpool(x)) == maxpool(relu(x)) and the
    gradients agree too (an input gets one only if it is its window's maximum and positive), while the ReLU and its
    backward run on the pooled tensor, a quarter of the stem's largest one."""
    names = list(body._modules)
    if names[1:4] != ["bn1", "relu", "maxpool"]:
        raise ValueError(f"unexpected ResNet stem {names[:4]}")
    for name in ["relu", *names[4:]]:
        body._modules[name] = body._modules.pop(name)  # re-inserting moves it to the end of the order


def downsample_mask(masks: torch.Tensor, size) -> torch.Tensor:
    """Padding mask [B,H,W] -> [B,h,w] by nearest interpolation (True = padding)."""
    return F.interpolate(masks[None].float(), size=size).to(torch.bool)[0]
