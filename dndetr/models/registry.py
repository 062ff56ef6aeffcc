"""The model registry: a model registers itself in its own module, and everything else finds it here.

    @register_model("my_model", MyModelConfig)
    class MyModel(DetrBase): ...

``MyModelConfig`` is the model's structured-config schema (a dataclass extending :class:`dndetr.config.ModelConfig`);
Hydra composes ``conf/model/<name>.yaml`` against it (stored as ``schema/model/<name>``), the official-checkpoint
mapping reads the model class's ``official_*`` attributes, and the benchmarks list models from :data:`MODELS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from ..config import ConfigError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type
    schema: type


MODELS: Dict[str, ModelEntry] = {}


def register_model(name: str, schema: type):
    def decorator(cls: type) -> type:
        if name in MODELS and MODELS[name].cls is not cls:
            raise ValueError(f"model name {name!r} is registered twice ({MODELS[name].cls.__name__}, {cls.__name__})")
        MODELS[name] = ModelEntry(name, cls, schema)
        cls.registry_name = name
        return cls
    return decorator


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ConfigError(f"model.name={name!r} is invalid: must be one of {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(cfg, num_classes: int, train_backbone: bool = True):
    """The configured model with its query plug-ins. ``cfg`` is the composed :class:`dndetr.config.Config`."""
    from ..plugins import build_plugins

    plugins = build_plugins(cfg, num_classes, cfg.model.hidden_dim)
    model = model_entry(cfg.model.name).cls(
        cfg.model, num_classes, no_object_class=cfg.loss.class_loss == "ce",
        box_queries=any(p.needs_box_queries for p in plugins.values()),
        train_backbone=train_backbone and cfg.optim.lr_backbone > 0)
    model.plugins = plugins
    return model
