"""Jobs on a real SLURM cluster: the local test cluster of scripts/slurm_cluster.sh (`.ci/run` starts it).

Every test here is skipped, with the reason, when SLURM is not installed or the cluster is not up. Jobs run as
separate processes on the node: whatever they need from this module is pickled by value (see below), and each
test gets a fresh submitit folder, because job ids restart at 1 when the cluster's state is wiped and a stale
`<id>_result.pkl` would be returned at once.
"""
from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple, TypeVar

import cloudpickle
import numpy as np
import pytest
import submitit
import torch
import yaml

from helpers import read_metrics, run_train, tiny, without_timing
from test_distributed import SAME_MATH, assert_same_losses

pytestmark = pytest.mark.slurm

# The jobs cannot import this test module: ship its functions and classes inside the pickles.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
# Past 10 minutes, or submitit takes a preemption signal for a timeout.
TIMEOUT_MIN = 15


def wait_for(predicate: Callable[[], T], timeout: float, what: str = "the condition", interval: float = 0.5) -> T:
    """Poll ``predicate`` until it returns something truthy, which is returned; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(interval)


def run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout


def cluster_down_reason() -> str:
    """Why the SLURM tests cannot run, or '' when the cluster takes jobs."""
    start = "start it with scripts/slurm_cluster.sh start"
    if shutil.which("sinfo") is None:
        return f"SLURM is not installed (no sinfo on PATH); {start}"
    try:
        run("scontrol", "ping")  # fails at once when slurmctld is down; sinfo would retry for 10 s
        states = run("sinfo", "--noheader", "--format=%t").split()
    except (subprocess.SubprocessError, OSError):
        return f"the SLURM controller does not answer; {start}"
    if not any(state.rstrip("*") in ("idle", "mix", "alloc", "comp") for state in states):
        return f"no SLURM node takes jobs (node states: {states}); {start}"
    return ""


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    reason = cluster_down_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def submitit_folder(slurm_cluster, tmp_path: Path) -> Path:
    """A fresh folder for this test's submitit files (logs, pickles, results)."""
    folder = tmp_path / "submitit"
    folder.mkdir()
    return folder


def slurm_executor(folder: Path, partition: str = "debug", **parameters) -> submitit.AutoExecutor:
    """An executor for small CPU jobs on the test cluster; ``parameters`` go to ``update_parameters``."""
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(slurm_partition=partition, timeout_min=TIMEOUT_MIN, cpus_per_task=1, mem_gb=1)
    executor.update_parameters(**parameters)
    return executor


def job_states(job_id: str) -> List[str]:
    """Every accounting record of the job, oldest first (a requeued job has one per run)."""
    out = run("sacct", "--jobs", job_id, "--duplicates", "--allocations", "--noheader", "--parsable2",
              "--format=State")
    return [line.split()[0] for line in out.splitlines() if line]


def requeued_and_completed(job_id: str) -> List[str]:
    """The job's accounting records once there are at least two runs and the last one completed, else []."""
    states = job_states(job_id)
    return states if len(states) >= 2 and states[-1] == "COMPLETED" else []


def test_job_returns_its_value(submitit_folder: Path) -> None:
    job = slurm_executor(submitit_folder).submit(pow, 2, 10)
    assert job.result() == 1024
    assert wait_for(lambda: job_states(job.job_id) == ["COMPLETED"], 30, "sacct to record the job")


class RunsUntilPreempted:
    """The first run waits to be preempted; the requeued run returns how many runs there were."""

    def __init__(self, marks: Path) -> None:
        self.marks = marks

    def __call__(self) -> int:
        runs = len(list(self.marks.glob("run_*"))) + 1
        (self.marks / f"run_{runs}").touch()
        if runs == 1:
            time.sleep(TIMEOUT_MIN * 60)
        return runs

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        (self.marks / "checkpointed").touch()
        return submitit.helpers.DelayedSubmission(self)


def test_preempted_job_is_requeued(submitit_folder: Path, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    # The whole node, so the `high` job can only start by preempting this one.
    low = slurm_executor(submitit_folder, slurm_exclusive=True).submit(RunsUntilPreempted(marks))
    wait_for(lambda: (marks / "run_1").exists(), 60, "the debug job to start")

    high = slurm_executor(submitit_folder, partition="high").submit(str.upper, "high")
    assert high.result() == "HIGH"
    assert low.result() == 2, "the preempted job should have run again after its requeue"
    assert (marks / "checkpointed").exists(), "submitit did not call checkpoint() on preemption"

    states = wait_for(lambda: requeued_and_completed(low.job_id), 30, "sacct to record both runs")
    assert states[0] in ("PREEMPTED", "REQUEUED"), states


class CountsUntilPreempted:
    """Counts iterations under dndetr's preemption hook, which saves the count; the requeued run returns the
    count it resumed from."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def __call__(self) -> int:
        from dndetr.distributed import install_preemption_hook

        state = self.workdir / "count.txt"
        count = int(state.read_text()) if state.exists() else 0
        (self.workdir / f"started_from_{count}").touch()
        if count:
            return count
        hook = install_preemption_hook(lambda: state.write_text(str(count)))
        while True:
            with hook.deferred():
                count += 1
                time.sleep(0.01)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self)


def test_preemption_hook_saves_before_the_requeue(submitit_folder: Path, tmp_path: Path) -> None:
    low = slurm_executor(submitit_folder, slurm_exclusive=True).submit(CountsUntilPreempted(tmp_path))
    wait_for(lambda: (tmp_path / "started_from_0").exists(), 60, "the debug job to start")
    time.sleep(1)  # let it count

    slurm_executor(submitit_folder, partition="high").submit(int).result()
    resumed_from = low.result()
    assert resumed_from > 0, "the rerun found no saved count"
    assert resumed_from == int((tmp_path / "count.txt").read_text())


def ranks_and_sum() -> tuple:
    from dndetr import distributed

    rank, world_size, _ = distributed.init_distributed()
    total = distributed.all_reduce_sum(torch.tensor([rank + 1.0])).item()
    distributed.shutdown_distributed()
    return rank, world_size, total


def test_two_task_job_forms_a_process_group(submitit_folder: Path) -> None:
    job = slurm_executor(submitit_folder, tasks_per_node=2, mem_gb=2).submit(ranks_and_sum)
    assert sorted(job.results()) == [(0, 2, 3.0), (1, 2, 3.0)]


HYDRA_APP = '''
import hydra
from hydra.core.hydra_config import HydraConfig
from pathlib import Path
import os

@hydra.main(version_base=None, config_path=None)
def main(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "job.txt").write_text(f"{cfg.x} {os.environ['SLURM_JOB_ID']} {os.environ['SLURM_JOB_PARTITION']}")

main()
'''


def test_hydra_sweep_with_the_slurm_local_preset(slurm_cluster, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(HYDRA_APP)
    sweep_dir = tmp_path / "multirun"
    sweep = subprocess.run([sys.executable, str(app), "--multirun", "+x=1,2,3", "hydra/launcher=slurm_local",
                            f"hydra.searchpath=[file://{REPO_ROOT / 'conf'}]", f"hydra.sweep.dir={sweep_dir}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    jobs = [(sweep_dir / str(num) / "job.txt").read_text().split() for num in range(3)]
    assert [x for x, _, _ in jobs] == ["1", "2", "3"]
    assert len({job_id for _, job_id, _ in jobs}) == 3 and {p for _, _, p in jobs} == {"debug"}


# -- train.py's own sweeps on the cluster ----------------------------------------------------------------------
@contextlib.contextmanager
def sweep_running(sweep_dir: Path, overrides: List[str]) -> Iterator[subprocess.Popen]:
    """`python train.py -m hydra/launcher=slurm_local ...`, which submits the jobs and waits for all of them. If
    the test leaves before the sweep has finished, the sweep and its jobs are cancelled."""
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--multirun", "hydra/launcher=slurm_local",
               f"hydra.sweep.dir={sweep_dir}", f"hydra.launcher.submitit_folder={sweep_dir}/.submitit/%j", *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")  # the jobs inherit this environment
    sweep = subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    try:
        yield sweep
    finally:
        if sweep.poll() is None:
            sweep.kill()
            for job_folder in (sweep_dir / ".submitit").glob("*"):
                subprocess.run(["scancel", job_folder.name], timeout=60)


def finish_sweep(sweep: subprocess.Popen, timeout: float = 600) -> None:
    out = sweep.communicate(timeout=timeout)[0]
    assert sweep.returncode == 0, out[-3000:]


def slurm_job_id(run_dir: Path) -> str:
    """The SLURM job id that Hydra's submitit launcher recorded in the run's config: ``<array id>_<index>``, or
    the bare id for a sweep of one job."""
    return str(yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])


def matching_epochs(run_dir: Path) -> List[str]:
    return sorted(p.name for p in (run_dir / "matchings").iterdir())


def test_train_sweep_on_the_cluster_feeds_the_analysis(slurm_cluster, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    epochs = 2
    with sweep_running(sweep_dir, tiny(tmp_path, "model=dab", f"trainer.epochs={epochs}", "dn.groups=1,5",
                                       "dn.box_noise=0.2,0.4")) as sweep:
        finish_sweep(sweep)

    runs = [sweep_dir / str(num) for num in range(4)]
    job_ids = [slurm_job_id(run) for run in runs]
    assert len(set(job_ids)) == 4
    for run, job_id in zip(runs, job_ids):
        assert (run / ".hydra" / "config.yaml").is_file() and not (run / "error.txt").exists()
        assert [row["epoch"] for row in read_metrics(run)] == list(range(epochs))
        assert matching_epochs(run) == [f"epoch_000{e}.npz" for e in range(epochs)]
        assert wait_for(lambda: job_states(job_id) == ["COMPLETED"], 30, f"sacct to record job {job_id}")

    report = tmp_path / "report"
    analysis = subprocess.run([sys.executable, str(REPO_ROOT / "analysis" / "instability.py"), str(sweep_dir),
                               "--out", str(report)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert analysis.returncode == 0, analysis.stdout[-2000:] + analysis.stderr[-2000:]
    with open(report / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    settings = {(row["dn.groups"], row["dn.box_noise"]) for row in summary}
    assert settings == {("1", "0.2"), ("1", "0.4"), ("5", "0.2"), ("5", "0.4")}
    assert (report / "failures.md").read_text().strip().endswith("None.")


def read_checkpoint_position(checkpoint: Path) -> Tuple[int, int]:
    """Runs as the preempting job: the checkpoint the preempted job left, as (epoch, iteration)."""
    from dndetr.trainer import load_checkpoint

    state = load_checkpoint(checkpoint)
    return state["epoch"], state["iteration"]


RESUME_LINE = re.compile(r"resuming at epoch (\d+) iteration (\d+)")


def test_preempted_training_resumes_to_the_uninterrupted_metrics(submitit_folder: Path, tmp_path: Path) -> None:
    # 48 images in batches of 4: iterations take most of an epoch, so the signal most likely lands inside one.
    epochs, iterations = 8, 12
    # Dropout and denoising draw random numbers: the resumed run matches only if the RNG state was saved too.
    # Periodic checkpoints only at epoch ends, so a checkpoint inside an epoch can only come from the preemption hook.
    overrides = tiny(tmp_path, f"trainer.epochs={epochs}", "data.synthetic.num_train=48", "model.dropout=0.1",
                     "dn.groups=2", "trainer.checkpoint_every_iters=0")
    sweep_dir = tmp_path / "multirun"
    run = sweep_dir / "0"
    with sweep_running(sweep_dir, overrides) as sweep:
        wait_for(lambda: (run / "checkpoint_last.pt").exists() or sweep.poll() is not None, 300,
                 "the training job to finish its first epoch")
        assert sweep.poll() is None, "the sweep ended before the training job was preempted"
        # The whole node, so that it can only start by preempting the training job; it runs before the requeued
        # job can start again, so it sees the checkpoint exactly as the preempted job left it.
        high = slurm_executor(submitit_folder, partition="high", slurm_exclusive=True)
        position = high.submit(read_checkpoint_position, run / "checkpoint_last.pt").result()
        reference = tmp_path / "reference"
        run_train(reference, overrides, env={"OMP_NUM_THREADS": "1"})  # while the training job waits to restart
        finish_sweep(sweep)

    job_id = slurm_job_id(run)
    states = wait_for(lambda: requeued_and_completed(job_id), 30, "sacct to record both runs of the training job")
    assert states[0] in ("PREEMPTED", "REQUEUED"), states

    epoch, iteration = position
    assert 1 <= epoch < epochs and 0 <= iteration <= iterations, position
    assert RESUME_LINE.findall((run / "train.log").read_text()) == [(str(epoch), str(iteration))], \
        "the requeued run should resume once, from the checkpoint taken at preemption"
    if iteration == 0:  # preempted while the epoch's end was being saved, or just before the next epoch began
        print(f"preempted at the start of epoch {epoch}: the hook's mid-epoch save was not observed")

    rows = read_metrics(run)
    assert [row["epoch"] for row in rows] == list(range(epochs)), "duplicate or missing epochs in metrics.jsonl"
    assert without_timing(rows) == without_timing(read_metrics(reference))
    wall_times = [row["wall_time"] for row in rows]
    assert wall_times == sorted(wall_times), "wall_time should carry on across the restart"
    assert matching_epochs(run) == matching_epochs(reference) == [f"epoch_{e:04d}.npz" for e in range(epochs)]
    for name in matching_epochs(run):
        assert (np.load(run / "matchings" / name)["assign"] == np.load(reference / "matchings" / name)["assign"]).all()


def test_two_task_training_job_matches_one_process(slurm_cluster, tmp_path: Path) -> None:
    """`hydra.launcher.tasks_per_node=2`: both tasks run the Hydra task, find their ranks through submitit and
    train as one DDP job; per-rank batch 2 on 2 ranks gives what batch 4 gives in one process."""
    overrides = tiny(tmp_path, *SAME_MATH)
    sweep_dir = tmp_path / "multirun"
    single = tmp_path / "single"
    with sweep_running(sweep_dir, overrides + ["data.batch_size=2", "hydra.launcher.tasks_per_node=2"]) as sweep:
        run_train(single, overrides + ["data.batch_size=4"], env={"OMP_NUM_THREADS": "1"})
        finish_sweep(sweep)
    run = sweep_dir / "0"
    assert_same_losses(read_metrics(single), read_metrics(run))
    job_id = slurm_job_id(run)
    assert wait_for(lambda: job_states(job_id) == ["COMPLETED"], 30, f"sacct to record job {job_id}")
    logs = list((sweep_dir / ".submitit").glob("*/*_log.err"))
    assert len(logs) == 2, "expected one log per task"  # <job>_0_log.err and <job>_1_log.err
