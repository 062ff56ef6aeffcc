"""What a run writes, written so that a crash or a full disk never leaves a damaged file behind.

Every file goes to a temporary name in the same folder, is flushed to disk and then renamed over the old one: a
crash at any moment leaves the old file intact, and a failed write removes its temporary file. ``metrics.jsonl`` is
the one file that grows by appending; its reader stops at a line cut by a kill mid-write.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, List

import torch


class RunFileError(OSError):
    """A run file could not be written (folder not writable, disk full): reported as one line."""


def first_line(err: BaseException) -> str:
    """An exception's first message line, never empty (some exceptions carry no message)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def atomic_write(path: Path, write: Callable, before_rename: Callable[[], None] = lambda: None) -> Path:
    """Call ``write(binary file)`` on a temporary file next to ``path``, fsync, then rename it to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise RunFileError(f"cannot write {path}: {describe_os_error(err)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        before_rename()
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) or is_file_too_large(err):
            raise RunFileError(f"cannot write {path}: {describe_os_error(err)}; the previous version is intact") \
                from None
        raise
    return path


def is_file_too_large(err: BaseException) -> bool:
    """torch.save reports a failed write (full disk, ``ulimit -f``) as a RuntimeError from its zip writer."""
    markers = ("file write failed", "PytorchStreamWriter", "inline_container")
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in markers)


def describe_os_error(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "the disk is full (or a file-size limit was reached)"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (the folder is not writable)"
    if is_file_too_large(err):
        return "the write failed (disk full or file-size limit)"
    return first_line(err)


def atomic_torch_save(obj, path: Path, before_rename: Callable[[], None] = lambda: None) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f), before_rename)


def read_jsonl(path: Path) -> List[dict]:
    """The complete JSON lines of a file ([] if absent); stops at a line cut by a kill mid-write."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class MetricsLog:
    """``metrics.jsonl``: one line per finished epoch. On resume, lines of epochs that will be redone are dropped."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> List[dict]:
        return read_jsonl(self.path)

    def keep_before(self, epoch: int) -> None:
        rows = [r for r in self.read() if r["epoch"] < epoch]
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))

    def append(self, row: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise RunFileError(f"cannot append to {self.path}: {describe_os_error(err)}") from None
