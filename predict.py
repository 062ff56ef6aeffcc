"""Draw a trained model's detections on images and write them as COCO results:

    python predict.py model.init_from=<checkpoint> +images=<file, folder or [a.jpg,b.jpg]> [+score_threshold=0.5]
        [model=... experiment=... other overrides, composed exactly as for train.py]

Writes into the Hydra run folder (``hydra.run.dir=...``, default ``outputs/<date>/<time>``): one PNG per image with
the detections at or above the threshold drawn, ``detections.json`` (all detections, COCO results format) and
``images.json``. The checkpoint is one of ours (checkpoint_best.pt, checkpoint_last.pt) or an official one.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from dndetr.config import ConfigError, validate
from dndetr.predict import predict
from dndetr.device import pick_device
from train import EXPECTED_ERRORS, error_line, run_hydra_app

log = logging.getLogger("dndetr")
OPTIONS = {"images": None, "score_threshold": 0.5}  # predict.py's own keys, added with +key=value


def pop_options(cfg: DictConfig) -> dict:
    """Take predict.py's own keys out of the composed config (the rest is checked like train.py's)."""
    options = dict(OPTIONS)
    with open_dict(cfg):
        for key in OPTIONS:
            if key in cfg:
                value = cfg.pop(key)
                options[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    try:
        options["score_threshold"] = float(options["score_threshold"])
    except (TypeError, ValueError):
        raise ConfigError(f"+score_threshold={options['score_threshold']!r} is invalid: must be a number in [0, 1]") \
            from None
    return options


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        options = pop_options(cfg)
        config = validate(cfg)
        written = predict(config, options["images"], options["score_threshold"], out,
                          pick_device(config.trainer.device))
    except EXPECTED_ERRORS as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)
    print(f"done: {len(written) - 2} image(s) in {out}\n  detections: {out / 'detections.json'}")


if __name__ == "__main__":
    run_hydra_app(main)
