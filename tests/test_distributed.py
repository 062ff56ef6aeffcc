"""dndetr.distributed without a cluster: single-process no-ops, a 2-process gloo group, the preemption hook, and
2-rank DDP training that matches 1 process with the same global batch."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dndetr import distributed
from helpers import read_metrics, run_train, tiny, without_timing

REPO_ROOT = Path(__file__).resolve().parents[1]
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR")


def child_env(**variables: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **variables)
    return env


def test_single_process_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_distributed() == (0, 1, 0)
    assert not distributed.is_distributed()
    assert distributed.is_main_process() and distributed.get_world_size() == 1
    distributed.barrier()
    x = torch.tensor([1, 2])
    assert torch.equal(distributed.all_reduce_sum(x), x)
    assert torch.equal(distributed.all_reduce_mean(x), torch.tensor([1.0, 2.0]))


def test_master_port_is_stable_and_in_range() -> None:
    assert distributed.master_port_for_job("123") == distributed.master_port_for_job("123") == 20123
    assert distributed.master_port_for_job("45678") == 25678
    assert all(20000 <= distributed.master_port_for_job(str(j)) < 40000 for j in (0, 19999, 20000, 987654321))


RANK_SCRIPT = """
from dndetr import distributed
import torch
rank, world, local = distributed.init_distributed()
total = distributed.all_reduce_sum(torch.tensor([rank + 1.0]))
mean = distributed.all_reduce_mean(torch.tensor([rank + 1.0]))
distributed.barrier()
print(rank, world, local, distributed.is_main_process(), total.item(), mean.item())
distributed.shutdown_distributed()
"""


def rank_env(style: str, rank: int) -> dict:
    if style == "torchrun":
        return child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT="29533")
    # what srun gives each task of a 2-task submitit job; the master address and port are derived from it
    return child_env(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="9534", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
                     SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_PROCID=str(rank),
                     SLURM_LOCALID=str(rank))


@pytest.mark.slow
@pytest.mark.parametrize("style", ["torchrun", "submitit"])
def test_two_processes_form_a_gloo_group(style: str) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env=rank_env(style, rank), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
    lines = sorted(out.split() for out, _ in outputs)
    assert lines == [["0", "2", "0", "True", "3.0", "1.5"], ["1", "2", "1", "False", "3.0", "1.5"]]


HOOK_SCRIPT = """
import signal, sys, time
from pathlib import Path
from dndetr.distributed import install_preemption_hook

events, mode = Path(sys.argv[1]), sys.argv[2]
def note(event):
    with events.open("a") as f:
        f.write(event + "\\n")

if mode != "no-previous-handler":
    def previous(signum, frame):  # stands in for submitit's: checkpoint, requeue, exit
        note("previous handler")
        sys.exit(3)
    signal.signal(signal.SIGUSR2, previous)
hook = install_preemption_hook(lambda: note("saved"))
if mode == "deferred":
    with hook.deferred():
        note("ready")
        while not hook.requested:
            time.sleep(0.01)
        note("iteration finished")
note("ready")
time.sleep(60)
note("never signalled")
"""


def signal_hooked_child(tmp_path: Path, mode: str) -> tuple:
    events = tmp_path / "events.txt"
    proc = subprocess.Popen([sys.executable, "-c", HOOK_SCRIPT, str(events), mode], env=child_env(), text=True,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (events.exists() and "ready" in events.read_text()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the child never got ready"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, events.read_text().split("\n")[:-1], err


def test_preemption_hook_saves_then_calls_the_previous_handler(tmp_path: Path) -> None:
    returncode, events, err = signal_hooked_child(tmp_path, "immediate")
    assert events == ["ready", "saved", "previous handler"], err
    assert returncode == 3


def test_preemption_hook_waits_for_the_deferred_block(tmp_path: Path) -> None:
    returncode, events, err = signal_hooked_child(tmp_path, "deferred")
    assert events == ["ready", "iteration finished", "saved", "previous handler"], err
    assert returncode == 3


def test_preemption_hook_without_submitit_dies_of_the_signal(tmp_path: Path) -> None:
    returncode, events, err = signal_hooked_child(tmp_path, "no-previous-handler")
    assert events == ["ready", "saved"], err
    assert returncode == -signal.SIGUSR2


def test_preempt_signal_follows_submitit_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert distributed.preempt_signal() == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert distributed.preempt_signal() == signal.SIGUSR1
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "NOPE")
    with pytest.raises(ValueError, match="SUBMITIT_PREEMPT_SIGNAL='NOPE'"):
        distributed.preempt_signal()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Settings under which 2 ranks x batch 2 compute exactly what 1 process x batch 4 computes: focal-loss DAB-DETR
# (every term a sum over the batch divided by the all-reduced box count), no dropout, no denoising (its loss is
# normalised per rank), fixed-size images, and frozen BatchNorm (trainable BN normalises each rank's own batch).
SAME_MATH = ["model=dab", "model.dropout=0", "dn.groups=0", "data.crop=false", "data.hflip=false",
             "model.backbone.frozen_bn=true"]


@pytest.mark.slow
def test_two_rank_ddp_training_matches_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    overrides = tiny(tmp_path, *SAME_MATH)
    single = tmp_path / "single"
    run_train(single, overrides + ["data.batch_size=4"], env={"OMP_NUM_THREADS": "1"})

    port = str(free_port())
    ranks = [tmp_path / f"rank{rank}" for rank in range(2)]  # Hydra writes .hydra/ in every process's run folder
    procs = [subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), f"hydra.run.dir={run_dir}", *overrides,
                               "data.batch_size=2"], cwd=REPO_ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env=child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank, run_dir in enumerate(ranks)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]

    assert {p.name for p in ranks[1].iterdir()} == {".hydra", "train.log"}, "only rank 0 may write run files"
    assert "epoch" not in (ranks[1] / "train.log").read_text()
    assert sorted(p.name for p in (ranks[0] / "matchings").iterdir()) == [f"epoch_000{e}.npz" for e in range(3)]
    assert_same_losses(read_metrics(single), read_metrics(ranks[0]))


def assert_same_losses(one_process: list, two_ranks: list) -> None:
    """The per-epoch losses of the tiny 3-epoch run agree to float tolerance (summation order differs)."""
    one, two = without_timing(one_process), without_timing(two_ranks)
    assert [row["epoch"] for row in two] == [row["epoch"] for row in one] == [0, 1, 2]
    for row_one, row_two in zip(one, two):
        assert row_two.keys() == row_one.keys()
        losses = [key for key in row_one if "loss" in key]
        assert len(losses) == 7  # train_loss, 3 terms of the last layer, 3 of the other decoder layer
        assert {k: row_two[k] for k in losses} == pytest.approx({k: row_one[k] for k in losses}, rel=1e-4)
        assert row_two["lr"] == row_one["lr"]
