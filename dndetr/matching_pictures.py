"""Pictures of the matching of one run: for a few probe images, which query was matched to which object at every
recorded epoch (an assignment timeline: epochs x objects, each cell coloured by its query), and the image with each
object's matched query's predicted box at two chosen epochs.

The matchings come from the run's matchings/*.npz (the last decoder layer; the boxes are stored since the recorder
saves them, see instability.py), the image and its objects from the run's own data config (.hydra/config.yaml), read
with the evaluation transform exactly as the recorder saw them, so object j is target index j of the matching.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from .config import DataConfig  # noqa: E402
from .data import build_dataset  # noqa: E402
from .instability import UNMATCHED, list_epochs, load_epoch  # noqa: E402

QUERY_COLOURS = plt.get_cmap("tab20")


def parse_epochs(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``"a,b"`` -> (a, b); None stays None (the first and last recorded epochs)."""
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise ValueError(f"--picture-epochs={text} is invalid: expected two epochs, e.g. 0,15")
    return int(parts[0]), int(parts[1])


def probe_dataset(run_dir: Path):
    """The run's probe images, built from its own .hydra/config.yaml (data group and instability.split)."""
    config_file = Path(run_dir) / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{config_file} not found: the pictures read the images through the run's data config")
    config = yaml.safe_load(config_file.read_text()) or {}
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), config.get("data", {})))
    split = "train" if (config.get("instability") or {}).get("split") == "train" else "val"
    return build_dataset(data_cfg, split, train_augment=False)


def object_queries(assign: np.ndarray, num_objects: int) -> np.ndarray:
    """[num_objects]: the query matched to each object (-1 when none) from one image's assignment vector [Q]."""
    queries = np.full(num_objects, UNMATCHED, dtype=np.int64)
    for query in np.flatnonzero(assign != UNMATCHED):
        if assign[query] < num_objects:
            queries[assign[query]] = query
    return queries


def timeline(records, image: int) -> np.ndarray:
    """int [epochs, objects]: the query matched to each object of probe image ``image`` at each record."""
    num_objects = int(records[-1].num_objects[image])
    return np.stack([object_queries(r.assign[-1, image], num_objects) for r in records])


def absolute_xyxy(box_cxcywh: Sequence[float], width: int, height: int) -> Tuple[float, float, float, float]:
    cx, cy, w, h = box_cxcywh
    return (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height


def draw_timeline(ax, queries: np.ndarray, epochs: List[int], labels: List[str]) -> None:
    colours = np.ones(queries.shape + (3,))
    for (row, col), query in np.ndenumerate(queries):
        if query != UNMATCHED:
            colours[row, col] = query_colour(query)[:3]
            ax.text(col, row, str(query), ha="center", va="center", fontsize=7)
    ax.imshow(colours, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(epochs)), [str(e) for e in epochs], fontsize=7)
    ax.set_xlabel("object (target index: class)")
    ax.set_ylabel("epoch")
    ax.set_title("matched query per object", fontsize=9)


def query_colour(query: int):
    return "white" if query == UNMATCHED else QUERY_COLOURS(query % QUERY_COLOURS.N)


def draw_matches(ax, image, objects: np.ndarray, record, index: int, epoch: int) -> None:
    """The image, each object's ground-truth box (dashed, numbered by target index) and its matched query's
    predicted box at ``epoch`` (solid), both in the query's colour."""
    width, height = image.size
    ax.imshow(image)
    queries = object_queries(record.assign[-1, index], len(objects))
    for j, (box, query) in enumerate(zip(objects, queries)):
        x0, y0, x1, y1 = absolute_xyxy(box, width, height)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=query_colour(query),
                               linestyle="--", lw=1.2))
        ax.text(x1, y1, str(j), color="black", fontsize=7, backgroundcolor="white", ha="right", va="bottom")
    missing = record.boxes is None
    for query in queries[queries != UNMATCHED]:
        if missing:
            break
        colour = query_colour(query)
        x0, y0, x1, y1 = absolute_xyxy(record.boxes[index, query], width, height)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, lw=2))
        ax.text(x0, y0, f"q{query}", color="black", fontsize=7, backgroundcolor=colour, va="bottom")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(f"epoch {epoch}" + (" (no boxes recorded in this older file)" if missing else ""), fontsize=9)
    ax.axis("off")


def matching_pictures(run_dir: Path, out: Path, count: int, epochs: Optional[Tuple[int, int]] = None) -> List[Path]:
    """One PNG per probe image (the first ``count`` with objects) in ``out``; raises ValueError with the reason
    when the run has no matchings, the epochs were not recorded or the images cannot be read."""
    recorded = list_epochs(run_dir)
    if not recorded:
        raise ValueError(f"{run_dir}: no recorded matchings (matchings/*.npz)")
    epochs = epochs or (recorded[0], recorded[-1])
    absent = [e for e in epochs if e not in recorded]
    if absent:
        raise ValueError(f"--picture-epochs: epoch(s) {absent} not recorded in {run_dir} (recorded: {recorded})")
    records = [load_epoch(run_dir, e, with_cost=False, with_boxes=True) for e in recorded]
    chosen = [records[recorded.index(e)] for e in epochs]
    dataset = probe_dataset(run_dir)
    position = {image_id: k for k, image_id in enumerate(dataset.ids)}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in [i for i, n in enumerate(records[-1].num_objects) if n > 0][:count]:
        image_id = int(records[-1].image_ids[index])
        if image_id not in position:
            raise ValueError(f"probe image {image_id} is not in the dataset of {run_dir}'s data config")
        _, target = dataset[position[image_id]]
        image = dataset.load_image(image_id)
        names = {k: c.get("name", str(k)) for k, c in dataset.coco.cats.items()}
        labels = [f"{j}: {names.get(int(c), c)}" for j, c in enumerate(target["labels"].tolist())]
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.2, 1.2]})
        draw_timeline(axes[0], timeline(records, index), recorded, labels)
        for ax, record, epoch in zip(axes[1:], chosen, epochs):
            draw_matches(ax, image, target["boxes"].numpy(), record, index, epoch)
        fig.suptitle(f"{Path(run_dir).name}: probe image {image_id} (last decoder layer; dashed: ground truth "
                     "with its target index, solid: its matched query's box)",
                     fontsize=10)
        fig.tight_layout()
        written.append(out / f"matching_image{image_id}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
