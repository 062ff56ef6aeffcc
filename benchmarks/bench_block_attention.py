"""The query blocks' self-attention part by part against the dense masked form, in whole training steps.

The training-time query blocks (DN groups, Group DETR's extra groups, H-DETR's one-to-many queries) only see some
of the decoder's queries. The shipped decoder computes each part of its self-attention over only the keys it sees
(`attention_by_parts`); the dense form is one attention over all queries with the [T, T] mask of the same parts
(`blocked_by_parts`), which is what the code did before. Each plug-in setting is one model (bench config of
docs/benchmarks.md, DAB-DETR unless `--model`) stepped in both forms, alternating one step each per repeat with the
same DN noise, so that outside load hits both alike: the result is the median of the paired ratios. Every setting
is also compared with the same model without blocks, and the FLOPs of one step of each are counted.

    python benchmarks/bench_block_attention.py --precision bf16 --repeats 5 --json blocks_bf16.json
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (NUM_CLASSES, check_run_args, compose_config, count_flops, make_batch,  # noqa: E402
                               make_optimizer, median, one_model_parser, our_step, parse_names, run_and_report, timed)
from dndetr.criterion import build_criterion  # noqa: E402
from dndetr.models import build_model  # noqa: E402
from dndetr.plugins import base as plugin_base  # noqa: E402

SETTINGS = {  # name: the Hydra overrides that turn the blocks on (the published values)
    "none": [],
    "dn 10 groups": ["dn.groups=10"],
    "group detr 11 groups": ["group=group_detr"],
    "hybrid 1500 one-to-many": ["hybrid=h_detr"],
}


@contextlib.contextmanager
def dense_masks():
    """The forward pass gets the dense mask of the parts: one masked attention over all queries."""
    original = plugin_base.assemble

    def assemble(blocks, content, position):
        content, position, parts, matching = original(blocks, content, position)
        mask = None if parts is None else plugin_base.blocked_by_parts(parts, content.shape[1], content.device)
        return content, position, mask, matching

    plugin_base.assemble = assemble
    try:
        yield
    finally:
        plugin_base.assemble = original


def build(model_name: str, overrides, device: str):
    cfg = compose_config([f"model={model_name}", "model.backbone.name=resnet18", "model.aux_loss=true",
                          "dn.groups=0"] + overrides)
    torch.manual_seed(0)  # the same initial weights for every setting
    model = build_model(cfg, NUM_CLASSES).to(device).train()
    return model, build_criterion(cfg, NUM_CLASSES).to(device), make_optimizer(model)


def run(args) -> dict:
    images, masks, targets = make_batch(args.batch, args.size, args.objects, args.device)
    forms = {"parts": contextlib.nullcontext, "dense": dense_masks}
    arms = {}
    for setting in args.settings:
        model, criterion, optimizer = build(args.model, SETTINGS[setting], args.device)
        for form in forms if setting != "none" else ["parts"]:
            arms[setting, form] = (model, criterion, optimizer, forms[form])

    def step(arm):
        model, criterion, optimizer, form = arms[arm]
        with form():
            our_step(model, criterion, optimizer, images, masks, targets, args.precision)

    queries = {}
    flops = {arm: count_flops(lambda: step(arm)) for arm in arms}
    for setting in args.settings:
        model = arms[setting, "parts"][0]
        content, position = model.queries(args.batch)
        blocks = [b for p in model.plugins.values() if (b := p.build(targets, content, model)) is not None]
        queries[setting] = content.shape[1] + sum(b.size for b in blocks)

    times = {arm: [] for arm in arms}
    for i in range(args.warmup + args.repeats):
        for arm in arms:
            torch.manual_seed(i)  # the same DN noise in both forms
            elapsed = timed(lambda: step(arm), args.device)
            if i >= args.warmup:
                times[arm].append(elapsed)

    alone = times["none", "parts"] if "none" in args.settings else None
    rows = []
    for (setting, form), steps in times.items():
        rows.append({
            "setting": setting, "form": form, "queries": queries[setting],
            "step_s": median(steps), "step_all_s": steps, "flops": flops[setting, form],
            "step_vs_none": median([s / a for s, a in zip(steps, alone)]) if alone else None,
            "flops_vs_none": flops[setting, form] / flops["none", "parts"] if alone else None,
            "parts_vs_dense": (median([p / d for p, d in zip(times[setting, "parts"], times[setting, "dense"])])
                               if form == "parts" and setting != "none" else None),
        })
    return {"model": args.model, "precision": args.precision, "rows": rows}


def print_table(result) -> None:
    print(f"{'setting':<26}{'form':<7}{'queries':>8}{'step':>9}{'vs none':>9}{'FLOPs vs none':>15}"
          f"{'parts/dense':>13}")
    for r in result["rows"]:
        versus = "" if r["step_vs_none"] is None else f"{r['step_vs_none']:.3f}x"
        flops = "" if r["flops_vs_none"] is None else f"{r['flops_vs_none']:.3f}x"
        paired = "" if r["parts_vs_dense"] is None else f"{r['parts_vs_dense']:.3f}"
        print(f"{r['setting']:<26}{r['form']:<7}{r['queries']:>8}{r['step_s']:>8.3f}s{versus:>9}{flops:>15}"
              f"{paired:>13}")


def main(argv=None) -> None:
    parser = one_model_parser(__doc__, repeats=5)
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, from: {', '.join(SETTINGS)}")
    args = parser.parse_args(argv)
    try:
        args.settings = parse_names(args.settings, list(SETTINGS), "--settings")
    except ValueError as err:
        parser.error(str(err))
    check_run_args(parser, args)
    run_and_report(args, run, print_table, "block_attention")


if __name__ == "__main__":
    main()
