"""Model zoo. Every module of this package is imported here, so a model registers itself (models/registry.py) by
being a file in this folder; ``build_model(cfg, num_classes)`` builds the one ``model.name`` names."""
import importlib
import pkgutil

from .base import DetrBase
from .registry import MODELS, build_model, model_entry, register_model

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DetrBase", "MODELS", "build_model", "model_entry", "register_model"]
