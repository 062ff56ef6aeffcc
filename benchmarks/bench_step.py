"""Training-step and inference time of our DETR / Conditional DETR / DAB-DETR against transformers' models.

For each model family both implementations are built with the same bench config (benchmarks/common.py) and timed
in the same process, alternating ours and the peer repeat by repeat so that load from other processes hits both.
A training step is forward + loss (under bf16 autocast with ``--precision bf16``) + backward + clip + fused AdamW
step; inference is one eval-mode forward under no_grad (no post-processing). Each variant (precision x dropout
setting x backbone layout) is measured in this one process:

- dropout "default": each library's defaults; "matched": the peer gets our (the official) dropout everywhere, so
  both sides do the same computation (``step_ratio`` in the JSON is ours/peer there, at the first precision).
- layout "nchw" (the default) or "nhwc": both backbones in that memory layout; "shipped": each as its library
  ships it, ours NHWC (``Backbone`` runs channels_last by default) and transformers' NCHW. Same values and FLOPs.
- roofline: the step's FLOPs (torch.utils.flop_counter) over the best measured matmul rate at that precision.
- ``--profile N``: after the timing, N steps of each side under torch.profiler; each op's self time per step on
  both sides, and the share of our profiled step spent in ops both run, each up to the peer's time in it; and
  each side's matmuls (mm, addmm, bmm) in time, FLOPs and FLOP/s, in all and per operand shape.

    python benchmarks/bench_step.py --models detr,conditional,dab --precision fp32,bf16 --json out.json

Outputs are not compared: transformers' DETR and Conditional DETR decoders normalise their running hidden state
when auxiliary_loss=True (the official models do not), so only speed is comparable.
"""
from __future__ import annotations

import itertools
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (LAYOUTS, PRECISIONS, Stopwatch, as_input, autocast, build_ours, build_peer,  # noqa: E402
                               check_run_args, count_flops, make_batch, make_optimizer, matmul_ceiling, median,
                               our_step, parse_names, patched, peer_step, profile_ops, registered_models, save_results,
                               set_layouts, shared_share, step_bench_parser, timed, watching_our_matcher)

DROPOUTS = ("default", "matched")
SIDE_NAMES = {"ours": "ours", "peer": "HF"}


def peer_matchers():
    """transformers' matcher classes whose ``forward`` runs the assignment (DETR's; Conditional/DAB's subclass)."""
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher
    from transformers.loss.loss_for_object_detection import HungarianMatcher as DetrHungarianMatcher
    return DetrHungarianMatcher, DeformableDetrHungarianMatcher


@contextmanager
def watching_matchers(watches: dict):
    """Time our matcher's and transformers' matchers' calls into ``watches["ours"]`` and ``watches["peer"]``."""
    detr_matcher, deformable_matcher = peer_matchers()
    with watching_our_matcher(watches["ours"]), \
            patched(detr_matcher, "forward", watches["peer"]), patched(deformable_matcher, "forward", watches["peer"]):
        yield


def alternate(runs: dict, args, watches: dict = None) -> dict:
    """Warm-ups, then ``repeats`` rounds of one call of each run, back to back: {who: [seconds]} (and the time in
    the watched functions per call, under "<who>_watched")."""
    times = {who: [] for who in runs}
    for who in runs:
        times[f"{who}_watched"] = []
    for i in range(args.warmup + args.repeats):
        for who, run in runs.items():
            elapsed = timed(run, args.device)
            watched = watches[who].take() if watches else 0.0
            if i >= args.warmup:
                times[who].append(elapsed)
                times[f"{who}_watched"].append(watched)
    return times


def summarise(prefix: str, times: dict, batch: int) -> dict:
    """Medians (and minima) per side, and images per second at the median; the ratio is the median of the paired
    ours/peer ratios, which resists load drift because the two ran back to back."""
    out = {}
    for who in ("ours", "peer"):
        out[f"{prefix}_{who}_s"] = median(times[who])
        out[f"{prefix}_{who}_images_per_s"] = batch / out[f"{prefix}_{who}_s"]
        out[f"{prefix}_{who}_min_s"] = min(times[who])
        out[f"{prefix}_{who}_all_s"] = times[who]
    out[f"{prefix}_ratio"] = median([o / p for o, p in zip(times["ours"], times["peer"])])
    out[f"{prefix}_ratio_min"] = out[f"{prefix}_ours_min_s"] / out[f"{prefix}_peer_min_s"]
    return out


def step_row(row: dict, times: dict, result: dict, ceilings: dict, batch: int) -> dict:
    row.update(summarise("step", times, batch))
    for who in ("ours", "peer"):
        row[f"matching_share_{who}"] = median([m / s for m, s in zip(times[f"{who}_watched"], times[who])])
        # The step at the matmul ceiling, and how close the measured step comes to it.
        row[f"roofline_{who}_s"] = result[f"flops_{who}"] / ceilings[row["precision"]]
        row[f"roofline_share_{who}"] = row[f"roofline_{who}_s"] / row[f"step_{who}_s"]
    return row


def bench_model(name: str, args, ceilings: dict) -> dict:
    torch.manual_seed(0)
    images, masks, targets = make_batch(args.batch, args.size, args.objects, args.device)
    ours, criterion = build_ours(name, args.device)
    peers = {dropout: build_peer(name, args.device, match_dropout=(dropout == "matched")) for dropout in args.dropout}
    ours.train()
    for peer in peers.values():
        peer.train()
    any_peer = next(iter(peers.values()))
    result = {"model": name, "params_ours": sum(p.numel() for p in ours.parameters()),
              "params_peer": sum(p.numel() for p in any_peer.parameters()),
              "trainable_ours": sum(p.numel() for p in ours.parameters() if p.requires_grad),
              "trainable_peer": sum(p.numel() for p in any_peer.parameters() if p.requires_grad),
              "variants": [], "inference": []}
    # FLOPs do not depend on precision, layout or dropout; counted once per side on a throwaway optimizer.
    result["flops_ours"] = count_flops(lambda: our_step(ours, criterion, make_optimizer(ours), images, masks, targets))
    result["flops_peer"] = count_flops(lambda: peer_step(any_peer, make_optimizer(any_peer), images, masks, targets))

    watches = {"ours": Stopwatch(args.device), "peer": Stopwatch(args.device)}
    with watching_matchers(watches):
        for layout, precision in itertools.product(args.layout, args.precision):
            ours_nhwc, peer_nhwc = LAYOUTS[layout]
            ours_in, peer_in = as_input(images, ours_nhwc), as_input(images, peer_nhwc)
            for dropout, peer in peers.items():
                set_layouts(ours, peer, layout)
                our_opt, peer_opt = make_optimizer(ours), make_optimizer(peer)  # state in the current layout
                runs = {"ours": lambda: our_step(ours, criterion, our_opt, ours_in, masks, targets, precision),
                        "peer": lambda: peer_step(peer, peer_opt, peer_in, masks, targets, precision)}
                row = {"precision": precision, "dropout": dropout, "layout": layout}
                result["variants"].append(step_row(row, alternate(runs, args, watches), result, ceilings, args.batch))
                if args.profile:
                    profiles = {who: profile_ops(run, args.profile, args.device) for who, run in runs.items()}
                    row["profile_s"] = {who: ops for who, (ops, _) in profiles.items()}
                    row["profile_matmuls"] = {who: matmuls for who, (_, matmuls) in profiles.items()}
                    row["profile_shared_share"] = shared_share(row["profile_s"]["ours"], row["profile_s"]["peer"])
            set_layouts(ours, any_peer, layout)
            infer = infer_times(ours, any_peer, (ours_in, peer_in), masks, precision, args)
            result["inference"].append({"precision": precision, "layout": layout,
                                        **summarise("infer", infer, args.batch)})
            ours.train(), any_peer.train()
    equal = [r for r in result["variants"] if r["dropout"] == "matched"] or result["variants"]
    result["step_ratio"] = equal[0]["step_ratio"]  # ours/peer at equal settings (dropout matched)
    return result


def infer_times(ours, peer, images: tuple, masks, precision: str, args) -> dict:
    """``images``: (ours' input, the peer's input), each in its side's layout."""
    forwards = {"ours": lambda: ours(images[0], masks),
                "peer": lambda: peer(pixel_values=images[1], pixel_mask=(~masks).long())}
    ours.eval(), peer.eval()
    with torch.no_grad(), autocast(precision, args.device):
        return alternate(forwards, args)


def print_tables(results, ceilings: dict) -> None:
    """Medians in seconds; ratio = median over repeats of ours/peer (ratio of the minima)."""
    print(f"{'model':<12}{'prec':<6}{'dropout':<9}{'layout':<8}{'step ours':>9}{'step HF':>9}{'ratio':>13}"
          f"{'roof ours':>10}{'roof HF':>9}{'match% ours':>12}{'HF':>7}{'img/s ours':>11}{'HF':>7}")
    for r in results:
        for v in r["variants"]:
            print(f"{r['model']:<12}{v['precision']:<6}{v['dropout']:<9}{v['layout']:<8}"
                  f"{v['step_ours_s']:>9.3f}{v['step_peer_s']:>9.3f}{v['step_ratio']:>7.2f} ({v['step_ratio_min']:.2f})"
                  f"{100 * v['roofline_share_ours']:>9.0f}%{100 * v['roofline_share_peer']:>8.0f}%"
                  f"{100 * v['matching_share_ours']:>11.2f}%{100 * v['matching_share_peer']:>6.2f}%"
                  f"{v['step_ours_images_per_s']:>11.1f}{v['step_peer_images_per_s']:>7.1f}")
    print(f"\n{'model':<12}{'prec':<6}{'layout':<8}{'infer ours':>11}{'infer HF':>10}{'ratio':>13}"
          f"{'img/s ours':>11}{'HF':>7}")
    for r in results:
        for v in r["inference"]:
            print(f"{r['model']:<12}{v['precision']:<6}{v['layout']:<8}"
                  f"{v['infer_ours_s']:>11.3f}{v['infer_peer_s']:>10.3f}"
                  f"{v['infer_ratio']:>7.2f} ({v['infer_ratio_min']:.2f})"
                  f"{v['infer_ours_images_per_s']:>11.1f}{v['infer_peer_images_per_s']:>7.1f}")
    print("\nroof = the step's FLOPs at the measured matmul ceiling / the measured step (100% = compute-bound)")
    for r in results:
        for v in r["variants"]:
            if "profile_s" in v:
                print_profile(f"{r['model']} {v['precision']} dropout {v['dropout']} layout {v['layout']}", v,
                              ceilings[v["precision"]])


def print_profile(title: str, row: dict, ceiling: float, top: int = 15) -> None:
    ours, peer = row["profile_s"]["ours"], row["profile_s"]["peer"]
    print(f"\nprofiled, {title}: ours {1000 * sum(ours.values()):.0f} ms, HF {1000 * sum(peer.values()):.0f} ms "
          f"per step; {100 * row['profile_shared_share']:.0f}% of ours in ops both run (up to HF's time in each)")
    for op in sorted(set(ours) | set(peer), key=lambda o: -max(ours.get(o, 0), peer.get(o, 0)))[:top]:
        print(f"  {op[:60]:<62}{1000 * ours.get(op, 0):>9.1f}{1000 * peer.get(op, 0):>9.1f} ms")
    matmuls = row["profile_matmuls"]
    rates = [f"{SIDE_NAMES[who]} {1000 * m['s']:.0f} ms at {m['flop_per_s'] / 1e9:.0f} GFLOP/s"
             for who, m in matmuls.items()]
    print(f"  matmuls (mm, addmm, bmm): {', '.join(rates)}; ours' five costliest shapes (the ceiling: "
          f"{ceiling / 1e9:.0f} GFLOP/s):")
    for shape in matmuls["ours"]["by_shape"][:5]:
        print(f"    {shape['op'][6:]:<6}{str(shape['shapes'])[:60]:<62}{1000 * shape['s']:>9.1f} ms "
              f"x{shape['calls']:<4.0f}{shape['flop_per_s'] / 1e9:>6.0f} GFLOP/s")


def main(argv=None) -> None:
    parser = step_bench_parser(__doc__, repeats=3)
    parser.add_argument("--models", default=",".join(registered_models(with_peer=True)),
                        help="comma-separated registered models that have a transformers peer")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--dropout", default="default,matched",
                        help="comma-separated: default (each library's), matched (the peer gets ours everywhere)")
    parser.add_argument("--layout", default="nchw",
                        help="comma-separated backbone layouts: nchw, nhwc (both sides), "
                             "shipped (ours NHWC, peer NCHW)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N steps of each side per variant (torch.profiler, self time per op)")
    args = parser.parse_args(argv)
    try:
        names = parse_names(args.models, registered_models(with_peer=True))
        args.precision = parse_names(args.precision, tuple(PRECISIONS), "--precision")
        args.dropout = parse_names(args.dropout, DROPOUTS, "--dropout")
        args.layout = parse_names(args.layout, tuple(LAYOUTS), "--layout")
    except ValueError as err:
        parser.error(str(err))
    check_run_args(parser, args)
    if args.profile < 0:
        parser.error("--profile must be >= 0 (steps to profile per side)")

    ceilings = {precision: matmul_ceiling(precision, args.device) for precision in args.precision}
    print("matmul ceiling: " + ", ".join(f"{p} {c / 1e9:.0f} GFLOP/s" for p, c in ceilings.items()))
    results = []
    for name in names:
        results.append(bench_model(name, args, ceilings))
        print_tables(results[-1:], ceilings)
        print()
    print_tables(results, ceilings)
    save_results(args, "results", {"matmul_ceiling_flops": ceilings, "models": results})


if __name__ == "__main__":
    main()
