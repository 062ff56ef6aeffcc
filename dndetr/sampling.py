"""Data order and loading, made independent of workers, ranks and resumes.

- the data order of epoch e is a permutation drawn from (seed, e), so a resumed epoch skips the batches it did;
- every sample's augmentation is drawn from its own generator seeded by (seed, epoch, index);
- data loaders get private generators so that creating them never consumes the global RNG.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .data import collate
from .rng import cpu_seeded


class SeededSamples(Dataset):
    """Draws each sample's augmentation from a generator seeded by (seed, epoch, index), not from shared state."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with cpu_seeded((self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2 ** 63)):
            return self.dataset[index]


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> List[list]:
    """This rank's batches for an epoch: a (seed, epoch) permutation cut into global batches, then per rank."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    global_batch = batch_size * world
    usable = (num_samples // global_batch) * global_batch if num_samples >= global_batch else num_samples
    batches = [order[i:i + global_batch] for i in range(0, usable, global_batch)]
    return [b[rank * batch_size:(rank + 1) * batch_size] for b in batches if b[rank * batch_size:]]


def make_loader(dataset: Dataset, batch_sampler, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers,
                      generator=torch.Generator(), persistent_workers=False)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, limit: Optional[int] = None) -> DataLoader:
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return make_loader(dataset, batches, num_workers)


def targets_to(targets: List[dict], device) -> List[dict]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
