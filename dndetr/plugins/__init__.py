"""Training-time query plug-ins (DN-DETR's denoising and its successors). Every module of this package is imported
here, so a plug-in registers itself by being a file in this folder: see base.py for the interface."""
import importlib
import pkgutil

from .base import PLUGINS, QueryBlock, QueryPlugin, build_plugins, register_plugin

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["PLUGINS", "QueryBlock", "QueryPlugin", "build_plugins", "register_plugin"]
