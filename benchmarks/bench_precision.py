"""bf16 autocast against fp32 for one training step of the study's CPU scale (experiment=cpu_study).

Both precisions train their own copy of the same initial model on the same batch, timed round-robin (one step
each per repeat), so outside load hits both alike; the result is the ratio of median step times.

    python benchmarks/bench_precision.py --model dab --threads 1 --repeats 10
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dndetr.config import register_configs, validate  # noqa: E402
from dndetr.criterion import build_criterion  # noqa: E402
from dndetr.data import build_dataset  # noqa: E402
from dndetr.models import build_model  # noqa: E402
from dndetr.optim import AdamW  # noqa: E402
from dndetr.sampling import eval_loader  # noqa: E402

NUM_CLASSES = 4


def study_config(model: str):
    from hydra import compose, initialize_config_dir
    register_configs()
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return validate(compose("config", overrides=["experiment=cpu_study", f"model={model}"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dab", choices=("detr", "conditional", "dab"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = study_config(args.model)
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES)
    criterion = build_criterion(cfg, NUM_CLASSES)
    copies = {precision: copy.deepcopy(model).train() for precision in ("fp32", "bf16")}
    optimizers = {precision: AdamW(m.parameters(), lr=cfg.optim.lr)
                  for precision, m in copies.items()}
    # the first training batch of the study's data, unaugmented
    images, masks, targets = next(iter(eval_loader(build_dataset(cfg.data, "train", train_augment=False),
                                                   cfg.data.batch_size, 0)))
    times = {precision: [] for precision in copies}
    for i in range(args.warmup + args.repeats):
        for precision, m in copies.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # as Trainer.train_step
                loss = sum(criterion(m(images, masks, targets), targets).values())
            optimizers[precision].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.optim.clip_max_norm)
            optimizers[precision].step()
            if i >= args.warmup:
                times[precision].append(time.perf_counter() - start)
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(f"{args.model}, batch {cfg.data.batch_size} at {cfg.data.val_size} px, {args.threads} thread(s), "
          f"{args.repeats} round-robin repeats: fp32 {fp32:.3f} s, bf16 {bf16:.3f} s per step, "
          f"bf16/fp32 {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
