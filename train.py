"""Train (or evaluate) a DETR-family detector: ``python train.py [overrides]``; ``-m`` for sweeps."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from dndetr.config import ConfigError, register_configs, validate
from dndetr.data import DataError
from dndetr.files import RunFileError, describe_os_error
from dndetr.trainer import CheckpointError, EvaluationError, NonFiniteLossError, evaluate_only, train

log = logging.getLogger("dndetr")
register_configs()

# A user's mistake or a numerical blow-up gets one line, not a traceback.
EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError, EvaluationError, RunFileError)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    with contextlib.suppress(OSError):
        (run_dir / "error.txt").unlink(missing_ok=True)  # a resumed run that now works is no longer a failed one
    try:
        config = validate(cfg)
        if config.trainer.eval_only:
            result = evaluate_only(config, run_dir)
            print(" ".join(f"{k}={v:.4f}" if v is not None else f"{k}=n/a" for k, v in result.items()))
            return result.get("AP")
        rows = train(config, run_dir)
    except EXPECTED_ERRORS as err:
        message = f"error: {error_line(err)}"
        with contextlib.suppress(OSError):  # an unwritable run folder is the error itself
            (run_dir / "error.txt").write_text(message + "\n")
        if multirun:  # let the other jobs of the sweep run; the analysis reports this one as failed
            log.error(message)
            return None
        print(message, file=sys.stderr)  # the one line on the terminal; error.txt keeps it with the run
        sys.exit(2)
    final = rows[-1] if rows else {}
    print(f"done: {run_dir}\n  metrics:    {run_dir / 'metrics.jsonl'}\n  checkpoint: {run_dir / 'checkpoint_last.pt'}"
          f"\n  config:     {run_dir / '.hydra' / 'config.yaml'}\n  final AP={final.get('AP')} AP50={final.get('AP50')}")
    return final.get("AP")


def error_line(err: Exception) -> str:
    """The error's one-line message. A DataLoader worker re-raises a dataset error with the worker's traceback in
    its message, whose last line is the original ``module.Class: message``."""
    last = str(err).strip().splitlines()[-1]
    return last.removeprefix(f"{type(err).__module__}.{type(err).__qualname__}: ")


def override_for(key: str) -> str:
    """The command-line override that set ``key`` (e.g. ``dn.label_noise=abc``), else the key itself."""
    for arg in sys.argv[1:]:
        name, _, _ = arg.partition("=")
        if name.lstrip("+~") == key:
            return arg
    return key


def composition_error_line(err: CompactHydraException) -> str:
    """Hydra's composition error in the format of dndetr.config.ConfigError: ``key=value is invalid: why``."""
    cause = err.__cause__
    if isinstance(err, MissingConfigException) and err.options is not None:  # model=unknown
        group, _, name = (err.missing_cfg_file or "").rpartition("/")
        options = [option for option in err.options if not option.endswith("_schema")]
        return f"{group}={name} is invalid: must be one of {', '.join(options)}"
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:  # wrong type or unknown key
        return f"{override_for(cause.full_key)} is invalid: {str(cause.msg).splitlines()[0]}"
    if isinstance(err, OverrideParseException):  # override syntax
        return f"{err.override} is invalid: {err.message.splitlines()[0]}"
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


if __name__ == "__main__":
    # Hydra reports its own composition errors (unknown group option or key, a value of the wrong type) over
    # several lines and exits 1. Its documented switch HYDRA_FULL_ERROR=1 makes it raise them instead, so they get
    # one line and exit 2 like every other configuration mistake. Whoever sets HYDRA_FULL_ERROR=1 gets the full trace.
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
    else:
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            main()
        except CompactHydraException as err:
            print(f"error: {composition_error_line(err)}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:  # Hydra could not create or write the run folder
            where = f" {err.filename}" if err.filename else ""
            print(f"error: cannot write the run folder{where}: {describe_os_error(err)}", file=sys.stderr)
            sys.exit(2)
