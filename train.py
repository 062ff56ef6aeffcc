"""Train (or evaluate) a DETR-family detector: ``python train.py [overrides]``; ``-m`` for sweeps."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dndetr.config import ConfigError, register_configs, validate
from dndetr.data import DataError
from dndetr.engine import CheckpointError, NonFiniteLossError, evaluate_only, train

log = logging.getLogger("dndetr")
register_configs()

# A user's mistake or a numerical blow-up gets one line, not a traceback.
EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        config = validate(cfg)
        if config.trainer.eval_only:
            result = evaluate_only(config, run_dir)
            print(" ".join(f"{k}={v:.4f}" if v is not None else f"{k}=n/a" for k, v in result.items()))
            return result.get("AP")
        rows = train(config, run_dir)
    except EXPECTED_ERRORS as err:
        message = f"error: {err}"
        (run_dir / "error.txt").write_text(message + "\n")
        log.error(message)
        if multirun:  # let the other jobs of the sweep run; the analysis reports this one as failed
            return None
        print(message, file=sys.stderr)
        sys.exit(2)
    final = rows[-1] if rows else {}
    print(f"done: {run_dir}\n  metrics:    {run_dir / 'metrics.jsonl'}\n  checkpoint: {run_dir / 'checkpoint_last.pt'}"
          f"\n  config:     {run_dir / '.hydra' / 'config.yaml'}\n  final AP={final.get('AP')} AP50={final.get('AP50')}")
    return final.get("AP")


if __name__ == "__main__":
    main()
