"""``python -m dndetr.data.check <root> [--train-ann F] [--val-ann F] [--images]``: check a dataset's annotation files.

Prints every problem (grouped by kind, with counts) or, for a clean file, its size and objects-per-image statistics;
exits 0 when both files are clean and 2 otherwise. The checks are those a training job runs at start
(dndetr/data/annotations.py); image files are not opened, ``--images`` checks that they exist.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dndetr.data import DataError
from dndetr.data.annotations import AnnotationProblems, object_counts, object_stats
from dndetr.data.coco import CocoDetection


def describe(dataset, num_queries: int) -> list:
    counts = object_counts(dataset)
    largest, mean = object_stats(dataset)
    over = sum(count > num_queries for count in counts)
    lines = [f"{dataset.ann_file}: ok",
             f"  {len(dataset)} images, {len(dataset.coco.anns)} annotations, {len(dataset.coco.cats)} categories "
             f"(largest id {max(dataset.coco.cats)}: {max(dataset.coco.cats) + 1} classifier outputs)",
             f"  objects per image (crowds left out): max {largest}, mean {mean:.2f}; "
             f"{over} image{'s' * (over != 1)} with more than {num_queries} (num_queries)"]
    return lines + [f"  note: {count} {what}" for what, count in dataset.notes.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dndetr.data.check", description=(
        "Check a COCO-layout dataset's annotation files (without opening the images): exit 0 when clean, "
        "2 when there are problems."))
    parser.add_argument("root", type=Path, help="the dataset folder (data.root)")
    parser.add_argument("--train-split", default="train2017", help="training image folder (data.train_split)")
    parser.add_argument("--val-split", default="val2017", help="validation image folder (data.val_split)")
    parser.add_argument("--train-ann", help="training annotation file relative to root (data.train_ann); "
                                            "default annotations/instances_<train split>.json")
    parser.add_argument("--val-ann", help="validation annotation file (data.val_ann)")
    parser.add_argument("--images", action="store_true", help="also check that every image file exists")
    parser.add_argument("--first", type=int, default=20, help="problems listed per kind (default 20, 0 = all)")
    parser.add_argument("--num-queries", type=int, default=100, help="count images with more objects (default 100)")
    args = parser.parse_args(argv)
    clean_run = True
    for split, ann in ((args.train_split, args.train_ann), (args.val_split, args.val_ann)):
        try:
            lines = describe(CocoDetection(args.root, split, ann_file=ann, check_files=args.images), args.num_queries)
        except AnnotationProblems as err:
            lines, clean_run = err.report(args.first or None), False
        except DataError as err:
            lines, clean_run = [str(err)], False
        print("\n".join(lines))
    return 0 if clean_run else 2


if __name__ == "__main__":
    sys.exit(main())
