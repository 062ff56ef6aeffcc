"""Model zoo: ``build_model(cfg, num_classes)`` picks DETR, Conditional DETR or DAB-DETR from ``model.name``."""
from __future__ import annotations

from ..config import Config
from .base import DetrBase
from .conditional import ConditionalDETR
from .dab import DABDETR
from .dab_deformable import DABDeformableDETR
from .dab_deformable_enc import DABDeformableEncOnly
from .deformable import DeformableDETR
from .detr import DETR

MODELS = {"detr": DETR, "conditional": ConditionalDETR, "dab": DABDETR, "deformable": DeformableDETR,
          "dab_deformable": DABDeformableDETR, "dab_deformable_enc": DABDeformableEncOnly}


def build_model(cfg: Config, num_classes: int, train_backbone: bool = True) -> DetrBase:
    train_backbone = train_backbone and cfg.optim.lr_backbone > 0
    return MODELS[cfg.model.name](cfg.model, num_classes, cfg.dn, train_backbone)


__all__ = ["build_model", "DetrBase", "DETR", "ConditionalDETR", "DABDETR", "MODELS"]
