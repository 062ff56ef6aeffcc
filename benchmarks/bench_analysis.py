"""Time the instability analysis on a COCO-scale matching log: 5,000 probe images x 300 queries x 50 epochs.

    python benchmarks/bench_analysis.py [--images 5000] [--queries 300] [--epochs 50] [--layers 1] [--dir DIR]

Writes the log with dndetr.instability.save_epoch (not timed), then times
  1. instability_series: every epoch's IS / IS_norm / IS_layer{k}, each file loaded once (what the analysis does);
  2. epoch_metrics for every epoch (what the engine calls after recording; loads the previous file again).
Target: (1) <= 5 s.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from dndetr.instability import epoch_metrics, instability_series, list_epochs, save_epoch


def synthetic_epoch(rng: np.random.Generator, objects: np.ndarray, num_queries: int, num_layers: int):
    """Each image's targets matched to random distinct queries (COCO val: 7.3 objects per image on average)."""
    num_images = len(objects)
    assign = np.full((num_layers, num_images, num_queries), -1, dtype=np.int16)
    order = np.argsort(rng.random((num_layers, num_images, num_queries)), axis=-1)  # a random query order per image
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(num_queries), axis=-1)  # query n is the ranks[n]-th in that order
    matched = ranks < objects[None, :, None]
    assign[matched] = ranks[matched]  # the k-th query in the order gets target k
    cost = np.where(matched, rng.random(assign.shape, dtype=np.float32), np.float32(np.nan))
    return assign, cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--layers", type=int, default=1, help="recorded decoder layers (6 = instability.all_layers)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the log (default: a temporary dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.dir or Path(tmp)
        rng = np.random.default_rng(0)
        objects = np.minimum(rng.poisson(7.3, args.images), args.queries)
        image_ids = np.arange(args.images) + 1
        start = time.perf_counter()
        for epoch in range(args.epochs):
            assign, cost = synthetic_epoch(rng, objects, args.queries, args.layers)
            save_epoch(run_dir, epoch, image_ids, assign, cost, objects, np.arange(6 - args.layers, 6))
        write_s = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in (run_dir / "matchings").iterdir()) / 2**20

        start = time.perf_counter()
        series = instability_series(run_dir)
        series_s = time.perf_counter() - start
        start = time.perf_counter()
        per_epoch = [epoch_metrics(run_dir, epoch) for epoch in list_epochs(run_dir)]
        engine_s = time.perf_counter() - start

    assert len(series) == args.epochs - 1 and per_epoch[1:] == [{k: v for k, v in row.items() if k != "epoch"}
                                                                for row in series]
    print(f"log: {args.images} images x {args.queries} queries x {args.epochs} epochs x {args.layers} layer(s), "
          f"{size_mb:.1f} MiB on disk, written in {write_s:.1f} s")
    print(f"instability_series (all epochs):     {series_s:.2f} s  (target <= 5 s); "
          f"IS of the last epoch {series[-1]['IS']:.2f}")
    print(f"epoch_metrics for every epoch:       {engine_s:.2f} s  ({engine_s / args.epochs * 1000:.0f} ms per epoch)")


if __name__ == "__main__":
    main()
