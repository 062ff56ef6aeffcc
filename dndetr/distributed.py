"""Process-group set-up (torchrun or SLURM through submitit) and the SLURM preemption hook.

Everything here is a no-op in a single process, so the training code calls it unconditionally.

Preemption, as submitit does it: at preemption (or ``signal_delay_s`` before the time limit) SLURM sends SIGUSR2
to the job. submitit's handler, on global rank 0, calls the task's ``checkpoint()`` (hydra-submitit-launcher's
returns the same task with the same overrides), pickles it, runs ``scontrol requeue`` and exits with
``sys.exit(-1)``; other ranks just return and are killed by the requeue. The requeued task reruns in the same
output folder, so the run must resume from its own files: nothing of the live process survives.
:func:`install_preemption_hook` puts our save in front of that handler.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

# submitit sends (and listens for) SIGUSR2 unless this variable names another signal.
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"

log = logging.getLogger(__name__)


def _ranks_from_torchrun() -> Optional[Tuple[int, int, int]]:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def master_port_for_job(job_id: str) -> int:
    """A port in [20000, 40000) that every task of one job derives alike and concurrent jobs rarely share."""
    digits = re.sub(r"\D", "", job_id)
    return 20000 + int(digits or 0) % 20000


def _ranks_from_submitit() -> Optional[Tuple[int, int, int]]:
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    job_env = submitit.JobEnvironment()
    if job_env.num_tasks <= 1:
        return None
    os.environ.setdefault("MASTER_ADDR", job_env.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(master_port_for_job(job_env.raw_job_id)))
    return job_env.global_rank, job_env.num_tasks, job_env.local_rank


def init_distributed() -> Tuple[int, int, int]:
    """Join the process group described by torchrun's or submitit's environment; returns (rank, world_size,
    local_rank), (0, 1, 0) for a single process. NCCL when CUDA is available (each rank on GPU local_rank),
    else gloo."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    ranks = _ranks_from_torchrun() or _ranks_from_submitit()
    if ranks is None or ranks[1] == 1:
        return 0, 1, 0
    rank, world_size, local_rank = ranks
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    return rank, world_size, local_rank


def shutdown_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, returned as a new tensor (the input is left alone)."""
    total = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, returned as a new floating-point tensor."""
    return all_reduce_sum(tensor.float()) / get_world_size()


def preempt_signal() -> signal.Signals:
    name = os.environ.get(PREEMPT_SIGNAL_ENV, "USR2")
    try:
        return signal.Signals["SIG" + name]
    except KeyError:
        raise ValueError(f"{PREEMPT_SIGNAL_ENV}={name!r} is not a signal name (e.g. USR2)") from None


class PreemptionHook:
    """Calls ``save_fn()`` when the job is signalled, then the handler installed before (submitit's).

    The save runs as soon as the signal arrives, inside the signal handler, unless the signal lands inside a
    :meth:`deferred` block: then it runs when the block finishes. Wrap each training iteration in ``deferred()``
    so the checkpoint always holds a whole number of iterations (model, optimizer and counters agree); outside
    such blocks ``save_fn`` must save only state that is consistent at any instant (e.g. the last completed
    iteration's). ``requested`` tells the caller the job was signalled.
    """

    def __init__(self, save_fn: Callable[[], None], signum: signal.Signals) -> None:
        self.save_fn = save_fn
        self.signum = signum
        self.requested = False
        self._handled = False
        self._depth = 0
        # DataLoader workers are forked with this handler; only the process that installed it may act.
        self._pid = os.getpid()
        self._previous = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if os.getpid() != self._pid or self._handled:
            return
        self.requested = True
        if self._depth == 0:
            self._save_and_hand_over(frame)

    def _save_and_hand_over(self, frame) -> None:
        self._handled = True
        try:
            self.save_fn()
        except Exception:  # still requeue: the run then resumes from its previous checkpoint
            log.exception("saving at preemption failed")
        previous = self._previous
        if callable(previous):
            previous(self.signum, frame)  # submitit: checkpoint(), requeue, sys.exit
        elif previous == signal.SIG_DFL:  # not under submitit: die of the signal, as without the hook
            signal.signal(self.signum, signal.SIG_DFL)
            os.kill(os.getpid(), self.signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        # Not reached when the block raised: a failed iteration must not be saved.
        if self.requested and not self._handled and self._depth == 0:
            self._save_and_hand_over(None)

    def remove(self) -> None:
        """Put the previous handler back."""
        if os.getpid() == self._pid:
            signal.signal(self.signum, self._previous)


def install_preemption_hook(save_fn: Callable[[], None], signum: Optional[int] = None) -> PreemptionHook:
    """Make ``save_fn`` run before submitit checkpoints and requeues the job. Call it from the main thread
    after submitit has set its handlers (i.e. inside the task) and before DataLoader workers start."""
    return PreemptionHook(save_fn, signal.Signals(signum) if signum is not None else preempt_signal())
