"""Cost of query denoising in a DAB-DETR training step.

Two measures, in one run:

- bookkeeping share: the time inside the DN plug-in's ``build`` (noise, label embedding, positional queries,
  attention mask) and ``loss``, and the shared forward pass's ``assemble`` and ``split_outputs`` (query blocks in
  and out of the decoder), measured by wrapping them, over the whole step time.
  This is their forward time only; the backward of the few index/embedding ops they add is inside loss.backward().
- total step time at each number of DN groups against the same model without DN. The difference minus the
  bookkeeping is what the extra decoder queries (groups x the batch's largest object count) cost.
- the step's FLOPs at each group count against the same model without DN (torch's FLOP counter, one step before
  the timing): the share of the overhead that is extra computation, the floor of any implementation of DN.

All configurations share one batch (COCO-like: 7 objects per image on average) and are timed round-robin, one
step each per repeat, so that outside load hits them equally.

    python benchmarks/bench_dn.py --groups 1,5,10 --repeats 3 --json dn.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (Stopwatch, build_ours, check_run_args, count_flops, make_batch,  # noqa: E402
                               make_optimizer, median, one_model_parser, our_step, patched, run_and_report, timed,
                               watching_our_matcher)
from dndetr.plugins import base as plugin_base  # noqa: E402
from dndetr.plugins.dn import Denoising  # noqa: E402


def run(args) -> dict:
    images, masks, targets = make_batch(args.batch, args.size, args.objects, args.device)
    configs, flops = {}, {}
    for groups in [0] + args.groups:
        torch.manual_seed(0)  # the same initial weights for every configuration
        model, criterion = build_ours(args.model, args.device, dn_groups=groups)
        model.train()
        configs[groups] = (model, criterion, make_optimizer(model))
        flops[groups] = count_flops(lambda: our_step(*configs[groups], images, masks, targets, args.precision))

    dn_watch, match_watch = Stopwatch(args.device), Stopwatch(args.device)
    step = {g: [] for g in configs}
    bookkeeping = {g: [] for g in configs}
    matching = {g: [] for g in configs}
    with patched(Denoising, "build", dn_watch), patched(Denoising, "loss", dn_watch), \
            patched(plugin_base, "assemble", dn_watch), patched(plugin_base, "split_outputs", dn_watch), \
            watching_our_matcher(match_watch):
        for i in range(args.warmup + args.repeats):
            for groups, (model, criterion, optimizer) in configs.items():
                torch.manual_seed(i)  # the same DN noise for every configuration with the same group count
                elapsed = timed(lambda: our_step(model, criterion, optimizer, images, masks, targets, args.precision),
                                args.device)
                dn_time, match_time = dn_watch.take(), match_watch.take()
                if i >= args.warmup:
                    step[groups].append(elapsed)
                    bookkeeping[groups].append(dn_time)
                    matching[groups].append(match_time)

    base = median(step[0])
    rows = []
    for groups in configs:
        step_s, dn_s = median(step[groups]), median(bookkeeping[groups])
        rows.append({
            "groups": groups,
            "dn_queries": groups * max(len(t["labels"]) for t in targets),
            "step_s": step_s,
            "step_min_s": min(step[groups]),
            # All configurations ran back to back in each repeat: the median of paired ratios resists load drift.
            "step_vs_no_dn": median([s / b for s, b in zip(step[groups], step[0])]),
            "flops": flops[groups],
            "flops_vs_no_dn": flops[groups] / flops[0],
            "dn_bookkeeping_s": dn_s,
            "dn_bookkeeping_share": median([d / s for d, s in zip(bookkeeping[groups], step[groups])]),
            "extra_queries_s": step_s - base - dn_s,
            "matching_s": median(matching[groups]),
            "step_all_s": step[groups],
            "dn_bookkeeping_all_s": bookkeeping[groups],
        })
    return {"model": args.model, "rows": rows}


def print_table(result) -> None:
    print(f"{'groups':>6}{'DN queries':>12}{'step':>10}{'(min)':>9}{'vs no DN':>10}{'FLOPs vs no DN':>16}"
          f"{'DN bookkeeping':>16}{'share':>8}{'extra queries':>15}{'matching':>10}")
    for r in result["rows"]:
        print(f"{r['groups']:>6}{r['dn_queries']:>12}{r['step_s']:>9.3f}s{r['step_min_s']:>8.3f}s"
              f"{r['step_vs_no_dn']:>9.3f}x{r['flops_vs_no_dn']:>15.3f}x"
              f"{1000 * r['dn_bookkeeping_s']:>13.1f}ms{100 * r['dn_bookkeeping_share']:>7.2f}%"
              f"{r['extra_queries_s']:>14.3f}s{1000 * r['matching_s']:>8.1f}ms")


def main(argv=None) -> None:
    parser = one_model_parser(__doc__, repeats=3)
    parser.add_argument("--groups", default="1,5,10", help="comma-separated DN group counts (compared with 0)")
    args = parser.parse_args(argv)
    try:
        args.groups = sorted({int(g) for g in args.groups.split(",") if g.strip()})
    except ValueError:
        parser.error(f"--groups={args.groups!r}: use comma-separated integers >= 1")
    if not args.groups or min(args.groups) < 1:
        parser.error(f"--groups={args.groups!r}: use comma-separated integers >= 1")
    check_run_args(parser, args)
    run_and_report(args, run, print_table, "result")


if __name__ == "__main__":
    main()
