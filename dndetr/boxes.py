"""Box geometry for the matcher and the losses: (generalised) IoU with an optional denominator epsilon.

torchvision's ``generalized_box_iou`` has no epsilon; DAB-DETR's and DN-DETR's code add 1e-6 to the IoU and GIoU
denominators, DETR's and Conditional DETR's do not (``loss.giou_eps``). With eps = 0 these functions compute the
same values as torchvision's, operation for operation. The paired form computes only the diagonal, so its memory is
linear in the number of boxes (the DN loss has thousands of boxes at many groups).
"""
from __future__ import annotations

import torch
from torchvision.ops import box_convert


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _giou(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """GIoU of broadcast xyxy boxes a [..., 4] and b [..., 4]."""
    inter_wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = _area(a) + _area(b) - inter
    iou = inter / (union + eps)
    hull_wh = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / (hull + eps)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """[N, M] GIoU between xyxy boxes a [N, 4] and b [M, 4]."""
    return _giou(a[:, None, :], b[None, :, :], eps)


def paired_generalized_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """[N] GIoU of a[i] with b[i] (xyxy)."""
    return _giou(a, b, eps)
