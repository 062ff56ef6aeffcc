"""Structured-config schemas: one dataclass per Hydra config group.

OmegaConf checks types and unknown keys when Hydra composes the config. Value ranges are checked in
``__post_init__``, which runs when :func:`validate` turns the composed config into these objects (before any
training starts), so every bad value fails with one line naming the key, the value and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A user's configuration mistake: reported as one line, no traceback."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def check_choice(key: str, value: Any, choices: tuple) -> None:
    check(value in choices, key, value, "must be one of " + ", ".join(map(str, choices)))


@dataclass
class BackboneConfig:
    name: str = "resnet50"
    dilation: bool = False  # DC5: dilate the last stage (stride 16 instead of 32)
    weights: Optional[str] = None  # local torchvision ResNet state dict; nothing is ever downloaded
    frozen_bn: bool = True  # FrozenBatchNorm2d, as DETR (right for pretrained weights; train BN from scratch)
    trainable_layers: int = 3  # counted from the top: 3 = layer2..layer4 (DETR), 5 = everything incl. the stem
    # C5 (stride 32) as published; layer3 (C4, stride 16) and layer2 (C3, stride 8) are CPU-scale options
    output_layer: str = "layer4"

    def __post_init__(self) -> None:
        check_choice("model.backbone.name", self.name, ("resnet18", "resnet34", "resnet50", "resnet101"))
        check_choice("model.backbone.output_layer", self.output_layer, ("layer2", "layer3", "layer4"))
        check(0 <= self.trainable_layers <= 5, "model.backbone.trainable_layers", self.trainable_layers,
              "must be in 0..5 (3 = layer2-4 as DETR, 5 = all)")


@dataclass
class ModelConfig:
    """What every model has. A model's own schema extends this in the model's module (see models/registry.py)."""
    name: str = ""  # the registry name; set by conf/model/<name>.yaml
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    num_queries: int = 100
    aux_loss: bool = True
    pe_temperature: float = 10000.0  # image positional encoding (DAB-DETR uses 20)
    num_select: int = 100  # detections kept per image by the post-processor
    init_from: Optional[str] = None  # our checkpoint or an official .pth, loaded strictly

    def __post_init__(self) -> None:
        from .models.registry import MODELS  # the registry imports this module

        if type(self) is not ModelConfig:  # the bare base is only the placeholder until a model group is chosen
            check_choice("model.name", self.name, tuple(sorted(MODELS)))
        check_choice("model.activation", self.activation, ("relu", "prelu", "gelu"))
        for key in ("hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries", "num_select"):
            check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "must be >= 1")
        check(self.hidden_dim % self.nheads == 0, "model.hidden_dim", self.hidden_dim,
              "must be divisible by model.nheads")
        check(self.hidden_dim % 2 == 0, "model.hidden_dim", self.hidden_dim, "must be even (sine encoding)")
        check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")
        check(self.pe_temperature > 0, "model.pe_temperature", self.pe_temperature, "must be > 0")


@dataclass
class LossConfig:
    """The criterion's settings. The matcher derives its class-cost type and focal parameters from these, so the
    matching cost and the loss always agree; the matcher group holds only the cost weights."""
    # "ce": softmax + no-object class (DETR); "focal": sigmoid focal (Conditional, DAB); "stable": Stable-DINO's
    # position-supervised sigmoid loss on the matched queries (focal for fixed targets such as DN's)
    class_loss: str = "ce"
    weight_class: float = 1.0
    weight_bbox: float = 5.0
    weight_giou: float = 2.0
    eos_coef: float = 0.1  # weight of the no-object class in the CE loss
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    giou_eps: float = 0.0  # added to IoU/GIoU denominators: 1e-6 in DAB-DETR's and DN-DETR's code, 0 in DETR's
    stable_power: float = 2.0  # class_loss=stable: a matched query's class target is IoU^stable_power
    weight_class_dn: Optional[float] = None  # class weight of fixed-target (DN) losses; null = weight_class

    def __post_init__(self) -> None:
        check_choice("loss.class_loss", self.class_loss, ("ce", "focal", "stable"))
        check(self.stable_power > 0, "loss.stable_power", self.stable_power, "must be > 0")
        check(self.weight_class_dn is None or self.weight_class_dn >= 0, "loss.weight_class_dn", self.weight_class_dn,
              "must be null or >= 0")
        for key in ("weight_class", "weight_bbox", "weight_giou", "eos_coef", "focal_gamma", "giou_eps"):
            check(getattr(self, key) >= 0, f"loss.{key}", getattr(self, key), "must be >= 0")
        check(0.0 <= self.focal_alpha <= 1.0, "loss.focal_alpha", self.focal_alpha, "must be in [0, 1]")


@dataclass
class MatcherConfig:
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    # Stable-DINO's position-modulated class cost: p * s^position_beta with s = (GIoU + 1) / 2 rescaled per image
    # (0 = off; Stable-DINO: 0.5); needs a sigmoid class loss (focal or stable)
    position_beta: float = 0.0

    def __post_init__(self) -> None:
        for key in ("cost_class", "cost_bbox", "cost_giou", "position_beta"):
            check(getattr(self, key) >= 0, f"matcher.{key}", getattr(self, key), "must be >= 0")
        costs = (self.cost_class, self.cost_bbox, self.cost_giou)
        check(any(c > 0 for c in costs), "matcher.cost_class/cost_bbox/cost_giou", costs,
              "at least one cost must be > 0")


@dataclass
class SyntheticConfig:
    num_train: int = 400
    num_val: int = 100
    image_size: int = 128
    num_classes: int = 3  # category ids 1..num_classes
    min_objects: int = 0
    max_objects: int = 8
    min_size: float = 0.15  # object side as a fraction of the image side
    max_size: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("num_train", "num_val", "image_size", "num_classes"):
            check(getattr(self, key) >= 1, f"data.synthetic.{key}", getattr(self, key), "must be >= 1")
        check(0 <= self.min_objects <= self.max_objects, "data.synthetic.max_objects", self.max_objects,
              "must be >= data.synthetic.min_objects >= 0")
        check(0 < self.min_size <= self.max_size <= 1, "data.synthetic.max_size", self.max_size,
              "need 0 < min_size <= max_size <= 1")


@dataclass
class DataConfig:
    name: str = "synthetic"  # "synthetic" (built in, generated once into root) or "coco" (any COCO-layout root)
    root: str = ".cache/synthetic"
    train_split: str = "train2017"  # COCO layout: <root>/<split>/ images, <root>/annotations/instances_<split>.json
    val_split: str = "val2017"
    # annotation files relative to root (Roboflow: <split>/_annotations.coco.json); null = the COCO layout's
    train_ann: Optional[str] = None
    val_ann: Optional[str] = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # DETR augmentation, scalable for CPU runs: shorter side drawn from train_scales, longer side <= max_size
    train_scales: List[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    crop: bool = True  # the resize -> random crop -> resize branch (taken with probability 0.5)
    crop_resize: List[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    hflip: bool = True
    val_size: int = 800
    batch_size: int = 2
    val_batch_size: int = 2
    num_workers: int = 2
    max_train_images: Optional[int] = None  # use only the first N images (overfit tests, smoke runs)
    max_val_images: Optional[int] = None
    val_on_train: bool = False  # evaluate on the (unaugmented) training images

    def __post_init__(self) -> None:
        check_choice("data.name", self.name, ("synthetic", "coco"))
        check(bool(self.root), "data.root", self.root, "must name the dataset folder (data=coco needs data.root=...)")
        for key in ("train_ann", "val_ann"):
            check(getattr(self, key) != "", f"data.{key}", getattr(self, key),
                  "must name a file relative to data.root, or be null for annotations/instances_<split>.json")
        check(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        check(self.val_batch_size >= 1, "data.val_batch_size", self.val_batch_size, "must be >= 1")
        check(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        check(len(self.train_scales) > 0 and min(self.train_scales) >= 1, "data.train_scales", self.train_scales,
              "must be a non-empty list of positive sizes")
        check(self.max_size >= 1 and self.val_size >= 1, "data.max_size", self.max_size, "sizes must be >= 1")
        check(1 <= self.crop_min <= self.crop_max, "data.crop_min", self.crop_min, "need 1 <= crop_min <= crop_max")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5  # 0 freezes the whole backbone
    weight_decay: float = 1e-4
    lr_drop: int = 200  # StepLR step, in epochs
    lr_gamma: float = 0.1
    clip_max_norm: float = 0.1  # 0 disables clipping

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        check(self.lr_backbone >= 0, "optim.lr_backbone", self.lr_backbone, "must be >= 0")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        check(self.lr_drop >= 1, "optim.lr_drop", self.lr_drop, "must be >= 1")
        check(0 < self.lr_gamma <= 1, "optim.lr_gamma", self.lr_gamma, "must be in (0, 1]")
        check(self.clip_max_norm >= 0, "optim.clip_max_norm", self.clip_max_norm, "must be >= 0")


@dataclass
class TrainerConfig:
    epochs: int = 300
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA only, grad scaler) | auto (dndetr/device.py): autocast
    compile: bool = False  # torch.compile the model (its compile time is logged)
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    checkpoint_every_iters: int = 0  # extra mid-epoch checkpoints; 0 = only at epoch ends
    progress: bool = True
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch default
    eval_only: bool = False  # evaluate model.init_from (or the run's checkpoint) and exit
    resume: bool = True  # continue from <run dir>/checkpoint_last.pt when it exists
    deterministic: bool = True

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "trainer.epochs", self.epochs, "must be >= 1")
        check_choice("trainer.device", self.device, ("auto", "cpu", "cuda"))
        check_choice("trainer.precision", self.precision, ("fp32", "bf16", "fp16", "auto"))
        check(self.eval_every >= 1, "trainer.eval_every", self.eval_every, "must be >= 1")
        check(self.checkpoint_every_iters >= 0, "trainer.checkpoint_every_iters", self.checkpoint_every_iters,
              "must be >= 0")
        check(self.threads >= 0, "trainer.threads", self.threads, "must be >= 0")


@dataclass
class InstabilityConfig:
    enabled: bool = True
    every: int = 1  # epochs
    split: str = "val"  # val | train (the unaugmented training images)
    max_images: Optional[int] = None
    all_layers: bool = False  # also record every intermediate decoder layer
    groups: bool = False  # also record every Group DETR group (IS_group{k}); runs all K groups at recording

    def __post_init__(self) -> None:
        check(self.every >= 1, "instability.every", self.every, "must be >= 1")
        check_choice("instability.split", self.split, ("val", "train"))
        check(self.max_images is None or self.max_images >= 1, "instability.max_images", self.max_images,
              "must be null or >= 1")


@dataclass
class LoggerConfig:
    """An optional experiment logger next to metrics.jsonl (which stays the source of truth): dndetr/loggers.py."""
    name: str = "none"  # none | tensorboard
    every_iters: int = 50  # training loss every N iterations; epoch metrics are logged every epoch
    dir: Optional[str] = None  # event files; null = <run dir>/tensorboard

    def __post_init__(self) -> None:
        check_choice("logger.name", self.name, ("none", "tensorboard"))
        check(self.every_iters >= 1, "logger.every_iters", self.every_iters, "must be >= 1")


@dataclass
class Config:
    """The composed configuration. Query plug-ins (dn, ...) add their own groups: see :func:`config_class`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    instability: InstabilityConfig = field(default_factory=InstabilityConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


CORE_GROUPS = {"model": ModelConfig, "loss": LossConfig, "matcher": MatcherConfig, "data": DataConfig,
               "optim": OptimConfig, "trainer": TrainerConfig, "instability": InstabilityConfig,
               "logger": LoggerConfig}
_CONFIG_CLASS = None


def config_class() -> type:
    """:class:`Config` plus one field per registered query plug-in (its config group and schema), made once."""
    global _CONFIG_CLASS
    if _CONFIG_CLASS is None:
        from .plugins import PLUGINS  # importing the package registers every plug-in

        plugin_fields = [(p.group, p.schema, field(default_factory=p.schema)) for p in PLUGINS.values()]
        _CONFIG_CLASS = make_dataclass("Config", plugin_fields, bases=(Config,))
    return _CONFIG_CLASS


def register_configs() -> None:
    """Store the schemas under ``schema/<group>/``, out of the way of each group's user-facing options."""
    from .models import MODELS  # importing the package registers every model
    from .plugins import PLUGINS

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=config_class())
    for group, node in CORE_GROUPS.items():
        cs.store(group=f"schema/{group}", name="base", node=node)
    for name, entry in MODELS.items():
        cs.store(group="schema/model", name=name, node=entry.schema)
    for plugin in PLUGINS.values():
        cs.store(group=f"schema/{plugin.group}", name="base", node=plugin.schema)


def reject_unknown_keys(node: Any, prefix: str = "") -> None:
    """Keys added with ``+key=value`` pass Hydra and become stray attributes of the schema objects: refuse them."""
    known = {f.name for f in fields(node)}
    for key, value in vars(node).items():
        if key not in known:
            raise ConfigError(f"{prefix}{key}={value!r} is invalid: no such key (the keys are in dndetr/config.py)")
        if is_dataclass(value):
            reject_unknown_keys(value, f"{prefix}{key}.")


def validate(cfg: DictConfig) -> Config:
    """Instantiate the schemas (running every range check); raises ConfigError with a one-line message."""
    try:
        config = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf type errors: keep only their first line
        raise ConfigError(str(err).splitlines()[0]) from None
    reject_unknown_keys(config)
    return config
