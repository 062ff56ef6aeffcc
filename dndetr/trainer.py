"""The training loop: epochs, steps, the end-of-epoch evaluation and matching record, checkpoints and exact resume.

A killed-and-restarted run ends exactly where an uninterrupted run ends: the data order and augmentation depend only
on (seed, epoch, index) (sampling.py), the model's own randomness (dropout, DN noise) uses the global RNG, whose
state the checkpoint carries (rng.py), and every file is written atomically (files.py). Each epoch is committed in
two steps: once trained (the checkpoint holds the epoch's losses as ``pending``), then once evaluated and logged. A
failed evaluation or matching record therefore never throws the training away: the resumed run redoes only them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from . import distributed, instability
from .config import Config, ConfigError
from .criterion import build_criterion
from .data import build_dataset, num_classes as dataset_num_classes, queries_warning
from .device import autocast_dtype, pick_device, pick_precision
from .evaluation import evaluate, improves, per_class_line
from .files import MetricsLog, atomic_torch_save, first_line
from .loggers import build_logger
from .models import build_model
from .optim import AdamW
from .rng import rng_state, seed_everything, set_rng_state
from .sampling import SeededSamples, epoch_batches, eval_loader, make_loader, targets_to

log = logging.getLogger("dndetr")

CHECKPOINT = "checkpoint_last.pt"
BEST_CHECKPOINT = "checkpoint_best.pt"  # the model of the epoch with the highest AP so far
METRICS = "metrics.jsonl"


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/Inf; the last good checkpoint is left untouched."""


class CheckpointError(ValueError):
    """A checkpoint that is truncated, foreign or from another configuration."""


class EvaluationError(RuntimeError):
    """Evaluating or recording a trained (and saved) epoch failed; the resumed run redoes only that."""


def fault_point(name: str, epoch: int, iteration: int = 0) -> None:
    """Fault injection for the resume tests: ``DNDETR_KILL_AT=<name>:<epoch>:<iteration>`` kills the process here
    (SIGKILL, as a preempted or crashed node would), e.g. ``iteration:1:3``, ``eval:0:0``, ``record:1:0``,
    ``save:1:0`` (checkpoint written to its temporary file, not yet renamed)."""
    if os.environ.get("DNDETR_KILL_AT") == f"{name}:{epoch}:{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's own message advises turning the safe loader off; we never do, so it is not repeated.
        reason = "it holds objects other than tensors and plain containers" if "weights_only" in str(err) \
            else f"{type(err).__name__}: {first_line(err)}"
        raise CheckpointError(f"checkpoint {path} cannot be read (empty, truncated, corrupt or foreign: {reason}); "
                              "move it away to start this run afresh") from None
    missing = {"model", "optimizer", "scheduler", "epoch", "iteration", "rng"} - set(state) \
        if isinstance(state, dict) else {"model"}
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a dndetr training checkpoint (missing {sorted(missing)})")
    return state


def parameter_counts(model: torch.nn.Module) -> tuple:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.rank, self.world, _ = distributed.init_distributed()
        self.main = self.rank == 0
        self.device = pick_device(cfg.trainer.device)
        self.precision = pick_precision(cfg.trainer.precision, self.device)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        seed_everything(cfg.trainer.seed + self.rank)
        self.train_set = SeededSamples(build_dataset(cfg.data, "train", train_augment=True), cfg.trainer.seed)
        val_split = "train" if cfg.data.val_on_train else "val"
        self.val_set = build_dataset(cfg.data, val_split, train_augment=False)
        probe_split = "train" if cfg.instability.split == "train" else "val"
        self.probe_set = (self.val_set if probe_split == val_split
                          else build_dataset(cfg.data, probe_split, train_augment=False))
        self.num_classes = max(dataset_num_classes(self.train_set.dataset), dataset_num_classes(self.val_set))
        self.model = build_model(cfg, self.num_classes).to(self.device)
        if cfg.model.init_from:
            from .official import load_into
            load_into(self.model, cfg.model.init_from)
        self.criterion = build_criterion(cfg, self.num_classes).to(self.device)
        self.matcher = self.criterion.matcher
        self.optimizer = AdamW(self.model.param_groups(cfg.optim.lr, cfg.optim.lr_backbone), lr=cfg.optim.lr,
                               weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.optim.lr_drop, cfg.optim.lr_gamma)
        self.autocast_dtype = autocast_dtype(self.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.train_model = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.trainer.compile:
            self.train_model = torch.compile(self.train_model)
        self.epoch, self.iteration, self.wall_time, self.loss_sums, self.pending = 0, 0, 0.0, {}, None
        self.started = time.perf_counter()
        self.metrics = MetricsLog(self.run_dir / METRICS)
        self.checkpoint_path = self.run_dir / CHECKPOINT
        self.preemption = None
        self.logger = build_logger(cfg.logger, self.run_dir, enabled=self.main)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def deferred(self):
        """Hold a SLURM preemption signal until the block is done (a checkpoint is never half-written)."""
        return self.preemption.deferred() if self.preemption else contextlib.nullcontext()

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "iteration": self.iteration, "wall_time": self.wall_time + self.elapsed(),
                "rng": rng_state(), "loss_sums": dict(self.loss_sums), "pending": self.pending,
                "precision": self.precision, "config": asdict(self.cfg)}

    def save_now(self) -> None:
        atomic_torch_save(self.state_dict(), self.checkpoint_path,
                          lambda: fault_point("save", self.epoch, self.iteration))

    def save(self) -> None:
        if self.main:
            self.save_now()
        distributed.barrier()

    def resume(self) -> bool:
        if not (self.cfg.trainer.resume and self.checkpoint_path.exists()):
            return False
        state = load_checkpoint(self.checkpoint_path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {self.checkpoint_path} does not fit this configuration: "
                                  f"{first_line(err)}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration, self.wall_time = state["epoch"], state["iteration"], state["wall_time"]
        self.loss_sums, self.pending = dict(state["loss_sums"]), state.get("pending")
        if self.cfg.trainer.precision == "auto":  # a run that moves to another machine keeps its precision
            self.precision = state.get("precision", self.precision)
            self.autocast_dtype = autocast_dtype(self.precision)
        set_rng_state(state["rng"])
        if self.rank:  # each rank continues its own stream (seeded seed + rank)
            torch.manual_seed(self.cfg.trainer.seed + self.rank + 1_000_003 * (self.epoch * 100_003 + self.iteration))
        return True

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # -- loops -----------------------------------------------------------------------------------------------
    def fit(self) -> List[dict]:
        self.started = time.perf_counter()
        resumed = self.resume()
        self.started = time.perf_counter()
        if self.main:
            self.metrics.keep_before(self.epoch)
            self.log_start(resumed)
        # SLURM signals before preemption/timeout: save the last whole iteration, then let submitit requeue.
        self.preemption = distributed.install_preemption_hook(self.save_now) if self.main else None
        try:
            while self.epoch < self.cfg.trainer.epochs:
                if self.pending is None:
                    self.train_one_epoch()
                self.finish_epoch()
        finally:
            if self.preemption is not None:
                self.preemption.remove()
            self.logger.close()
        return self.metrics.read()

    def log_start(self, resumed: bool) -> None:
        total, trainable = parameter_counts(self.model)
        cfg = self.cfg
        log.info("model %s (%s): %s parameters, %s trainable; query plug-ins: %s", cfg.model.name,
                 type(self.model).__name__, f"{total:,}", f"{trainable:,}", ", ".join(self.model.plugins) or "none")
        log.info("data %s: %d training and %d validation images, %d classes; device %s, precision %s",
                 cfg.data.root, len(self.train_set), len(self.val_set), self.num_classes, self.device,
                 self.precision)
        for dataset in (self.train_set.dataset, self.val_set):  # recall is capped at num_queries objects per image
            warning = queries_warning(dataset, cfg.model.num_queries)
            if warning:
                log.warning(warning)
        log.info("%s at epoch %d iteration %d; run folder %s", "resuming" if resumed else "starting",
                 self.epoch, self.iteration, self.run_dir)

    def train_one_epoch(self) -> None:
        cfg, epoch = self.cfg, self.epoch
        self.train_set.epoch = epoch
        batches = epoch_batches(len(self.train_set), cfg.data.batch_size, cfg.trainer.seed, epoch, self.rank,
                                self.world)
        self.model.train()
        self.criterion.train()
        sums = self.loss_sums if self.iteration else {}
        self.loss_sums = sums
        loader = make_loader(self.train_set, batches[self.iteration:], cfg.data.num_workers)
        progress = None
        if cfg.trainer.progress and self.main:
            from tqdm import tqdm
            progress = tqdm(total=len(batches), initial=self.iteration, desc=f"epoch {epoch}", leave=False,
                            dynamic_ncols=True)
        start, done, data_time, batches_left = time.perf_counter(), 0, 0.0, iter(loader)
        while True:
            with self.deferred():  # loading forks the global RNG per sample: no checkpoint may catch it forked
                fetch_started = time.perf_counter()
                batch = next(batches_left, None)
                data_time += time.perf_counter() - fetch_started  # waiting for the loader (Detectron2's data_time)
            if batch is None:
                break
            images, masks, targets = batch
            with self.deferred():
                step_start = time.perf_counter()
                loss_values = self.train_step(images, masks, targets)
                if cfg.trainer.compile and done == 0 and self.main:
                    log.info("first step with torch.compile (compiling included): %.1f s",
                             time.perf_counter() - step_start)
                for key, value in loss_values.items():
                    sums[key] = sums.get(key, 0.0) + value
                self.iteration += 1
                done += 1
            fault_point("iteration", epoch, self.iteration)
            if progress is not None:
                progress.set_postfix(loss=f"{loss_values['loss']:.3f}")
                progress.update()
            if self.iteration % cfg.logger.every_iters == 0:
                self.logger.scalars("train", loss_values, epoch * len(batches) + self.iteration)
            every = cfg.trainer.checkpoint_every_iters
            if every and self.iteration % every == 0 and self.iteration < len(batches):
                with self.deferred():
                    self.save()
        if progress is not None:
            progress.close()
        train_time = time.perf_counter() - start
        iterations = max(self.iteration, 1)
        self.check_weights()
        self.pending = {"losses": {k: v / iterations for k, v in sums.items()},
                        "iter_time": train_time / max(done, 1), "train_time": train_time, "data_time": data_time}
        with self.deferred():
            self.save()  # the trained epoch is committed before anything can go wrong in evaluation

    def train_step(self, images, masks, targets) -> Dict[str, float]:
        images, masks = images.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True)
        targets = targets_to(targets, self.device)
        step = f"epoch {self.epoch} iteration {self.iteration}"
        with self.autocast():
            outputs = self.train_model(images, masks, targets)
            try:
                losses = self.criterion(outputs, targets)
            except FloatingPointError as err:
                raise NonFiniteLossError(f"{err} at {step}; {self.stopped()}") from None
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise NonFiniteLossError(f"loss is {loss.item()} at {step} (non-finite terms: {', '.join(bad)}); "
                                     f"{self.stopped()}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        logged = torch.stack([loss.detach()] + [v.detach() for v in losses.values()]).float()
        logged = distributed.all_reduce_mean(logged).tolist()
        return dict(zip(["loss"] + list(losses), logged))

    def stopped(self) -> str:
        if self.checkpoint_path.exists():
            return f"stopped, {self.checkpoint_path} is the last good checkpoint"
        return "stopped before the first checkpoint was written"

    def check_weights(self) -> None:
        # A finite loss can still give NaN gradients: stop here, not with a traceback from evaluation or matching.
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(f"weights {bad[0]} (and {len(bad) - 1} more) are NaN or Inf after epoch "
                                     f"{self.epoch} iteration {self.iteration - 1}; {self.stopped()}")

    def finish_epoch(self) -> dict:
        """Evaluate and record the trained epoch, log it, and commit it."""
        epoch, pending = self.epoch, self.pending
        losses = dict(pending["losses"])
        row = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], "train_loss": losses.pop("loss", None)}
        row.update(losses)
        if self.main:
            try:
                row.update(self.evaluate_and_record(epoch))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:
                trace = self.run_dir / "evaluation_error.txt"  # the whole traceback, for whoever debugs it
                with contextlib.suppress(OSError):
                    trace.write_text(traceback.format_exc())
                raise EvaluationError(f"epoch {epoch} is trained and saved in {self.checkpoint_path}, but evaluating "
                                      f"or recording it failed: {type(err).__name__}: {first_line(err)} (traceback in "
                                      f"{trace.name}); re-running redoes only the evaluation") from None
        row["iter_time"] = pending["iter_time"]
        row["train_time"] = pending["train_time"]
        row["data_time"] = pending.get("data_time")  # null: trained by a version that did not measure it
        row["epoch_time"] = row["train_time"] + row.get("eval_time", 0.0) + row.get("record_time", 0.0)
        row["wall_time"] = self.wall_time + self.elapsed()
        row["precision"] = self.precision
        if self.main:
            log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                     if k in ("train_loss", "AP", "AP50", "IS") and v is not None))
            if per_class_line(row):
                log.info("epoch %d AP per class: %s", epoch, per_class_line(row))
        with self.deferred():
            if self.main:
                self.save_best(row)  # before the row: a resumed run redoes an epoch that is not in metrics.jsonl
                self.metrics.append(row)
                self.logger.scalars("epoch", row, epoch)
            self.scheduler.step()
            self.epoch, self.iteration, self.loss_sums, self.pending = epoch + 1, 0, {}, None
            self.save()
        return row

    def save_best(self, row: dict) -> None:
        """Write checkpoint_best.pt (the model, its epoch and AP) when ``row`` beats every earlier epoch's AP."""
        if improves(self.metrics.read(), row):
            atomic_torch_save({"model": self.model.state_dict(), "epoch": row["epoch"], "AP": row["AP"],
                               "config": asdict(self.cfg)}, self.run_dir / BEST_CHECKPOINT)
            log.info("epoch %d has the best AP so far (%.4g): saved %s", row["epoch"], row["AP"], BEST_CHECKPOINT)

    def evaluate_and_record(self, epoch: int) -> dict:
        cfg, row = self.cfg, {}
        last = epoch == cfg.trainer.epochs - 1
        evaluate_now = (epoch + 1) % cfg.trainer.eval_every == 0 or last
        record_now = cfg.instability.enabled and ((epoch + 1) % cfg.instability.every == 0 or last)
        # When the probe images are the evaluation images, one eval-mode pass serves both.
        shared = (evaluate_now and record_now and self.probe_set is self.val_set
                  and cfg.instability.max_images is None and not cfg.instability.groups)
        recorder = instability.MatchingRecorder(self.matcher, cfg.instability.all_layers, cfg.model.dec_layers)
        if evaluate_now:
            start = time.perf_counter()
            row.update(self.evaluate(recorder.add if shared else None))
            row["eval_time"] = time.perf_counter() - start
        if record_now:
            start = time.perf_counter()
            row.update(self.record_instability(epoch, recorder if shared else None))
            row["record_time"] = time.perf_counter() - start
        return row

    def evaluate(self, on_outputs: Optional[Callable] = None) -> Dict[str, Optional[float]]:
        fault_point("eval", self.epoch)
        loader = eval_loader(self.val_set, self.cfg.data.val_batch_size, self.cfg.data.num_workers)
        with self.autocast():
            return evaluate(self.model, loader, self.device, self.cfg.loss.class_loss, self.cfg.model.num_select,
                            self.val_set.coco, on_outputs, progress=self.cfg.trainer.progress and self.main)

    def record_instability(self, epoch: int, recorder=None) -> Dict[str, float]:
        """Save this epoch's matchings (from ``recorder`` when evaluation already filled it) and return IS."""
        cfg = self.cfg.instability
        if recorder is None:
            loader = eval_loader(self.probe_set, self.cfg.data.val_batch_size, self.cfg.data.num_workers,
                                 cfg.max_images)
            with self.autocast():
                recorder = instability.probe_matchings(self.model, loader, self.matcher, self.device, cfg.all_layers,
                                                       self.cfg.model.dec_layers, cfg.groups)
        recorder.save(self.run_dir, epoch)
        fault_point("record", epoch)  # recorded, not yet in metrics.jsonl: the resumed run redoes the evaluation
        return instability.epoch_metrics(self.run_dir, epoch)


def train(cfg: Config, run_dir: Path) -> List[dict]:
    return Trainer(cfg, run_dir).fit()


def evaluate_only(cfg: Config, run_dir: Path) -> Dict[str, Optional[float]]:
    """Evaluate ``model.init_from`` (or the run's own checkpoint) on the validation split."""
    trainer = Trainer(cfg, run_dir)
    if not cfg.model.init_from:
        if not trainer.checkpoint_path.exists():
            raise ConfigError("trainer.eval_only=true needs model.init_from=<checkpoint> or a run folder with "
                              f"{CHECKPOINT}")
        trainer.model.load_state_dict(load_checkpoint(trainer.checkpoint_path)["model"])
    return trainer.evaluate()
