"""Optional experiment loggers (``logger=tensorboard``): a live view of a run next to metrics.jsonl.

metrics.jsonl stays the source of truth (the analysis reads only it); a logger receives copies of the same numbers.
TensorBoard is imported only when ``logger=tensorboard`` is chosen, so no other run needs the package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from .config import ConfigError, LoggerConfig


class NoLogger:
    """``logger=none``: every call does nothing."""

    def scalars(self, prefix: str, values: Dict[str, object], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NoLogger):
    """One scalar per number, tagged ``<prefix>/<name>``; a dict of numbers (``AP_per_class``) becomes
    ``<prefix>/<name>/<key>``. Values that are not numbers (precision, None) are skipped."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("logger=tensorboard is invalid: the tensorboard package is not installed "
                              "(pip install -e '.[tensorboard]')") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, prefix: str, values: Dict[str, object], step: int) -> None:
        for tag, value in flat_numbers(prefix, values).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def flat_numbers(prefix: str, values: Dict[str, object]) -> Dict[str, float]:
    """{"<prefix>/<key>": number}, one level of nested dicts flattened, non-numbers (and booleans) left out."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_numbers(f"{prefix}/{key}", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = float(value)
    return flat


def build_logger(cfg: LoggerConfig, run_dir: Path, enabled: bool = True):
    """The configured logger; ``enabled=False`` (ranks other than 0) gives the one that does nothing."""
    if not enabled or cfg.name == "none":
        return NoLogger()
    log_dir: Optional[str] = cfg.dir
    return TensorBoardLogger(Path(log_dir) if log_dir else Path(run_dir) / "tensorboard")
