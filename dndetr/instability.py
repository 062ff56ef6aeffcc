"""Matching instability (DN-DETR paper, section 3): record the Hungarian matching of a fixed probe set every few
epochs and measure how many queries change their matched target between recorded epochs.

For image i and recorded epoch e, V_n is the index of the target matched to query n (-1 when unmatched) and

    IS(e) = mean over images of  sum_n 1[V^e_n != V^prev_n]

where prev is the previous recorded epoch. Storage and normalisation are described in docs/instability.md.
"""
from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .evaluation import eval_mode
from .files import atomic_write
from .rng import preserved_rng
from .sampling import targets_to

MATCHINGS_DIR = "matchings"
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.npz$")
UNMATCHED = -1
MAX_TARGETS = np.iinfo(np.int16).max  # target indices are stored as int16


def assignment_vector(indices: Tuple[Sequence[int], Sequence[int]], num_queries: int) -> np.ndarray:
    """V: int16 [num_queries], the target index matched to each query, -1 where unmatched."""
    query_idx, target_idx = (np.asarray(torch.as_tensor(i).cpu()) for i in indices)
    if target_idx.size and target_idx.max() > MAX_TARGETS:
        raise ValueError(f"target index {target_idx.max()} does not fit the int16 assignment vector")
    assign = np.full(num_queries, UNMATCHED, dtype=np.int16)
    assign[query_idx] = target_idx
    return assign


def matched_costs(indices: Tuple[Sequence[int], Sequence[int]], cost_matrix) -> np.ndarray:
    """float32 [Q]: the matching cost of each query's matched target, NaN where unmatched (cost_matrix is [Q, n])."""
    cost_matrix = np.asarray(torch.as_tensor(cost_matrix).detach().float().cpu())
    query_idx, target_idx = (np.asarray(torch.as_tensor(i).cpu()) for i in indices)
    costs = np.full(cost_matrix.shape[0], np.nan, dtype=np.float32)
    costs[query_idx] = cost_matrix[query_idx, target_idx]
    return costs


def _check_pair(prev: np.ndarray, curr: np.ndarray) -> None:
    if prev.shape != curr.shape:
        raise ValueError(f"assignments differ in shape: {prev.shape} vs {curr.shape}")
    if prev.ndim < 2 or prev.shape[-2] == 0:
        raise ValueError(f"assignments must be [..., images, queries] with at least one image, got {prev.shape}")


def per_image_instability(prev: np.ndarray, curr: np.ndarray) -> np.ndarray:
    """[..., I] number of queries whose matched target changed, for [..., I, Q] assignments."""
    prev, curr = np.asarray(prev), np.asarray(curr)
    _check_pair(prev, curr)
    return (prev != curr).sum(axis=-1)


def instability(prev: np.ndarray, curr: np.ndarray) -> float:
    """The paper's IS: mean over images of the number of queries whose matched target changed ([I, Q] inputs)."""
    return float(per_image_instability(prev, curr).mean(axis=-1))


def normalised_instability(prev: np.ndarray, curr: np.ndarray, num_objects: np.ndarray) -> float:
    """IS / (2 x mean objects per image): a ratio of means, the paper's "max possible IS = 2 x 7.36" scale.

    A change of one query's target moves at most two queries (the one that loses the target and the one that gains
    it), so IS <= 2 x objects per image and the ratio lies in [0, 1]. Images without objects count in both means
    (their IS is always 0). NaN when the probe set has no object at all.
    """
    num_objects = np.asarray(num_objects)
    if num_objects.shape != np.shape(prev)[-2:-1]:
        raise ValueError(f"num_objects has shape {num_objects.shape}, assignments {np.shape(prev)}")
    mean_objects = float(num_objects.mean())
    if mean_objects == 0:
        return float("nan")
    return instability(prev, curr) / (2.0 * mean_objects)


# ----------------------------------------------------------------------------------------------------------------
# storage: <run_dir>/matchings/epoch_<epoch, 4 digits>.npz


@dataclass
class MatchingRecord:
    """One recorded epoch; R = recorded decoder layers (the last one last), I = probe images, Q = queries."""

    path: Path
    image_ids: np.ndarray  # int64 [I]
    assign: np.ndarray  # int16 [R, I, Q]
    cost: Optional[np.ndarray]  # float32 [R, I, Q]; None when loaded with with_cost=False
    num_objects: np.ndarray  # int32 [I]
    layers: np.ndarray  # int64 [R]


def epoch_path(run_dir, epoch: int) -> Path:
    return Path(run_dir) / MATCHINGS_DIR / f"epoch_{epoch:04d}.npz"


def _check_shapes(where, image_ids, assign, cost, num_objects, layers) -> None:
    if assign.ndim != 3:
        raise ValueError(f"{where}: assign must be [layers, images, queries], got shape {assign.shape}")
    num_layers, num_images, _ = assign.shape
    expected = {"image_ids": (image_ids.shape, (num_images,)), "num_objects": (num_objects.shape, (num_images,)),
                "layers": (layers.shape, (num_layers,))}
    if cost is not None:
        expected["cost"] = (cost.shape, assign.shape)
    for name, (got, want) in expected.items():
        if got != want:
            raise ValueError(f"{where}: {name} has shape {got}, expected {want} to match assign {assign.shape}")


def save_epoch(run_dir, epoch: int, image_ids, assign, cost, num_objects, layers) -> Path:
    """Write matchings/epoch_<epoch>.npz atomically: a crash mid-write leaves every earlier file as it was."""
    arrays = {"image_ids": np.asarray(image_ids, dtype=np.int64), "assign": np.asarray(assign, dtype=np.int16),
              "cost": np.asarray(cost, dtype=np.float32), "num_objects": np.asarray(num_objects, dtype=np.int32),
              "layers": np.asarray(layers, dtype=np.int64)}
    path = epoch_path(run_dir, epoch)
    _check_shapes(path, **arrays)
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def load_epoch(run_dir, epoch: int, with_cost: bool = True) -> MatchingRecord:
    """Read one recorded epoch; with_cost=False skips the cost array (the largest) and leaves cost None."""
    path = epoch_path(run_dir, epoch)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no matchings recorded for epoch {epoch}")
    names = ("image_ids", "assign", "num_objects", "layers") + (("cost",) if with_cost else ())
    try:
        with np.load(path) as data:
            arrays = {n: data[n] for n in names if n in data.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: unreadable matchings file ({err})") from None
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}")
    arrays.setdefault("cost", None)
    _check_shapes(path, **arrays)
    return MatchingRecord(path=path, **arrays)


def list_epochs(run_dir) -> List[int]:
    """Recorded epochs, ascending (temporary files of an interrupted write are ignored)."""
    folder = Path(run_dir) / MATCHINGS_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for m in map(EPOCH_FILE.match, os.listdir(folder)) if m)


def pair_metrics(prev: MatchingRecord, curr: MatchingRecord) -> Dict[str, float]:
    """IS and IS_norm of the last decoder layer and IS_layer{k} for every layer recorded in both epochs."""
    if not np.array_equal(prev.image_ids, curr.image_ids):
        raise ValueError(f"probe images differ between {prev.path} and {curr.path}: IS needs the same images")
    metrics = {"IS": instability(prev.assign[-1], curr.assign[-1]),
               "IS_norm": normalised_instability(prev.assign[-1], curr.assign[-1], curr.num_objects)}
    common, prev_rows, curr_rows = np.intersect1d(prev.layers, curr.layers, return_indices=True)
    if len(common):
        changes = per_image_instability(prev.assign[prev_rows], curr.assign[curr_rows]).mean(axis=-1)
        metrics.update({f"IS_layer{k}": float(v) for k, v in zip(common, changes)})
    return metrics


def epoch_metrics(run_dir, epoch: int) -> Dict[str, float]:
    """IS metrics of `epoch` against the previous recorded epoch; {} when there is none (the first record)."""
    earlier = [e for e in list_epochs(run_dir) if e < epoch]
    if not earlier:
        return {}
    return pair_metrics(load_epoch(run_dir, earlier[-1], with_cost=False), load_epoch(run_dir, epoch, with_cost=False))


def instability_series(run_dir) -> List[Dict[str, float]]:
    """epoch_metrics for every recorded epoch after the first, loading each file once (used by the analysis)."""
    rows, prev = [], None
    for epoch in list_epochs(run_dir):
        curr = load_epoch(run_dir, epoch, with_cost=False)
        if prev is not None:
            rows.append({"epoch": epoch, **pair_metrics(prev, curr)})
        prev = curr
    return rows


# ----------------------------------------------------------------------------------------------------------------
# recording


def decoder_layer_outputs(outputs: dict, all_layers: bool, num_layers: Optional[int]) -> Tuple[List[dict], List[int]]:
    """The {pred_logits, pred_boxes} dicts to match and their decoder layer indices, the last layer last."""
    aux = outputs.get("aux_outputs") or []
    if num_layers is None:
        num_layers = len(aux) + 1
    if all_layers and len(aux) + 1 != num_layers:
        raise ValueError(f"instability.all_layers needs the outputs of all {num_layers} decoder layers, the model "
                         f"returned {len(aux) + 1} (set model.aux_loss=true)")
    last = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    if not all_layers:
        return [last], [num_layers - 1]
    layer_dicts = [{"pred_logits": a["pred_logits"], "pred_boxes": a["pred_boxes"]} for a in aux] + [last]
    return layer_dicts, list(range(num_layers))


class MatchingRecorder:
    """Collects the assignment vectors of eval-mode outputs batch by batch (``add``), so that the engine can record
    during the evaluation pass instead of running the model over the probe images a second time."""

    def __init__(self, matcher, all_layers: bool = False, num_layers: Optional[int] = None):
        self.matcher, self.all_layers, self.num_layers = matcher, all_layers, num_layers
        self.image_ids, self.num_objects, self.assign, self.cost, self.layers = [], [], [], [], None

    @torch.no_grad()
    def add(self, outputs: dict, targets: List[dict]) -> None:
        layer_dicts, self.layers = decoder_layer_outputs(outputs, self.all_layers, self.num_layers)
        num_queries = outputs["pred_logits"].shape[1]
        batch_assign, batch_cost = [], []
        for layer_out in layer_dicts:
            matrices = self.matcher.cost_matrices(layer_out, targets)
            indices = self.matcher.assign(matrices)  # the training matcher's assignment, costs computed once
            batch_assign.append([assignment_vector(ix, num_queries) for ix in indices])
            batch_cost.append([matched_costs(ix, c) for ix, c in zip(indices, matrices)])
        self.assign.append(np.asarray(batch_assign, dtype=np.int16))  # [R, B, Q]
        self.cost.append(np.asarray(batch_cost, dtype=np.float32))
        self.image_ids += [int(t["image_id"]) for t in targets]
        self.num_objects += [len(t["labels"]) for t in targets]

    def result(self):
        """(image_ids int64 [I], assign int16 [R, I, Q], cost float32 [R, I, Q], num_objects int32 [I],
        layers int64 [R]), ready for save_epoch."""
        if not self.image_ids:
            raise ValueError("the instability probe loader yielded no images")
        return (np.asarray(self.image_ids, dtype=np.int64), np.concatenate(self.assign, axis=1),
                np.concatenate(self.cost, axis=1), np.asarray(self.num_objects, dtype=np.int32),
                np.asarray(self.layers, dtype=np.int64))


@torch.no_grad()
def record_matchings(model, loader, matcher, device, all_layers: bool = False, num_layers: Optional[int] = None):
    """Match the model's eval-mode predictions on the probe loader to their targets (see MatchingRecorder.result).

    num_layers (the decoder depth) names the last layer when the model returns no aux outputs; by default it is
    inferred from them. The model's train/eval mode and all RNG states are restored, so recording does not change
    training.
    """
    device = torch.device(device)
    recorder = MatchingRecorder(matcher, all_layers, num_layers)
    with eval_mode(model), preserved_rng():
        for images, masks, targets in loader:
            recorder.add(model(images.to(device), masks.to(device)), targets_to(targets, device))
    return recorder.result()
