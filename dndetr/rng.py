"""Seeding and saving/restoring every random generator a run uses (Python, numpy, torch CPU and CUDA)."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array travels as a tensor: checkpoints load with weights_only=True, which refuses numpy objects.
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore every generator afterwards (iterating a DataLoader, for one, draws a seed from torch's)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@contextmanager
def cpu_seeded(seed: int) -> Iterator[None]:
    """Draw from torch's CPU generator seeded with ``seed``, then restore it. Only the CPU generator is reseeded:
    ``torch.manual_seed`` would reseed the CUDA generators too, which ``fork_rng(devices=[])`` does not restore, so a
    GPU run's own random stream would then depend on where its samples were loaded (main process or workers)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
