"""Write a checkpoint in the official layout (the DETR / Conditional DETR / DAB-DETR / DN-DETR repositories' key
names), loadable by their code and by ``model.init_from``:

    python -m dndetr.export <run folder or checkpoint> <out.pth> [--model NAME]

A run folder exports its checkpoint_best.pt (else checkpoint_last.pt). The model name comes from the checkpoint's
own config (every checkpoint a run writes has one); a bare state dict needs ``--model``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from .config import ConfigError
from .files import RunFileError, atomic_torch_save
from .models import MODELS
from .official import is_official, load_checkpoint_file, ours_to_official
from .trainer import BEST_CHECKPOINT, CHECKPOINT


def checkpoint_in(path: Path) -> Path:
    """``path`` itself, or the best (else last) checkpoint of the run folder it names."""
    if not path.is_dir():
        return path
    for name in (BEST_CHECKPOINT, CHECKPOINT):
        if (path / name).is_file():
            return path / name
    raise ConfigError(f"{path} holds neither {BEST_CHECKPOINT} nor {CHECKPOINT}")


def model_name_of(path: Path, given: Optional[str]) -> str:
    """--model, else model.name from the checkpoint's stored config (read with weights_only=True)."""
    if given:
        if given not in MODELS:
            raise ConfigError(f"--model={given} is invalid: must be one of {', '.join(sorted(MODELS))}")
        return given
    state = torch.load(path, map_location="cpu", weights_only=True)
    name = state.get("config", {}).get("model", {}).get("name") if isinstance(state, dict) else None
    if name is None:
        raise ConfigError(f"checkpoint {path} stores no config naming its model: pass --model "
                          f"({', '.join(sorted(MODELS))})")
    return name


def export(source: Path, out: Path, model: Optional[str] = None) -> tuple:
    """Write ``out``; returns (the checkpoint exported, the model name)."""
    checkpoint = checkpoint_in(Path(source))
    state = load_checkpoint_file(checkpoint)  # one-line errors for missing, foreign or unreadable files
    if is_official(state):
        raise ConfigError(f"checkpoint {checkpoint} is already in the official layout")
    if Path(out).resolve() == checkpoint.resolve():
        raise ConfigError(f"{out} is the checkpoint being exported: choose another output file")
    name = model_name_of(checkpoint, model)
    atomic_torch_save({"model": ours_to_official(state, name)}, Path(out))
    return checkpoint, name


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dndetr.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a run folder or a checkpoint file (ours)")
    parser.add_argument("out", type=Path, help="the official-layout checkpoint to write (.pth)")
    parser.add_argument("--model", default=None, help="model name when the checkpoint stores no config")
    args = parser.parse_args(argv)
    try:
        checkpoint, name = export(args.source, args.out, args.model)
    except (ConfigError, RunFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {checkpoint} in the official layout (model {name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
