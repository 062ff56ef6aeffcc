"""Forward + backward of dropout at the bench config's sizes on the CPU: torch's ``F.dropout``, ours
(``dndetr.models.transformer.dropout``: float 0/1 masks from 16-bit random lanes), and ours with its mask applied
the way the first version did, as a boolean mask through ``torch.where`` (what this CPU's boolean kernels cost).

All variants alternate repeat by repeat; the result is the median time per variant.

    python benchmarks/bench_dropout.py --repeats 20 --json dropout.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import check_run_args, median, microbench_parser, round_robin, save_results  # noqa: E402
from dndetr.models.transformer import dropout, keep_mask, keep_probability  # noqa: E402

P = 0.1  # the published dropout of DETR, Conditional DETR and Deformable DETR
# (name, shape): the bench config's (batch 2, 384 px: 12x12 = 144 tokens, 300 queries, d 256, 8 heads) largest
# dropout inputs.
SHAPES = [("decoder self-attention weights", (2, 8, 300, 300)), ("decoder cross-attention weights", (2, 8, 300, 144)),
          ("encoder attention weights", (2, 8, 144, 144)), ("FFN hidden", (2, 300, 2048))]


def variants(shape, dtype):
    x = torch.randn(shape, dtype=dtype).requires_grad_()
    grad = torch.randn(shape, dtype=dtype)

    def where_with_bool_mask(t):
        return torch.where(keep_mask(t, P).bool(), t * (1.0 / keep_probability(P)), 0.0)

    def run(fn):
        return lambda: fn(x).backward(grad)
    return {"torch F.dropout": run(lambda t: F.dropout(t, P, training=True)),
            "ours": run(lambda t: dropout(t, P, training=True)),
            "ours, mask through torch.where": run(where_with_bool_mask)}


def main() -> None:
    parser = microbench_parser(__doc__)
    args = parser.parse_args()
    check_run_args(parser, args)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        precision = str(dtype).removeprefix("torch.")
        for name, shape in SHAPES:
            times = round_robin(variants(shape, dtype), args.warmup, args.repeats)
            results[f"{name}, {precision}"] = {key: median(values) for key, values in times.items()}
            row = ", ".join(f"{key} {value * 1e3:.2f} ms" for key, value in results[f"{name}, {precision}"].items())
            print(f"{name} {list(shape)} {precision}: {row}")
    save_results(args, "dropout", results)


if __name__ == "__main__":
    main()
