"""Training steps of the bench config with torch's fused AdamW against ours (``dndetr.optim.AdamW``: the same
kernel, handed channels_last convolution weights as contiguous views instead of cloning them every step).

Each model is built once; both optimizers train their own copy from the same initial weights on the same batch,
alternating step by step, and the two copies stay bitwise equal (checked after the warm-up steps). The result per
model and precision is the median of the paired ratios ours / torch's.

    python benchmarks/bench_optimizer.py --models detr,conditional,dab --precision fp32,bf16 --repeats 15
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (PRECISIONS, build_ours, check_run_args, make_batch, make_optimizer,  # noqa: E402
                               median, microbench_parser, our_step, parse_names, registered_models, round_robin,
                               save_results)


def compare(name: str, precision: str, args) -> dict:
    torch.manual_seed(0)
    model, criterion = build_ours(name, "cpu")
    images, masks, targets = make_batch(args.batch, args.size, args.objects, "cpu")
    copies = {"torch": copy.deepcopy(model), "ours": copy.deepcopy(model)}
    optimizers = {"torch": make_optimizer(copies["torch"], torch.optim.AdamW, fused=True),
                  "ours": make_optimizer(copies["ours"])}
    trainable = {key: optimizer.param_groups[0]["params"] for key, optimizer in optimizers.items()}

    def step(key):
        def run():
            torch.manual_seed(1)  # the same dropout masks and DN noise for both copies
            our_step(copies[key], criterion, optimizers[key], images, masks, targets, precision)
        return run
    times = round_robin({key: step(key) for key in copies}, args.warmup, args.repeats)
    if not all(torch.equal(a, b) for a, b in zip(trainable["torch"], trainable["ours"])):
        raise SystemExit(f"error: {name} {precision}: the two optimizers' weights differ")
    ratio = median([b / a for a, b in zip(times["torch"], times["ours"])])
    return {"torch_s": median(times["torch"]), "ours_s": median(times["ours"]), "ours_over_torch": ratio}


def main() -> None:
    parser = microbench_parser(__doc__)
    parser.add_argument("--models", default="detr,conditional,dab")
    parser.add_argument("--precision", default="fp32,bf16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--objects", type=int, default=7)
    parser.set_defaults(repeats=15, warmup=2)
    args = parser.parse_args()
    check_run_args(parser, args)
    try:
        models = parse_names(args.models, registered_models())
        precisions = parse_names(args.precision, list(PRECISIONS), "--precision")
    except ValueError as err:
        parser.error(str(err))
    results = {}
    for name in models:
        for precision in precisions:
            row = results[f"{name} {precision}"] = compare(name, precision, args)
            print(f"{name} {precision}: torch's fused AdamW {row['torch_s']:.3f} s, ours {row['ours_s']:.3f} s per "
                  f"step, ours/torch {row['ours_over_torch']:.3f} (median of {args.repeats} paired steps)")
    save_results(args, "optimizer", results)


if __name__ == "__main__":
    main()
