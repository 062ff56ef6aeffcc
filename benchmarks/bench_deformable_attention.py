"""Time and memory of multi-scale deformable attention (dndetr/models/deformable_attention.py) vs image size.

For each square image size, the 4 levels of Deformable DETR (strides 8, 16, 32, 64; d=256 or ``--d-model``,
8 heads, 4 points) are attended by two kinds of queries, as in one encoder layer and one decoder layer:

- encoder: every token queries (Lq = S), 2-D reference points;
- decoder: 300 queries with box references.

Each case runs forward + backward with the attention's query chunking off (``max_sample_bytes=None``) and on (the
default budget, or ``--budget-mib``) and, on the CPU, with each sampling forced: the row sums and grid_sample
(``rows_vs_grid_sample``, paired; the CPU's default is the row sums from 32 channels per head, grid_sample below);
the variants alternate repeat by repeat.
Reported per case: median time,
the bytes autograd keeps for backward (counted with saved-tensor hooks, so the same on CPU and CUDA) and, on CUDA,
the peak allocated memory during the step above what was allocated before it.

    python benchmarks/bench_deformable_attention.py --sizes 256,512,800 --device cpu --json deform.json

With ``--whole-steps`` it times whole training steps instead: each deformable model of ``--models`` in the bench
config of docs/benchmarks.md (batch ``--batch`` at each of ``--sizes``), at each of ``--precision``, with every
attention module's sampling forced to the row sums and to grid_sample in turn, alternating step by step on one model
(same weights, same batch), so the result is the median of the paired ratios:

    python benchmarks/bench_deformable_attention.py --whole-steps --sizes 384 --repeats 6 --json deform_steps.json
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (PRECISIONS, build_ours, check_run_args, make_batch, make_optimizer,  # noqa: E402
                               median, our_step, parse_names, round_robin, save_results, timed)
from dndetr.models import MODELS  # noqa: E402
from dndetr.models.deformable_attention import DEFAULT_MAX_SAMPLE_BYTES, SAMPLINGS, MSDeformAttn  # noqa: E402

STRIDES = (8, 16, 32, 64)
MIB = 2 ** 20


def level_shapes(size: int):
    shapes, side = [], size
    for _ in STRIDES:  # ResNet halves with ceil at every stride-2 stage; the extra level is a stride-2 conv
        side = math.ceil(side / 8) if not shapes else math.ceil(side / 2)
        shapes.append((side, side))
    return shapes


def make_inputs(kind: str, size: int, batch: int, device: str, queries: int, d_model: int):
    shapes = level_shapes(size)
    S = sum(h * w for h, w in shapes)
    lq = S if kind == "encoder" else queries
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(batch, S, d_model, generator=gen).to(device)
    query = torch.randn(batch, lq, d_model, generator=gen).to(device).requires_grad_()
    refs = torch.rand(batch, lq, len(shapes), 2 if kind == "encoder" else 4, generator=gen).to(device)
    mask = torch.zeros(batch, S, dtype=torch.bool, device=device)
    return shapes, values.requires_grad_(), query, refs, mask


def saved_bytes_of(fn) -> int:
    """Bytes autograd saves for backward while ``fn`` runs (each storage counted once)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def step(module, inputs, device):
    shapes, values, query, refs, mask = inputs
    out, saved = saved_bytes_of(lambda: module(query, refs, values, shapes, mask))
    out.square().mean().backward()
    return saved


def run_case(kind: str, size: int, args) -> dict:
    inputs = make_inputs(kind, size, args.batch, args.device, args.queries, args.d_model)
    torch.manual_seed(0)
    module = MSDeformAttn(args.d_model, 4, 8, 4).to(args.device)
    # name: (max_sample_bytes, sampling); None = the default for the device
    variants = {"unchunked": (None, None), "chunked": (int(args.budget_mib * MIB), None)}
    if args.device == "cpu":  # both samplings, whichever the default is at this width
        variants.update(rows=(None, "rows"), grid_sample=(None, "grid_sample"))
    times = {name: [] for name in variants}
    saved, peak = {}, {}
    for i in range(args.warmup + args.repeats):
        for name, (budget, sampling) in variants.items():
            module.max_sample_bytes, module.sampling = budget, sampling
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            holder = {}
            elapsed = timed(lambda: holder.update(saved=step(module, inputs, args.device)), args.device)
            saved[name] = holder["saved"]
            if args.device == "cuda":
                peak[name] = torch.cuda.max_memory_allocated() - before
            if i >= args.warmup:
                times[name].append(elapsed)
            module.zero_grad(set_to_none=True)
            for t in inputs[1:3]:
                t.grad = None
    shapes = inputs[0]
    row = {"kind": kind, "size": size, "tokens": sum(h * w for h, w in shapes),
           "queries": inputs[2].shape[1], "shapes": shapes}
    for name in variants:
        row[f"{name}_s"] = median(times[name])
        row[f"{name}_saved_mib"] = saved[name] / MIB
        if peak:
            row[f"{name}_peak_mib"] = peak[name] / MIB
    row["time_ratio"] = median([c / u for c, u in zip(times["chunked"], times["unchunked"])])
    if "grid_sample" in times:  # paired by repeat
        row["rows_vs_grid_sample"] = median([r / g for r, g in zip(times["rows"], times["grid_sample"])])
    return row


def deformable_models():
    return sorted(name for name in MODELS if "deformable" in name)


def run_whole_steps(model_name: str, size: int, precision: str, args) -> dict:
    """One model's training step with each sampling forced, paired step by step."""
    images, masks, targets = make_batch(args.batch, size, 7, args.device)
    torch.manual_seed(0)
    model, criterion = build_ours(model_name, args.device)
    model.train()
    optimizer = make_optimizer(model)
    attention = [m for m in model.modules() if isinstance(m, MSDeformAttn)]

    def step_with(sampling):
        def step():
            for module in attention:
                module.sampling = sampling
            our_step(model, criterion, optimizer, images, masks, targets, precision)
        return step

    times = round_robin({s: step_with(s) for s in SAMPLINGS}, args.warmup, args.repeats, args.device)
    row = {"model": model_name, "size": size, "batch": args.batch, "precision": precision,
           "attention_modules": len(attention)}
    row.update({f"{s}_s": median(times[s]) for s in SAMPLINGS})
    row.update({f"{s}_all_s": times[s] for s in SAMPLINGS})
    row["rows_vs_grid_sample"] = median([r / g for r, g in zip(times["rows"], times["grid_sample"])])
    return row


def print_steps(rows) -> None:
    print(f"{'model':<22}{'size':>6}{'precision':>10}{'rows':>9}{'grid_sample':>13}{'rows/grid':>11}")
    for r in rows:
        print(f"{r['model']:<22}{r['size']:>6}{r['precision']:>10}{r['rows_s']:>8.3f}s{r['grid_sample_s']:>12.3f}s"
              f"{r['rows_vs_grid_sample']:>11.3f}")


def whole_steps(parser, args, sizes) -> None:
    """--whole-steps: every model x size x precision, printed and saved under "whole_steps"."""
    if args.device != "cpu":
        parser.error("--whole-steps compares the CPU's two samplings: use --device cpu")
    try:
        models = parse_names(args.models, deformable_models())
        precisions = parse_names(args.precision, list(PRECISIONS), "--precision")
    except ValueError as err:
        parser.error(str(err))
    rows = [run_whole_steps(m, s, p, args) for m in models for s in sizes for p in precisions]
    print_steps(rows)
    save_results(args, "whole_steps", rows)


def print_table(rows) -> None:
    peak = "peak_mib" in " ".join(rows[0])
    grid = "rows_vs_grid_sample" in rows[0]
    header = (f"{'kind':>8}{'size':>6}{'S':>8}{'Lq':>8}{'time':>10}{'chunked':>10}{'ratio':>7}{'saved MiB':>11}"
              f"{'chunked':>9}")
    print(header + (f"{'peak MiB':>10}{'chunked':>9}" if peak else "")
          + (f"{'rows':>9}{'saved MiB':>11}{'grid_sample':>13}{'saved MiB':>11}{'rows/grid':>11}" if grid else ""))
    for r in rows:
        line = (f"{r['kind']:>8}{r['size']:>6}{r['tokens']:>8}{r['queries']:>8}{r['unchunked_s']:>10.4f}"
                f"{r['chunked_s']:>10.4f}{r['time_ratio']:>7.2f}{r['unchunked_saved_mib']:>11.1f}"
                f"{r['chunked_saved_mib']:>9.1f}")
        if peak:
            line += f"{r['unchunked_peak_mib']:>10.1f}{r['chunked_peak_mib']:>9.1f}"
        if grid:
            line += (f"{r['rows_s']:>9.4f}{r['rows_saved_mib']:>11.1f}{r['grid_sample_s']:>13.4f}"
                     f"{r['grid_sample_saved_mib']:>11.1f}{r['rows_vs_grid_sample']:>11.2f}")
        print(line)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--kinds", default="encoder,decoder")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--queries", type=int, default=300, help="decoder queries")
    parser.add_argument("--d-model", type=int, default=256, help="model width (8 heads: head_dim = d_model / 8)")
    parser.add_argument("--budget-mib", type=float, default=DEFAULT_MAX_SAMPLE_BYTES / MIB,
                        help="max_sample_bytes of the chunked variant, in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--whole-steps", action="store_true",
                        help="time whole training steps of --models at --precision instead of the module")
    parser.add_argument("--models", default="deformable", help=f"with --whole-steps: from {deformable_models()}")
    parser.add_argument("--precision", default="fp32,bf16", help="with --whole-steps: fp32, bf16 (autocast)")
    args = parser.parse_args(argv)
    check_run_args(parser, args)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        kinds = [k for k in args.kinds.split(",") if k]
    except ValueError:
        parser.error(f"--sizes={args.sizes!r} is invalid: use comma-separated integers")
    if any(s < 64 for s in sizes):
        parser.error("--sizes must be >= 64")
    if args.whole_steps:
        whole_steps(parser, args, sizes)
        return
    if not set(kinds) <= {"encoder", "decoder"} or not kinds:
        parser.error("--kinds must be a subset of encoder,decoder")
    if args.budget_mib <= 0:
        parser.error("--budget-mib must be > 0")
    if args.d_model < 8 or args.d_model % 8:
        parser.error(f"--d-model={args.d_model}: use a positive multiple of 8 (8 heads)")
    rows = [run_case(kind, size, args) for size in sizes for kind in kinds]
    print_table(rows)
    save_results(args, "rows", rows)


if __name__ == "__main__":
    main()
