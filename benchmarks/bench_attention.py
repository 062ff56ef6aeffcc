"""Forward + backward of attention without dropout at the sizes the models use, on the CPU: torch's SDPA in fp32
and in bf16, SDPA in fp32 on bf16 inputs under bf16 autocast (what ours ran until 2026-12-06), and ours
(``dndetr.models.transformer.attention``) under bf16 autocast, which now takes the explicit bf16 products.

All variants alternate repeat by repeat; the result is the median time per variant.

    python benchmarks/bench_attention.py --repeats 20 --json attention.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import check_run_args, median, microbench_parser, round_robin, save_results  # noqa: E402
from dndetr.models.transformer import attention  # noqa: E402

# (name, batch, queries, keys, heads, head width): the default job's encoder (9x9 map at 144 px), decoder
# self-attention (20 queries) and cross-attention, the study scale's encoder (8x8), and the bench config's DAB-DETR
# decoder self-attention without and with 10 DN groups of 9 objects and its cross-attention (12x12 map at 384 px).
SHAPES = [("default job encoder", 8, 81, 81, 8, 16), ("default job decoder", 8, 20, 20, 8, 16),
          ("default job cross-attention", 8, 20, 81, 8, 16), ("study encoder", 8, 64, 64, 8, 16),
          ("bench decoder, 300 queries", 2, 300, 300, 8, 32), ("bench decoder, 390 queries", 2, 390, 390, 8, 32),
          ("bench cross-attention, 300 queries", 2, 300, 144, 8, 32)]


def inputs(batch, queries, keys, heads, width, dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, n, heads * width, generator=gen).to(dtype).requires_grad_()
            for n in (queries, keys, keys)]


def variants(batch, queries, keys, heads, width):
    def heads_first(dtype):
        return [t.view(batch, t.shape[1], heads, width).transpose(1, 2)
                for t in inputs(batch, queries, keys, heads, width, dtype)]

    def sdpa(dtype):
        q, k, v = heads_first(dtype)
        return lambda: F.scaled_dot_product_attention(q, k, v).float().sum().backward()

    def sdpa_fp32_under_autocast():
        q, k, v = heads_first(torch.bfloat16)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.autocast("cpu", enabled=False):
                    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
            out.float().sum().backward()
        return step

    def ours_bf16_autocast():
        q, k, v = inputs(batch, queries, keys, heads, width, torch.bfloat16)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = attention(q, k, v, heads, 0.0)
            out.float().sum().backward()
        return step
    return {"SDPA fp32": sdpa(torch.float32), "SDPA bf16": sdpa(torch.bfloat16),
            "SDPA fp32 on bf16 inputs": sdpa_fp32_under_autocast(), "ours, bf16 autocast": ours_bf16_autocast()}


def main() -> None:
    parser = microbench_parser(__doc__)
    args = parser.parse_args()
    check_run_args(parser, args)
    results = {}
    for name, *shape in SHAPES:
        times = round_robin(variants(*shape), args.warmup, args.repeats)
        results[name] = {key: median(values) for key, values in times.items()}
        row = ", ".join(f"{key} {value * 1e3:.2f} ms" for key, value in results[name].items())
        print(f"{name} (batch {shape[0]}, {shape[1]}x{shape[2]}, {shape[3]} heads of {shape[4]}): {row}")
    save_results(args, "attention", results)


if __name__ == "__main__":
    main()
