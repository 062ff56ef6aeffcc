"""Does query denoising speed up fitting? Tiny DAB-DETR vs DN-DAB-DETR overfitting a few fixed images.

Both models are built from the same seed and trained full-batch on the same synthetic images (no augmentation)
with AdamW; only ``dn.groups`` differs. The curve compared is the *matching part's* training loss (every
Hungarian term, all decoder layers, without the DN terms), which is what DN is meant to speed up.

    python benchmarks/overfit_dn.py --steps 400 --seeds 0 1 2 --threads 1 --out overfit_dn.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import compose_config  # noqa: E402
from dndetr.config import DataConfig, SyntheticConfig  # noqa: E402
from dndetr.criterion import build_criterion  # noqa: E402
from dndetr.data import CocoDetection, build_transforms, collate, ensure_synthetic, num_classes  # noqa: E402
from dndetr.models import build_model  # noqa: E402

# DN-DAB-DETR as published (conf/model/dab.yaml: dropout 0, focal loss, matcher cost_class 2) scaled down to a CPU.
TINY_DAB = ["model=dab", "model.backbone.name=resnet18", "model.hidden_dim=64", "model.nheads=4", "model.enc_layers=2",
            "model.dec_layers=2", "model.dim_feedforward=128", "model.num_queries=20"]


def load_batch(root: Path, num_images: int, image_size: int):
    """The first ``num_images`` synthetic training images at their own size: (images, masks, targets)."""
    synthetic = SyntheticConfig(num_train=num_images, num_val=1, image_size=image_size, num_classes=3,
                                min_objects=2, max_objects=4, seed=0)
    data = CocoDetection(ensure_synthetic(root, synthetic), "train2017",
                         build_transforms(DataConfig(val_size=image_size, max_size=image_size), train=False))
    return (*collate([data[i] for i in range(len(data))]), num_classes(data))


def matching_curve(batch, classes: int, dn_groups: int, seed: int, steps: int, lr: float) -> list:
    """The matching part's training loss after each of ``steps`` full-batch AdamW steps."""
    images, masks, targets = batch
    cfg = compose_config(TINY_DAB + [f"dn.groups={dn_groups}"])
    torch.manual_seed(seed)
    model, criterion = build_model(cfg, classes), build_criterion(cfg, classes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    model.train()
    curve = []
    for _ in range(steps):
        losses = criterion(model(images, masks, targets), targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        curve.append(sum(v.item() for k, v in losses.items() if not k.startswith("dn_")))
    return curve


def steps_to(curve: list, threshold: float):
    """First step (1-based) whose matching loss is at or below ``threshold``; None if never."""
    return next((i + 1 for i, loss in enumerate(curve) if loss <= threshold), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--groups", type=int, default=5, help="dn.groups of the DN model")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[8.0, 5.0, 3.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the curves and summary as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        *batch, classes = load_batch(Path(root), args.images, args.image_size)
    print(f"{args.images} images, {sum(len(t['labels']) for t in batch[2])} objects, {classes - 1} classes")
    results = []
    for seed in args.seeds:
        for name, groups in (("DAB", 0), ("DN-DAB", args.groups)):
            start = time.time()
            curve = matching_curve(batch, classes, groups, seed, args.steps, args.lr)
            reached = {str(t): steps_to(curve, t) for t in args.thresholds}
            results.append({"model": name, "seed": seed, "curve": curve, "steps_to": reached,
                            "seconds": time.time() - start})
            checkpoints = {s: round(curve[s - 1], 2) for s in (50, 100, 200, 300, 400, args.steps) if s <= args.steps}
            print(f"seed {seed} {name:7s} matching loss at steps {checkpoints}; steps to reach {reached} "
                  f"({time.time() - start:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
