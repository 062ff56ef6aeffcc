"""Training-step and inference time of our DETR / Conditional DETR / DAB-DETR against transformers' models.

For each model family both implementations are built with the same bench config (benchmarks/common.py) and timed
in the same process, alternating ours and the peer repeat by repeat so that load from other processes hits both.
A training step is forward + loss + backward + clip + AdamW step; inference is one eval-mode forward under no_grad
(no post-processing). The time spent in Hungarian matching is measured inside the step by wrapping the matchers.

    python benchmarks/bench_step.py --models detr,conditional,dab --repeats 5 --size 384 --device cpu --json out.json

Outputs are not compared: transformers' DETR and Conditional DETR decoders normalise their running hidden state
when auxiliary_loss=True (the official models do not), so only speed is comparable.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (Stopwatch, build_ours, build_peer, check_run_args, make_batch,  # noqa: E402
                               make_optimizer, median, our_step, parse_names, patched, peer_step, save_results,
                               timed)
from dndetr.matcher import HungarianMatcher  # noqa: E402


def peer_matchers():
    """transformers' matcher classes whose ``forward`` runs the assignment (DETR's; Conditional/DAB's subclass)."""
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher
    from transformers.loss.loss_for_object_detection import HungarianMatcher as DetrHungarianMatcher
    return DetrHungarianMatcher, DeformableDetrHungarianMatcher


def bench_model(name: str, args) -> dict:
    torch.manual_seed(0)
    images, masks, targets = make_batch(args.batch, args.size, args.objects, args.device)
    ours, criterion = build_ours(name, args.device)
    peer = build_peer(name, args.device, args.match_dropout)
    our_opt, peer_opt = make_optimizer(ours), make_optimizer(peer)
    runs = {
        "ours": lambda: our_step(ours, criterion, our_opt, images, masks, targets),
        "peer": lambda: peer_step(peer, peer_opt, images, masks, targets),
    }
    step = {"ours": [], "peer": []}
    matching = {"ours": [], "peer": []}
    ours_watch, peer_watch = Stopwatch(args.device), Stopwatch(args.device)
    detr_matcher, deformable_matcher = peer_matchers()
    watches = {"ours": ours_watch, "peer": peer_watch}
    ours.train(), peer.train()
    with patched(HungarianMatcher, "__call__", ours_watch), patched(detr_matcher, "forward", peer_watch), \
            patched(deformable_matcher, "forward", peer_watch):
        for i in range(args.warmup + args.repeats):
            for who, run in runs.items():
                elapsed, matched = timed(run, args.device), watches[who].take()
                if i >= args.warmup:
                    step[who].append(elapsed)
                    matching[who].append(matched)

    infer = {"ours": [], "peer": []}
    forwards = {
        "ours": lambda: ours(images, masks),
        "peer": lambda: peer(pixel_values=images, pixel_mask=(~masks).long()),
    }
    ours.eval(), peer.eval()
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            for who, forward in forwards.items():
                elapsed = timed(forward, args.device)
                if i >= args.warmup:
                    infer[who].append(elapsed)

    result = {"model": name}
    for kind, times in (("step", step), ("infer", infer)):
        for who in ("ours", "peer"):
            result[f"{kind}_{who}_s"] = median(times[who])
            result[f"{kind}_{who}_min_s"] = min(times[who])
            result[f"{kind}_{who}_all_s"] = times[who]
        # Ours and the peer ran back to back in each repeat: the median of the paired ratios resists load drift.
        result[f"{kind}_ratio"] = median([o / p for o, p in zip(times["ours"], times["peer"])])
        result[f"{kind}_ratio_min"] = result[f"{kind}_ours_min_s"] / result[f"{kind}_peer_min_s"]
    for who in ("ours", "peer"):
        result[f"matching_{who}_s"] = median(matching[who])
        result[f"matching_share_{who}"] = median([m / s for m, s in zip(matching[who], step[who])])
    result["params_ours"] = sum(p.numel() for p in ours.parameters())
    result["params_peer"] = sum(p.numel() for p in peer.parameters())
    result["trainable_ours"] = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    result["trainable_peer"] = sum(p.numel() for p in peer.parameters() if p.requires_grad)
    return result


def print_table(results) -> None:
    """Medians (min) in seconds; ratio = median over repeats of ours/peer (ratio of the minima)."""
    print(f"{'model':<12}{'step ours':>16}{'step HF':>16}{'ratio':>12}{'infer ours':>16}{'infer HF':>16}"
          f"{'ratio':>12}{'match% ours':>12}{'match% HF':>10}")
    for r in results:
        cells = [f"{r['model']:<12}"]
        for kind in ("step", "infer"):
            for who in ("ours", "peer"):
                cells.append(f"{r[f'{kind}_{who}_s']:>8.3f} ({r[f'{kind}_{who}_min_s']:.3f})")
            cells.append(f"{r[f'{kind}_ratio']:>6.2f} ({r[f'{kind}_ratio_min']:.2f})")
        cells.append(f"{100 * r['matching_share_ours']:>11.2f}%{100 * r['matching_share_peer']:>9.2f}%")
        print("".join(cells))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="detr,conditional,dab")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--objects", type=int, default=7, help="mean boxes per image (COCO: about 7)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--match-dropout", action="store_true",
                        help="give the peers our dropout everywhere (attention, FFN activation, residual)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    try:
        names = parse_names(args.models)
    except ValueError as err:
        parser.error(str(err))
    check_run_args(parser, args)

    results = []
    for name in names:
        results.append(bench_model(name, args))
        print_table(results[-1:])
    print()
    print_table(results)
    save_results(args, "results", results)


if __name__ == "__main__":
    main()
