"""Loading and exporting the official DETR / Conditional DETR / DAB-DETR / DN-DAB-DETR / Deformable DETR (plain,
refine, two-stage) / DAB-Deformable-DETR / DN-Deformable-DETR checkpoints.

Our modules compute the same functions with the same tensors as the official ones; only the key names differ.
Official key -> our key (``ours_to_official`` is the exact inverse; the table is also in docs/models.md):

- ``backbone.0.body.*`` -> ``backbone.body.*``
- ``transformer.{encoder,decoder,patterns,level_embed,...}`` -> the same name without ``transformer.``
- ``<mlp>[.{k}].layers.{i}.*`` -> ``<mlp>[.{k}].{3*i}.*`` (torchvision's MLP: Linear, ReLU, Dropout per hidden
  layer; ``.{k}`` = a per-layer head list of the deformable models)
- ``*.layers.{k}.{linear1,linear2,activation}.*`` -> ``*.layers.{k}.ffn.{linear1,linear2,activation}.*``
- ``label_enc.weight`` (DN-DAB-DETR) -> ``dn.label_enc.weight``
- ``transformer.decoder.{bbox,class}_embed.*`` (DAB-DETR and the deformable models with refinement: the heads
  themselves, under a second name) -> dropped on load after checking they equal ``{bbox,class}_embed.*``, written
  back on export (which heads: the model's ``official_aliases``)

``<mlp>`` is any of :data:`MLP_NAMES`. Packed attention weights (``in_proj_weight`` [3d, d], q/k/v rows) need no
conversion: our encoder layers and DETR decoder layers use ``nn.MultiheadAttention`` exactly like the originals,
and the conditional decoder layers keep the official explicit ``*_proj`` Linears and ``out_proj``.
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from .config import ConfigError

StateDict = Dict[str, torch.Tensor]

MODEL_NAMES = ("detr", "conditional", "dab", "deformable", "dab_deformable", "dab_deformable_enc")
# Every MLP in the official models (DETR's MLP class, a ModuleList under ``layers``) and in ours (torchvision MLP).
MLP_NAMES = ("bbox_embed", "query_scale", "ref_point_head", "ref_anchor_head", "dn_pos_head")
MLP_STRIDE = 3  # torchvision's MLP: Linear, ReLU, Dropout, Linear, ...
DECODER_ALIAS = "transformer.decoder."  # second name of heads the decoder also uses (refinement)
ALIASED_HEADS = ("bbox_embed.", "class_embed.")
ALIAS_MODELS = ("dab", "deformable", "dab_deformable", "dab_deformable_enc")
TRANSFORMER_PARTS = ("encoder.", "decoder.", "patterns.", "level_embed", "reference_points.", "enc_output.",
                     "enc_output_norm.", "pos_trans.", "pos_trans_norm.")

_MLP = "|".join(MLP_NAMES)
_OFFICIAL_MLP = re.compile(rf"(^|\.)((?:{_MLP})(?:\.\d+)?)\.layers\.(\d+)\.")
_OUR_MLP = re.compile(rf"(^|\.)((?:{_MLP})(?:\.\d+)?)\.(\d+)\.")
_OFFICIAL_FFN = re.compile(r"\.layers\.(\d+)\.(linear1|linear2|activation)\.")
_OUR_FFN = re.compile(r"\.layers\.(\d+)\.ffn\.")


def _check_name(model_name: str) -> None:
    if model_name not in MODEL_NAMES:
        raise ConfigError(f"model_name={model_name!r} is invalid: must be one of {', '.join(MODEL_NAMES)}")


def official_key_to_ours(key: str) -> str:
    if key.startswith("backbone.0.body."):
        key = "backbone.body." + key[len("backbone.0.body."):]
    elif key.startswith("transformer."):
        key = key[len("transformer."):]
    elif key.startswith("label_enc."):
        key = "dn." + key
    key = _OFFICIAL_MLP.sub(lambda m: f"{m[1]}{m[2]}.{MLP_STRIDE * int(m[3])}.", key)
    return _OFFICIAL_FFN.sub(r".layers.\1.ffn.\2.", key)


def our_key_to_official(key: str) -> str:
    if key.startswith("backbone.body."):
        key = "backbone.0.body." + key[len("backbone.body."):]
    elif key.startswith(TRANSFORMER_PARTS):
        key = "transformer." + key
    elif key.startswith("dn.label_enc."):
        key = key[len("dn."):]

    def mlp_index(m: re.Match) -> str:
        index = int(m[3])
        if index % MLP_STRIDE:
            raise ConfigError(f"{key!r}: MLP parameters must sit at indices 0, {MLP_STRIDE}, {2 * MLP_STRIDE}, ...")
        return f"{m[1]}{m[2]}.layers.{index // MLP_STRIDE}."

    key = _OUR_MLP.sub(mlp_index, key)
    return _OUR_FFN.sub(r".layers.\1.", key)


def official_to_ours(state: StateDict, model_name: str) -> StateDict:
    """An official ``model`` state dict -> ours (see the module docstring for the rules)."""
    _check_name(model_name)
    duplicates = {k: v for k, v in state.items() if k.startswith(tuple(DECODER_ALIAS + h for h in ALIASED_HEADS))}
    if duplicates and model_name not in ALIAS_MODELS:
        raise ConfigError(f"{next(iter(duplicates))!r} is unexpected for model {model_name!r}: only DAB-DETR and "
                          "the deformable models share their heads with the decoder")
    for key, value in duplicates.items():
        head_key = key[len(DECODER_ALIAS):]
        if head_key not in state or not torch.equal(state[head_key], value):
            raise ConfigError(f"{key!r} must be the same tensor as {head_key!r} (the decoder shares the heads)")
    return {official_key_to_ours(k): v for k, v in state.items() if k not in duplicates}


def ours_to_official(state: StateDict, model_name: str, aliases: Optional[tuple] = None) -> StateDict:
    """Our state dict -> the official layout, with the decoder's second name for the heads in ``aliases``
    (default: DAB-DETR's box head for ``dab``, none otherwise)."""
    _check_name(model_name)
    if aliases is None:
        aliases = ("bbox_embed.",) if model_name == "dab" else ()
    official = {our_key_to_official(k): v for k, v in state.items()}
    official.update({DECODER_ALIAS + k: v for k, v in official.items() if k.startswith(tuple(aliases))})
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
        if "dn.label_enc.weight" in state and model.dn is None:
            problem += " (a DN-DETR checkpoint: its matching queries need the label embedding, set dn.groups > 0)"
        raise ConfigError(f"checkpoint {str(path)!r} does not fit model {model.cfg.name!r}: {problem}")
    model.load_state_dict(state, strict=True)


def export_official(model: nn.Module, model_name: Optional[str] = None) -> StateDict:
    """The model's state dict in the official layout (model_name defaults to ``model.cfg.name``)."""
    return ours_to_official(model.state_dict(), model_name or model.cfg.name, getattr(model, "official_aliases", None))
