"""Training and evaluation: loops, COCO evaluation, atomic checkpoints, exact resume, ``metrics.jsonl``.

Determinism is what makes a killed-and-restarted run end exactly where an uninterrupted run ends:
- the data order of epoch e is a permutation drawn from (seed, e), so a resumed epoch skips the batches it did;
- every sample's augmentation is drawn from its own generator seeded by (seed, epoch, index), independent of
  workers, ranks and resumes;
- the model's own randomness (dropout, DN noise) uses the global RNG, whose state the checkpoint carries;
- data loaders get private generators so that creating them never consumes the global RNG.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import distributed, instability
from .config import Config, ConfigError
from .criterion import SetCriterion, postprocess
from .data import build_dataset, collate, num_classes as dataset_num_classes
from .matcher import HungarianMatcher
from .models import build_model

log = logging.getLogger("dndetr")

CHECKPOINT = "checkpoint_last.pt"
METRICS = "metrics.jsonl"
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/Inf; the last good checkpoint is left untouched."""


class CheckpointError(ValueError):
    """A checkpoint that is truncated, foreign or from another configuration."""


# -- data ----------------------------------------------------------------------------------------------------
class SeededSamples(Dataset):
    """Draws each sample's augmentation from a generator seeded by (seed, epoch, index), not from shared state."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2 ** 63))
            return self.dataset[index]


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> List[list]:
    """This rank's batches for an epoch: a (seed, epoch) permutation cut into global batches, then per rank."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    global_batch = batch_size * world
    usable = (num_samples // global_batch) * global_batch if num_samples >= global_batch else num_samples
    batches = [order[i:i + global_batch] for i in range(0, usable, global_batch)]
    return [b[rank * batch_size:(rank + 1) * batch_size] for b in batches if b[rank * batch_size:]]


def make_loader(dataset: Dataset, batch_sampler, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers,
                      generator=torch.Generator(), persistent_workers=False)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, limit: Optional[int] = None) -> DataLoader:
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return make_loader(dataset, batches, num_workers)


def to_device(images, masks, targets, device):
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images.to(device, non_blocking=True), masks.to(device, non_blocking=True), targets


def fault_point(name: str, epoch: int, iteration: int = 0) -> None:
    """Fault injection for the resume tests: ``DNDETR_KILL_AT=<name>:<epoch>:<iteration>`` kills the process here
    (SIGKILL, as a preempted or crashed node would), e.g. ``iteration:1:3``, ``eval:0:0``, ``record:1:0``,
    ``save:1:0`` (checkpoint written to its temporary file, not yet renamed)."""
    if os.environ.get("DNDETR_KILL_AT") == f"{name}:{epoch}:{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)


# -- files ---------------------------------------------------------------------------------------------------
def atomic_torch_save(obj, path: Path, before_rename: Callable[[], None] = lambda: None) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    before_rename()
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated, corrupt or foreign): "
                              f"{str(err).splitlines()[0]}") from None
    missing = {"model", "optimizer", "scheduler", "epoch", "iteration", "rng"} - set(state)
    if not isinstance(state, dict) or missing:
        raise CheckpointError(f"checkpoint {path} is not a dndetr training checkpoint (missing {sorted(missing)})")
    return state


class MetricsLog:
    """``metrics.jsonl``: one line per finished epoch. On resume, lines of epochs that will be redone are dropped."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> List[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write: that epoch is redone
                break
        return rows

    def keep_before(self, epoch: int) -> None:
        rows = [r for r in self.read() if r["epoch"] < epoch]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


# -- evaluation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, loader, device, class_loss: str, num_select: int, coco,
             on_outputs: Optional[Callable] = None) -> Dict[str, Optional[float]]:
    """COCO box AP of the model on ``loader``'s images (pycocotools COCOeval), as fractions in [0, 1].
    ``on_outputs(outputs, targets)`` sees every batch's raw outputs (the matching recorder rides along)."""
    was_training = model.training
    model.eval()
    detections, image_ids = [], []
    for images, masks, targets in loader:
        outputs = model(images.to(device), masks.to(device))
        if on_outputs is not None:
            on_outputs(outputs, [{k: v.to(device) for k, v in t.items()} for t in targets])
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        for target, result in zip(targets, postprocess(outputs, sizes, class_loss, num_select)):
            image_ids.append(int(target["image_id"]))
            boxes = result["boxes"].cpu()
            boxes[:, 2:] -= boxes[:, :2]  # COCO wants x, y, w, h
            detections += [{"image_id": image_ids[-1], "category_id": int(label), "bbox": box, "score": score}
                           for box, score, label in zip(boxes.tolist(), result["scores"].tolist(),
                                                        result["labels"].tolist())]
    model.train(was_training)
    return coco_ap(coco, detections, image_ids)


def coco_ap(coco, detections: List[dict], image_ids: Optional[List[int]] = None) -> Dict[str, Optional[float]]:
    """COCOeval's six AP numbers; None where COCOeval has nothing to measure (it reports -1)."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {k: 0.0 for k in AP_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its whole table
        evaluator = COCOeval(coco, coco.loadRes(detections), iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: (float(v) if v >= 0 else None) for k, v in zip(AP_KEYS, evaluator.stats[:6])}


# -- training ------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array travels as a tensor: checkpoints load with weights_only=True, which refuses numpy objects.
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_groups(model, cfg: Config) -> List[dict]:
    if hasattr(model, "param_groups"):  # models with their own published groups (the deformable family)
        return model.param_groups(cfg.optim.lr, cfg.optim.lr_backbone)
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    groups = [{"params": rest, "lr": cfg.optim.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.optim.lr_backbone})
    return groups


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.rank, self.world, _ = distributed.init_distributed()
        self.main = self.rank == 0
        self.device = self.pick_device(cfg.trainer.device)
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
        self.matcher = HungarianMatcher(cfg.matcher)
        self.criterion = SetCriterion(self.matcher, self.num_classes, cfg.model, cfg.dn.loss_weight).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.optim.lr_drop, cfg.optim.lr_gamma)
        self.amp = cfg.trainer.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.train_model = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.epoch, self.iteration, self.wall_time, self.loss_sums = 0, 0, 0.0, {}
        self.started = time.perf_counter()
        self.metrics = MetricsLog(self.run_dir / METRICS)
        self.checkpoint_path = self.run_dir / CHECKPOINT
        self.preemption = None

    @staticmethod
    def pick_device(name: str) -> torch.device:
        if name == "cuda" and not torch.cuda.is_available():
            raise ConfigError("trainer.device='cuda' is invalid: no CUDA device is available (use auto or cpu)")
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "iteration": self.iteration, "wall_time": self.wall_time + self.elapsed(),
                "rng": rng_state(), "loss_sums": dict(self.loss_sums), "config": asdict(self.cfg)}

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
                                  f"{str(err).splitlines()[0]}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration, self.wall_time = state["epoch"], state["iteration"], state["wall_time"]
        self.loss_sums = dict(state["loss_sums"])
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
            log.info("%s at epoch %d iteration %d; run folder %s", "resuming" if resumed else "starting",
                     self.epoch, self.iteration, self.run_dir)
        # SLURM signals before preemption/timeout: save the last whole iteration, then let submitit requeue.
        self.preemption = distributed.install_preemption_hook(self.save_now) if self.main else None
        try:
            while self.epoch < self.cfg.trainer.epochs:
                losses, iter_time, train_time = self.train_one_epoch()
                self.end_of_epoch(losses, iter_time, train_time)
        finally:
            if self.preemption is not None:
                self.preemption.remove()
        return self.metrics.read()

    def train_one_epoch(self):
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
        start, done = time.perf_counter(), 0
        for images, masks, targets in loader:
            with self.preemption.deferred() if self.preemption else contextlib.nullcontext():
                loss_values = self.train_step(images, masks, targets)
                for key, value in loss_values.items():
                    sums[key] = sums.get(key, 0.0) + value
                self.iteration += 1
                done += 1
            fault_point("iteration", epoch, self.iteration)
            if progress is not None:
                progress.set_postfix(loss=f"{loss_values['loss']:.3f}")
                progress.update()
            every = cfg.trainer.checkpoint_every_iters
            if every and self.iteration % every == 0 and self.iteration < len(batches):
                with self.preemption.deferred() if self.preemption else contextlib.nullcontext():
                    self.save()
        if progress is not None:
            progress.close()
        iterations = max(self.iteration, 1)
        train_time = time.perf_counter() - start
        return {k: v / iterations for k, v in sums.items()}, train_time / max(done, 1), train_time

    def train_step(self, images, masks, targets) -> Dict[str, float]:
        images, masks, targets = to_device(images, masks, targets, self.device)
        step = f"epoch {self.epoch} iteration {self.iteration}"
        with torch.autocast(self.device.type, enabled=self.amp):
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
        logged = torch.stack([loss.detach()] + [v.detach() for v in losses.values()])
        logged = distributed.all_reduce_mean(logged).tolist()
        return dict(zip(["loss"] + list(losses), logged))

    def stopped(self) -> str:
        if self.checkpoint_path.exists():
            return f"stopped, {self.checkpoint_path} is the last good checkpoint"
        return "stopped before the first checkpoint was written"

    def end_of_epoch(self, losses: Dict[str, float], iter_time: float, train_time: float) -> dict:
        cfg, epoch = self.cfg, self.epoch
        # A finite loss can still give NaN gradients: stop here, not with a traceback from evaluation or matching.
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(f"weights {bad[0]} (and {len(bad) - 1} more) are NaN or Inf after epoch {epoch} "
                                     f"iteration {self.iteration - 1}; {self.stopped()}")
        row = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], "train_loss": losses.pop("loss", None)}
        row.update(losses)
        if self.main:
            last = epoch == cfg.trainer.epochs - 1
            evaluate_now = (epoch + 1) % cfg.trainer.eval_every == 0 or last
            record_now = cfg.instability.enabled and ((epoch + 1) % cfg.instability.every == 0 or last)
            # When the probe images are the evaluation images, one eval-mode pass serves both.
            shared = (evaluate_now and record_now and self.probe_set is self.val_set
                      and cfg.instability.max_images is None)
            recorder = instability.MatchingRecorder(self.matcher, cfg.instability.all_layers, cfg.model.dec_layers)
            if evaluate_now:
                start = time.perf_counter()
                row.update(self.evaluate(recorder.add if shared else None))
                row["eval_time"] = time.perf_counter() - start
            if record_now:
                start = time.perf_counter()
                row.update(self.record_instability(epoch, recorder if shared else None))
                row["record_time"] = time.perf_counter() - start
        row["iter_time"] = iter_time
        row["train_time"] = train_time
        row["epoch_time"] = train_time + row.get("eval_time", 0.0) + row.get("record_time", 0.0)
        row["wall_time"] = self.wall_time + self.elapsed()
        if self.main:
            log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                     if k in ("train_loss", "AP", "AP50", "IS") and v is not None))
        with self.preemption.deferred() if self.preemption else contextlib.nullcontext():
            if self.main:
                self.metrics.append(row)
            self.scheduler.step()
            self.epoch, self.iteration, self.loss_sums = epoch + 1, 0, {}
            self.save()
        return row

    def evaluate(self, on_outputs: Optional[Callable] = None) -> Dict[str, Optional[float]]:
        fault_point("eval", self.epoch)
        loader = eval_loader(self.val_set, self.cfg.data.val_batch_size, self.cfg.data.num_workers)
        return evaluate(self.model, loader, self.device, self.cfg.model.class_loss, self.cfg.model.num_select,
                        self.val_set.coco, on_outputs)

    def record_instability(self, epoch: int, recorder=None) -> Dict[str, float]:
        """Save this epoch's matchings (from ``recorder`` when evaluation already filled it) and return IS."""
        cfg = self.cfg.instability
        if recorder is not None:
            record = recorder.result()
        else:
            loader = eval_loader(self.probe_set, self.cfg.data.val_batch_size, self.cfg.data.num_workers,
                                 cfg.max_images)
            record = instability.record_matchings(self.model, loader, self.matcher, self.device, cfg.all_layers,
                                                  self.cfg.model.dec_layers)
        instability.save_epoch(self.run_dir, epoch, *record)
        fault_point("record", epoch)  # recorded, not yet in metrics.jsonl: the resumed run redoes the epoch
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
