"""Forward + backward of the default job's backbone (ResNet-18 to layer3, live BatchNorm, everything trained) on the
CPU, in our layout and stem order against the alternatives they replaced: NHWC with the stem's ReLU before its
max-pool (torchvision's order), and NCHW in torchvision's order.

All variants hold the same weights and alternate repeat by repeat; the result is the median time per variant, and
each variant's median ratio to ours over the paired repeats.

    python benchmarks/bench_backbone.py --precision fp32,bf16 --repeats 20 --json backbone.json
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (PRECISIONS, autocast, check_run_args, compose_config, median,  # noqa: E402
                               microbench_parser, parse_names, round_robin, save_results)
from dndetr.models.backbone import Backbone  # noqa: E402

TORCHVISION_STEM = ("conv1", "bn1", "relu", "maxpool")


def torchvision_order(backbone: Backbone) -> nn.Sequential:
    """The backbone's own modules run as torchvision runs them: the stem's ReLU before its max-pool."""
    body = backbone.body
    return nn.Sequential(*(body[name] for name in TORCHVISION_STEM),
                         *(module for name, module in body.named_children() if name not in TORCHVISION_STEM))


def variants(batch: int, size: int, precision: str) -> dict:
    torch.manual_seed(0)
    ours = Backbone(compose_config([], default_job=True).model.backbone)
    nchw = copy.deepcopy(ours)
    nchw.set_channels_last(False)
    images = torch.randn(batch, 3, size, size)
    grad = None

    def step(forward, layout):
        inputs = images.contiguous(memory_format=layout)

        def run():
            nonlocal grad
            with autocast(precision, "cpu"):
                features = forward(inputs)
            if grad is None:
                grad = torch.randn(features.shape, generator=torch.Generator().manual_seed(1))
            features.backward(grad.to(features.dtype).contiguous(memory_format=layout))
        return run
    nhwc = torch.channels_last
    return {"ours (NHWC, max-pool before ReLU)": step(lambda x: ours.body(x)["0"], nhwc),
            "NHWC, ReLU before max-pool": step(torchvision_order(ours), nhwc),
            "NCHW, ReLU before max-pool": step(torchvision_order(nchw), torch.contiguous_format)}


def main(argv=None) -> None:
    parser = microbench_parser(__doc__)
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=144, help="the default job's largest training scale")
    args = parser.parse_args(argv)
    try:
        precisions = parse_names(args.precision, tuple(PRECISIONS), "--precision")
    except ValueError as err:
        parser.error(str(err))
    if args.batch < 1 or args.size < 32:
        parser.error("--batch must be >= 1 and --size >= 32")
    check_run_args(parser, args)
    results = {}
    for precision in precisions:
        times = round_robin(variants(args.batch, args.size, precision), args.warmup, args.repeats)
        ours = next(iter(times.values()))
        results[precision] = {name: {"median_s": median(values), "vs_ours": median([t / o for t, o in
                                                                                    zip(values, ours)])}
                              for name, values in times.items()}
        for name, row in results[precision].items():
            print(f"{precision}  {name:34s} {row['median_s'] * 1e3:7.2f} ms   {row['vs_ours']:.2f}x ours")
    save_results(args, "backbone", results)


if __name__ == "__main__":
    main()
