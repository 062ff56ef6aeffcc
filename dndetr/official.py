"""Loading and exporting official checkpoints (DETR, Conditional DETR, DAB-DETR, DN-DAB-DETR, ...).

Our modules compute the same functions with the same tensors as the official ones; only the key names differ.
Official key -> our key (``ours_to_official`` is the exact inverse; the table is also in docs/models.md):

- ``backbone.0.body.*`` -> ``backbone.body.*``
- ``transformer.{encoder,decoder,patterns}.*`` -> ``{encoder,decoder,patterns}.*``
- ``<mlp>.layers.{i}.*`` -> ``<mlp>.{3*i}.*`` (torchvision's MLP: Linear, ReLU, Dropout per hidden layer), for the
  MLP names the model class lists in ``official_mlps``
- ``*.layers.{k}.{linear1,linear2,activation}.*`` -> ``*.layers.{k}.ffn.{linear1,linear2,activation}.*``
- a query plug-in's ``official_prefixes`` (DN-DETR: ``label_enc.*`` -> ``plugins.<group>.label_enc.*``)
- the model class's ``official_aliases`` (DAB-DETR: ``transformer.decoder.bbox_embed.*``, the box head under a
  second name) -> dropped on load after checking they equal the tensor they alias, written back on export

Packed attention weights (``in_proj_weight`` [3d, d], q/k/v rows) need no conversion: our encoder layers and DETR
decoder layers use ``nn.MultiheadAttention`` exactly like the originals, and the conditional decoder layers keep the
official explicit ``*_proj`` Linears and ``out_proj``.
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .config import ConfigError
from .models.registry import model_entry
from .plugins import PLUGINS

StateDict = Dict[str, torch.Tensor]

MLP_STRIDE = 3  # torchvision's MLP: Linear, ReLU, Dropout, Linear, ...
TRANSFORMER_PARTS = ("encoder.", "decoder.", "patterns.")
_OFFICIAL_FFN = re.compile(r"\.layers\.(\d+)\.(linear1|linear2|activation)\.")
_OUR_FFN = re.compile(r"\.layers\.(\d+)\.ffn\.")


def plugin_prefixes() -> List[Tuple[str, str]]:
    """(official prefix, our prefix) of every query plug-in's parameters."""
    return [(official, f"plugins.{group}.{ours}") for group, cls in PLUGINS.items()
            for official, ours in getattr(cls, "official_prefixes", {}).items()]


def _mlp_pattern(model_name: str, ours: bool) -> re.Pattern:
    names = "|".join(model_entry(model_name).cls.official_mlps)
    layers = "" if ours else r"layers\."
    return re.compile(rf"(^|\.)({names})\.{layers}(\d+)\.")


def official_key_to_ours(key: str, model_name: str) -> str:
    if key.startswith("backbone.0.body."):
        key = "backbone.body." + key[len("backbone.0.body."):]
    elif key.startswith("transformer."):
        key = key[len("transformer."):]
    else:
        for official, ours in plugin_prefixes():
            if key.startswith(official):
                key = ours + key[len(official):]
                break
    key = _mlp_pattern(model_name, ours=False).sub(lambda m: f"{m[1]}{m[2]}.{MLP_STRIDE * int(m[3])}.", key)
    return _OFFICIAL_FFN.sub(r".layers.\1.ffn.\2.", key)


def our_key_to_official(key: str, model_name: str) -> str:
    if key.startswith("backbone.body."):
        key = "backbone.0.body." + key[len("backbone.body."):]
    elif key.startswith(TRANSFORMER_PARTS):
        key = "transformer." + key
    else:
        for official, ours in plugin_prefixes():
            if key.startswith(ours):
                key = official + key[len(ours):]
                break

    def mlp_index(m: re.Match) -> str:
        index = int(m[3])
        if index % MLP_STRIDE:
            raise ConfigError(f"{key!r}: MLP parameters must sit at indices 0, {MLP_STRIDE}, {2 * MLP_STRIDE}, ...")
        return f"{m[1]}{m[2]}.layers.{index // MLP_STRIDE}."

    key = _mlp_pattern(model_name, ours=True).sub(mlp_index, key)
    return _OUR_FFN.sub(r".layers.\1.", key)


def official_to_ours(state: StateDict, model_name: str) -> StateDict:
    """An official ``model`` state dict -> ours (see the module docstring for the rules)."""
    aliases = model_entry(model_name).cls.official_aliases
    duplicates = {}
    for key, value in state.items():
        alias = next((a for a in aliases if key.startswith(a)), None)
        if alias is not None:
            duplicates[key] = value
            head_key = aliases[alias] + key[len(alias):]
            if head_key not in state or not torch.equal(state[head_key], value):
                raise ConfigError(f"{key!r} must be the same tensor as {head_key!r} (model {model_name!r} stores "
                                  "it twice)")
        elif key.startswith("transformer.decoder.bbox_embed."):
            raise ConfigError(f"{key!r} is unexpected for model {model_name!r}: it does not share its box head with "
                              "the decoder")
    return {official_key_to_ours(k, model_name): v for k, v in state.items() if k not in duplicates}


def ours_to_official(state: StateDict, model_name: str) -> StateDict:
    """Our state dict -> the official layout (with the aliases the official model stores a second time)."""
    official = {our_key_to_official(k, model_name): v for k, v in state.items()}
    for alias, target in model_entry(model_name).cls.official_aliases.items():
        official.update({alias + k[len(target):]: v for k, v in list(official.items()) if k.startswith(target)})
    return official


def is_official(state: StateDict) -> bool:
    return any(k.startswith(("transformer.", "backbone.0.")) for k in state)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_checkpoint_file(path) -> StateDict:
    """The model state dict inside an official checkpoint (``{'model': ..., 'args': Namespace}``), one of ours
    (``{'model': ..., ...}``) or a bare state dict. Nothing but tensors, plain containers and
    ``argparse.Namespace`` is ever unpickled (``weights_only=True``)."""
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {str(path)!r}: file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the restricted unpickler and the zip reader fail in many different ways
        foreign = re.search(r"GLOBAL ([\w.]+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and foreign:
            raise ConfigError(f"checkpoint {str(path)!r} is refused: it pickles {foreign[1]}; only tensors, plain "
                              "containers and argparse.Namespace are loaded") from None
        detail = str(err).strip().split(". ")[0].splitlines()[0] if str(err).strip() else ""
        reason = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        raise ConfigError(f"checkpoint {str(path)!r} is unreadable (truncated, corrupt or not a torch file): "
                          f"{reason}") from None
    state = obj.get("model") if isinstance(obj, dict) and "model" in obj else obj
    if not _is_state_dict(state):
        raise ConfigError(f"checkpoint {str(path)!r} holds no state dict (expected a dict of tensors, or one "
                          "under the key 'model')")
    return state


def _mismatch_report(state: StateDict, expected: StateDict, limit: int = 5) -> str:
    """'' when the keys and shapes agree, else counts and the first few offenders of each kind."""
    problems = {
        "missing": [k for k in expected if k not in state],
        "unexpected": [k for k in state if k not in expected],
        "shape mismatches": [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                             if k in state and state[k].shape != v.shape],
    }
    return "; ".join(f"{len(items)} {kind} (e.g. {', '.join(items[:limit])})"
                     for kind, items in problems.items() if items)


def load_into(model: nn.Module, path) -> None:
    """Load a checkpoint (official or ours) into ``model`` strictly: every key and shape must match."""
    state = load_checkpoint_file(path)
    if is_official(state):
        state = official_to_ours(state, model.cfg.name)
    problem = _mismatch_report(state, model.state_dict())
    if problem:
        missing_plugins = sorted({k.split(".")[1] for k in state if k.startswith("plugins.")} - set(model.plugins))
        if missing_plugins:
            problem += (f" (the checkpoint has parameters of the query plug-in(s) {', '.join(missing_plugins)}: "
                        "turn them on, e.g. dn.groups > 0 for a DN-DETR checkpoint)")
        raise ConfigError(f"checkpoint {str(path)!r} does not fit model {model.cfg.name!r}: {problem}")
    model.load_state_dict(state, strict=True)


def export_official(model: nn.Module, model_name: Optional[str] = None) -> StateDict:
    """The model's state dict in the official layout (model_name defaults to ``model.cfg.name``)."""
    return ours_to_official(model.state_dict(), model_name or model.cfg.name)
