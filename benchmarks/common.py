"""What the step and DN benchmarks share: the bench config, a synthetic batch, our models and their Hugging Face
peers built with random weights (nothing is downloaded), one training step, FLOP counting and timing helpers.

Bench config: each registered model as published (``conf/model/<name>.yaml`` with its loss and matcher groups,
composed by Hydra without the CPU experiment), with a ResNet-18 (random init, stem and layer1 frozen, frozen BN),
aux loss on and 91 classes: 6+6 layers, d=256, FFN 2048, 8 heads, each model's queries, dropout, losses and costs.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from dndetr.config import Config, register_configs, validate
from dndetr.criterion import build_criterion
from dndetr.models import MODELS, build_model
from dndetr.optim import AdamW

NUM_CLASSES = 91  # COCO: max category id + 1
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
COUNT_OFFSETS = (-2, 2, -1, 1, 0)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# The registered models' counterparts in transformers (config class, model class); a model without one is
# benchmarked alone (bench_dn) but not against a peer (bench_step).
PEERS = {
    "detr": ("DetrConfig", "DetrForObjectDetection"),
    "conditional": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection"),
    "dab": ("DabDetrConfig", "DabDetrForObjectDetection"),
    "deformable": ("DeformableDetrConfig", "DeformableDetrForObjectDetection"),
}


def parse_names(text: str, allowed, option: str = "--models") -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{option}={text!r} is invalid: use a comma-separated subset of {','.join(allowed)}")
    return names


def registered_models(with_peer: bool = False) -> List[str]:
    return sorted(name for name in MODELS if name in PEERS or not with_peer)


def compose_config(overrides: List[str], default_job: bool = False) -> Config:
    """The published configuration (or, with ``default_job``, the default CPU job's) with these Hydra overrides."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose("config", overrides=([] if default_job else ["~experiment"]) + overrides))


def bench_config(name: str, dn_groups: int = 0) -> Config:
    return compose_config([f"model={name}", "model.backbone.name=resnet18", "model.aux_loss=true",
                           f"dn.groups={dn_groups}"])


def build_ours(name: str, device: str, dn_groups: int = 0):
    """(model, criterion) in training mode."""
    cfg = bench_config(name, dn_groups)
    return build_model(cfg, NUM_CLASSES).to(device), build_criterion(cfg, NUM_CLASSES).to(device)


def build_peer(name: str, device: str, match_dropout: bool = False):
    """transformers' model of the same family with the bench config and random weights.

    transformers' defaults have no attention or FFN-activation dropout (the official models have both, at the
    model's dropout rate) and DAB-DETR's dropout is 0.1 there (0 officially); ``match_dropout`` uses ours everywhere.
    """
    import transformers as hf

    config_class, model_class = (getattr(hf, attribute) for attribute in PEERS[name])
    ours = bench_config(name).model
    levels = getattr(ours, "num_feature_levels", 1)
    stages = ["stage4"] if levels == 1 else ["stage2", "stage3", "stage4"]  # C5, or C3-C5 (+ one extra level)
    resnet18 = hf.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                               layer_type="basic", out_features=stages)
    dropout = {"dropout": ours.dropout, "attention_dropout": ours.dropout, "activation_dropout": ours.dropout}
    options = dict(dropout if match_dropout else {})
    if levels > 1:  # Deformable DETR: the same sizes and variant as ours, torchvision-free backbone
        options.update(use_timm_backbone=False, use_pretrained_backbone=False, num_feature_levels=levels,
                       encoder_ffn_dim=ours.dim_feedforward, decoder_ffn_dim=ours.dim_feedforward,
                       encoder_n_points=ours.enc_n_points, decoder_n_points=ours.dec_n_points,
                       with_box_refine=ours.box_refine, two_stage=ours.two_stage)
    model = model_class(config_class(backbone_config=resnet18, num_labels=NUM_CLASSES, auxiliary_loss=True,
                                     num_queries=ours.num_queries, **options)).to(device)
    # Train the same backbone parameters as ours and the official code (stages 2-4); HF's DAB-DETR trains all.
    for param_name, param in model.named_parameters():
        if "backbone" in param_name:
            param.requires_grad_(any(f"stages.{i}." in param_name for i in (1, 2, 3)))
    return model


def make_batch(batch_size: int, size: int, objects: int, device: str, seed: int = 0):
    """Unpadded random images and random targets; the box counts vary around ``objects`` (5 and 9 for 7 at batch 2),
    so that denoising pads groups to the batch's largest count as it would on real data."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=gen).to(device)
    masks = torch.zeros(batch_size, size, size, dtype=torch.bool, device=device)
    targets = []
    for b in range(batch_size):
        n = max(objects + COUNT_OFFSETS[b % len(COUNT_OFFSETS)], 1)
        centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        targets.append({"boxes": torch.cat((centre, wh), dim=1).to(device),
                        "labels": torch.randint(1, NUM_CLASSES, (n,), generator=gen).to(device)})
    return images, masks, targets


def peer_labels(targets: List[dict]) -> List[dict]:
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]


def make_optimizer(model: torch.nn.Module, optimizer_class=AdamW, **options) -> torch.optim.Optimizer:
    """The engine's optimizer, for both sides: fused AdamW (one kernel for all parameters, channels_last weights
    updated in place, dndetr/optim.py) over the trainable parameters; ``optimizer_class`` swaps it for a peer's."""
    return optimizer_class([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4, **options)


def autocast(precision: str, device: str):
    """bf16: torch.autocast around forward and loss (backward and optimizer outside), for ours and the peer."""
    return torch.autocast(device, dtype=torch.bfloat16, enabled=PRECISIONS[precision] is torch.bfloat16)


# Backbone memory layouts (ours, peer): both NCHW, both NHWC, or each as its library ships it (ours NHWC,
# transformers NCHW). Only the layout of the same values changes, never the computation.
LAYOUTS = {"nchw": (False, False), "nhwc": (True, True), "shipped": (True, False)}


def set_layouts(ours, peer, layout: str) -> None:
    """NHWC or NCHW backbone weights on each side (the images follow in ``as_input``)."""
    ours_nhwc, peer_nhwc = LAYOUTS[layout]
    ours.backbone.set_channels_last(ours_nhwc)
    peer.get_submodule("model.backbone").to(memory_format=torch.channels_last if peer_nhwc
                                            else torch.contiguous_format)


def as_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def optimizer_step(model, optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()


def our_step(model, criterion, optimizer, images, masks, targets, precision: str = "fp32") -> None:
    with autocast(precision, images.device.type):
        loss = sum(criterion(model(images, masks, targets), targets).values())
    optimizer_step(model, optimizer, loss)


def peer_step(model, optimizer, images, masks, targets, precision: str = "fp32") -> None:
    with autocast(precision, images.device.type):
        loss = model(pixel_values=images, pixel_mask=(~masks).long(), labels=peer_labels(targets)).loss
    optimizer_step(model, optimizer, loss)


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of everything ``fn`` runs (matmuls, convolutions, attention; forward and backward) as counted by
    torch.utils.flop_counter, which has no formula for SDPA's fused CPU kernels: they get SDPA's usual one here."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(grad, q, k,
                                                                                                         v),
    }
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return counter.get_total_flops()


def matmul_ceiling(precision: str, device: str, size: int = 2048, repeats: int = 5) -> float:
    """The best FLOP/s of a square matmul at this precision: the compute roof of the roofline columns."""
    dtype = PRECISIONS[precision]
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best = min(timed(lambda: a @ b, device) for _ in range(repeats + 1))
    return 2 * size ** 3 / best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def round_robin(runs: Dict[str, Callable[[], None]], warmup: int, repeats: int, device: str = "cpu") -> dict:
    """``warmup`` + ``repeats`` rounds of one call of each run, back to back, so that outside load hits all of
    them: {name: [seconds of each repeat]}."""
    times = {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name, run in runs.items():
            elapsed = timed(run, device)
            if i >= warmup:
                times[name].append(elapsed)
    return times


def profile_ops(run: Callable[[], None], calls: int, device: str = "cpu") -> Tuple[Dict[str, float], dict]:
    """torch.profiler's self time of each op over ``calls`` calls of ``run``, in seconds per call (device time on
    CUDA), and :func:`matmul_rates` of the same profile. The profiler's own overhead is in these times: compare them
    between runs profiled alike."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    attribute = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(calls):
            run()
        sync(device)
    ops = {event.key: getattr(event, attribute) / 1e6 / calls for event in prof.key_averages()
           if getattr(event, attribute) > 0}
    return ops, matmul_rates(prof.key_averages(group_by_input_shape=True), attribute, calls)


# (first operand, second operand) of each profiled matmul op: addmm's first input is the bias.
MATMUL_OPERANDS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::bmm": (0, 1)}


def matmul_flops(op: str, shapes: List[List[int]]) -> int:
    """FLOPs of one call: [.., m, k] @ [.., k, n] is 2 m k n per batch entry."""
    first, second = (shapes[i] for i in MATMUL_OPERANDS[op])
    return 2 * math.prod(first) * second[-1]


def matmul_rates(events, attribute: str, calls: int) -> dict:
    """The profiled matmuls (mm, addmm, bmm) per call of the run: seconds, FLOPs and FLOP/s in all and per operand
    shape, the costliest first; shows how far below the 2048^3 ceiling a step's own matmul shapes run."""
    rows = []
    for event in events:
        seconds = getattr(event, attribute) / 1e6 / calls
        if event.key in MATMUL_OPERANDS and seconds > 0:
            flops = matmul_flops(event.key, event.input_shapes) * event.count / calls
            rows.append({"op": event.key, "shapes": event.input_shapes, "calls": event.count / calls,
                         "s": seconds, "flops": flops, "flop_per_s": flops / seconds})
    rows.sort(key=lambda row: -row["s"])
    seconds, flops = sum(row["s"] for row in rows), sum(row["flops"] for row in rows)
    return {"s": seconds, "flops": flops, "flop_per_s": flops / seconds if seconds else float("nan"),
            "by_shape": rows}


def shared_share(ours: Dict[str, float], peer: Dict[str, float]) -> float:
    """The share of our profiled time spent in ops the peer also runs, each counted up to the peer's time in it:
    the part of our step that is the same kernels at no more cost than theirs."""
    return sum(min(t, peer[op]) for op, t in ours.items() if op in peer) / sum(ours.values())


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Stopwatch:
    """Accumulates the wall time spent inside wrapped functions (a CPU-side measure; syncs on CUDA)."""

    def __init__(self, device: str):
        self.device, self.total = device, 0.0

    def wrap(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.total += time.perf_counter() - start
        return wrapper

    def take(self) -> float:
        total, self.total = self.total, 0.0
        return total


@contextmanager
def patched(owner, attribute: str, stopwatch: Stopwatch):
    """Time every call of ``owner.attribute`` (a class attribute, so every instance is covered, or a module's
    function, as the callers that look it up there see it) while active."""
    original = owner.__dict__[attribute]
    setattr(owner, attribute, stopwatch.wrap(original))
    try:
        yield stopwatch
    finally:
        setattr(owner, attribute, original)


@contextmanager
def watching_our_matcher(stopwatch: Stopwatch):
    """Our Hungarian matching, whichever entry point the criterion uses (one layer, or all layers at once)."""
    from dndetr.matcher import HungarianMatcher

    with patched(HungarianMatcher, "__call__", stopwatch), patched(HungarianMatcher, "match_layers", stopwatch):
        yield stopwatch


def environment(threads: int, device: str) -> Dict[str, object]:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "device": device,
            "threads": threads, "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def microbench_parser(doc: str) -> argparse.ArgumentParser:
    """The options every CPU microbenchmark (attention, dropout, backbone) has; check them with check_run_args."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    return parser


def step_bench_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The options of the whole-step benchmarks: the bench config's batch (``make_batch``), device and timing."""
    parser = microbench_parser(doc)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--objects", type=int, default=7, help="mean boxes per image (COCO: about 7)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.set_defaults(repeats=repeats, warmup=1)
    return parser


def one_model_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """step_bench_parser with one ``--model`` (DAB-DETR by default) and one ``--precision``."""
    parser = step_bench_parser(doc, repeats)
    parser.add_argument("--model", choices=registered_models(), default="dab")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="bf16: autocast")
    return parser


def run_and_report(args, run: Callable, print_table: Callable, key: str) -> None:
    """Run the benchmark, print its table and, with ``--json``, save the result under ``key``."""
    result = run(args)
    print_table(result)
    save_results(args, key, result)


def check_run_args(parser, args) -> None:
    """The options the benchmarks share; a bad one ends the script with argparse's one-line error."""
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)


def save_results(args, key: str, value) -> None:
    """``--json``: the results under ``key``, with the machine, the arguments and the command line."""
    if args.json:
        device = getattr(args, "device", "cpu")
        write_json(args.json, {"environment": environment(args.threads, device), "args": vars(args),
                               "command": " ".join(sys.argv), key: value})


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
