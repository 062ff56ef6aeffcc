"""Runs a checkout's ``train.py`` and records how long each training epoch waited for its batches, measured the same
way for every commit, including those that do not record ``data_time`` themselves (used by bench_default_job.py).

    python benchmarks/loader_wait.py WAITS.json CHECKOUT/train.py [overrides...]

A training loader is one over ``SeededSamples`` (the training set's wrapper in every commit since the engine was
written; evaluation and matching probes read other datasets). The seconds spent in each of its ``next`` calls are
summed per pass, i.e. per epoch, and written to WAITS.json as a list when the job ends.
"""
from __future__ import annotations

import atexit
import json
import runpy
import sys
import time
from pathlib import Path

from torch.utils.data import DataLoader

TRAINING_SET_WRAPPER = "SeededSamples"


def timed_passes(waits: list):
    """Wraps ``DataLoader.__iter__`` so that passes over a training loader append their wait to ``waits``."""
    untimed_iter = DataLoader.__iter__

    def timed(batches):
        waits.append(0.0)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            waits[-1] += time.perf_counter() - started
            if batch is None:
                return
            yield batch

    def loader_iter(loader):
        batches = untimed_iter(loader)
        return timed(batches) if type(loader.dataset).__name__ == TRAINING_SET_WRAPPER else batches

    DataLoader.__iter__ = loader_iter


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(f"usage: {Path(__file__).name} WAITS.json CHECKOUT/train.py [overrides...]")
    waits_path, train_script = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    waits: list = []
    timed_passes(waits)
    atexit.register(lambda: waits_path.write_text(json.dumps(waits)))
    sys.argv = [str(train_script), *sys.argv[3:]]
    sys.path[0] = str(train_script.parent)  # the checkout's own dndetr, as `python train.py` there would import
    runpy.run_path(str(train_script), run_name="__main__")


if __name__ == "__main__":
    main()
