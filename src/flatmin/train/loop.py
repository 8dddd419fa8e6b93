"""The training loop: one run of one method on one data set and model, start to summary.

Per update: the method's step (one batch, or two consecutive batches for the mixed methods),
then the cosine learning rate and the σ schedule advance. Per epoch: evaluation, one line in
``metrics.jsonl`` and an atomic checkpoint holding everything a resumed run needs to end on the
same weights as an uninterrupted one: model, optimizer (with its noise generator and ARWP
statistics), schedulers, the grad scaler, the global RNG state and the epoch (the data order and
augmentation of an epoch are functions of the seed and the epoch alone). A run makes the updates its
budget allows (``budget_updates``), so its last epoch may end early.
"""
from __future__ import annotations

import itertools
import json
import math
import platform
import resource
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from ..analysis import hessian_eigenvalues, hessian_trace
from ..data import FolderDataset, load_dataset, make_loaders, split_loader
from ..distributed import DistEnv, ParallelMixedStep, average_gradients, broadcast_buffers, cleanup, init_distributed
from ..losses import NRSLoss
from ..models import create_model
from ..optim import CosineIncSigma, create
from ..optim.base import WrappedOptimizer
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import RESUMABLE_CHANGES, ConfigError, TrainConfig, check_device, output_folder, with_legacy_defaults
from .progress import Progress
from .tensorboard import TensorBoardLog

Batch = Tuple[Tensor, Tensor]
# What a checkpoint of a run holds (see Trainer._checkpoint), all needed to resume it.
RUN_ENTRIES = ("config", "epoch", "train_time", "history", "model", "optimizer", "lr_schedule", "sigma_schedule",
               "scaler", "nrs", "rng")
# The files that make a folder a run's: a fresh run there is refused without ``overwrite``.
RUN_FILES = ("checkpoint.pt", "summary.json")


def cosine_with_warmup(total_updates: int, warmup_updates: int) -> Callable[[int], float]:
    """Learning-rate factor per update: linear warm-up to 1, then ``(1 + cos(π·t/T))/2`` to 0."""

    def factor(step: int) -> float:
        if step < warmup_updates:
            return (step + 1) / warmup_updates
        progress = (step - warmup_updates) / max(1, total_updates - warmup_updates)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def budget_updates(budget: str, epochs: int, sgd_updates_per_epoch: int, updates_per_epoch: int,
                   grads_per_update: int) -> int:
    """The updates a run makes under ``budget``, measured against plain SGD trained for ``epochs``
    epochs (``S = sgd_updates_per_epoch``: one batch and one gradient evaluation per update):

        epochs:     U = epochs · updates_per_epoch       (the same epochs of data)
        updates:    U = epochs · S                       (as many updates as SGD)
        gradients:  U = ⌊epochs · S / grads_per_update⌋  (at most as many gradient evaluations)

    The run then lasts ``⌈U / updates_per_epoch⌉`` epochs, the last one cut short where needed.
    """
    if budget == "epochs":
        return epochs * updates_per_epoch
    if budget == "updates":
        return epochs * sgd_updates_per_epoch
    if budget == "gradients":
        return epochs * sgd_updates_per_epoch // grads_per_update
    raise ConfigError(f"unknown budget {budget!r}: choose one of epochs, updates, gradients")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, amp: Callable[[], Any], distributed: bool = False,
             filler: Optional[Tensor] = None) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode over ``loader``; with
    ``distributed``, over the union of every rank's loader (each rank holds its own shard).

    A sharded (FSDP) model's forward is a collective, so every rank must run as many as the others:
    with ``filler`` (an input batch), a rank with fewer batches than the most runs ``filler`` through
    the model for each one it lacks and drops the output.
    """
    device = next(model.parameters()).device
    lacking = 0
    if distributed and filler is not None:
        most = torch.tensor(len(loader), device=device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        lacking = int(most) - len(loader)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    count = 0
    try:
        for x, y in loader:
            with amp():
                out = model(x)
            total_loss += F.cross_entropy(out.float(), y, reduction="sum").double().cpu()
            correct += (out.argmax(1) == y).sum().cpu()
            count += len(y)
        for _ in range(lacking):
            with amp():
                model(filler)
    finally:
        model.train(was_training)
    if distributed:
        totals = torch.tensor([float(total_loss), float(correct), float(count)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals)
        total_loss, correct, count = totals.tolist()
    return float(total_loss) / max(count, 1), float(correct) / max(count, 1)


def _resolve_device(name: str) -> torch.device:
    check_device(name)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} was asked for, but torch sees no CUDA device here: use --device cpu")
    return device


def _amp_context(cfg: TrainConfig, device: torch.device) -> Callable[[], Any]:
    if cfg.amp is None:
        return nullcontext
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


class Trainer:
    """Everything one run holds; ``run()`` trains it to the end and returns the summary."""

    def __init__(self, cfg: TrainConfig, resume: Optional[str] = None) -> None:
        self.cfg = cfg.validate()
        checkpoint = None
        if resume is not None and cfg.overwrite:
            raise ConfigError("--overwrite does not combine with --resume: resume continues the run in the folder, "
                              "overwrite replaces it; drop one of them")
        if resume is not None:
            checkpoint = load_checkpoint(resume, require=RUN_ENTRIES)
            self._check_compatible(checkpoint["config"], resume)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        # Under torchrun: one worker per process; rank 0 logs and writes, every rank trains.
        self.env: DistEnv = init_distributed(cfg.device, parallel=cfg.parallel)
        self.distributed = self.env.world_size > 1
        self.device = self.env.device if self.distributed else _resolve_device(cfg.device)
        self.out = output_folder(cfg.out)
        torch.manual_seed(cfg.seed)

        self.dataset = load_dataset(cfg.data, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                                    seed=0, cutout=cfg.cutout, image_size=cfg.image_size, normalize=cfg.normalize)
        self.train_loader, self.eval_loaders = make_loaders(
            self.dataset, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
            device=self.device, seed=cfg.seed, num_workers=cfg.num_workers,
            shard=(self.env.rank, self.env.world_size))
        self.model = create_model(cfg.model, self.dataset.num_classes, self.dataset.input_shape).to(self.device)
        # Data parallelism with DDP for every method but parallel m-(A)RWP, which does its own
        # communication, and NRS, whose two forwards per backward do not fit DDP (averaged by hand).
        # A sharded model (FSDP) reduce-scatters its gradients itself, NRS's included.
        self.net: nn.Module = self.model
        self.manual_sync = self.distributed and cfg.method == "nrs" and not cfg.fsdp
        self.filler: Optional[Tensor] = None
        if cfg.fsdp:
            from ..distributed import fsdp  # here: it loads torch's DTensor machinery, which takes a second

            fsdp.shard_model(self.model, fsdp.process_group_mesh(self.device))
            self.filler = torch.zeros(1, *self.dataset.input_shape, device=self.device)
        elif self.distributed and not cfg.parallel and not self.manual_sync:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.amp = _amp_context(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None

        hp = cfg.hparams()
        self.sigma_inc = hp.pop("sigma_inc", None)
        base_kwargs: Dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
        if cfg.base == "sgd":
            base_kwargs["momentum"] = cfg.momentum
        self.nrs: Optional[NRSLoss] = None
        if cfg.method == "nrs":
            # NRS is a loss: the plain base optimizer steps on its gradient.
            self.nrs = NRSLoss(**hp, seed=cfg.seed)
            self.optimizer = create("sgd", self.model, base=cfg.base, **base_kwargs)
        elif cfg.method == "sgd":
            self.optimizer = create("sgd", self.model, base=cfg.base, **base_kwargs)
        else:
            hp.update(seed=cfg.seed, grad_scaler=self.scaler, max_grad_norm=cfg.clip)
            self.optimizer = create(cfg.method, self.net, base=cfg.base, **base_kwargs, **hp)
        self.wrapped = isinstance(self.optimizer, WrappedOptimizer)
        batches_per_update = getattr(self.optimizer, "batches_per_step", 1)
        # Parallel m-(A)RWP: each rank's own batch is its shard of B1 (clean ranks) or B2 (perturbed).
        self.pairs = batches_per_update == 2 and not cfg.same_batch and not cfg.parallel
        self.updates_per_epoch = len(self.train_loader) // (2 if self.pairs else 1)
        if self.updates_per_epoch < 1:
            raise ConfigError(f"batch_size={cfg.batch_size} leaves no update per epoch on {cfg.data}: use a smaller batch")
        # Forward-backward passes per update: NRS backpropagates through a clean and a perturbed
        # forward (and its adversarial neighbour costs one more pass to find).
        nrs_passes = {"random": 2, "adversarial": 3}.get(hp.get("neighbour"), 2)
        self.grads_per_update = nrs_passes if self.nrs else getattr(self.optimizer, "grads_per_step", 1)
        # SGD's updates per epoch: one batch each (under torchrun, one shard of a global batch each).
        self.total_updates = budget_updates(cfg.budget, cfg.epochs, len(self.train_loader), self.updates_per_epoch,
                                            self.grads_per_update)
        if self.total_updates < 1:
            raise ConfigError(f"budget={cfg.budget!r} leaves {cfg.method} no update in {cfg.epochs} epochs of "
                              f"{cfg.data}: use more epochs")
        self.epochs = -(-self.total_updates // self.updates_per_epoch)
        if checkpoint is not None and self.epochs < checkpoint["epoch"]:
            if self.epochs == cfg.epochs:
                more, fix = "", f"give --epochs {checkpoint['epoch']} or more"
            else:  # the budget made other epochs of cfg.epochs
                more, fix = f" (budget {cfg.budget}: {self.epochs} epochs of {cfg.method})", "give more --epochs"
            raise CheckpointError(f"epochs={cfg.epochs}{more} is fewer than the {checkpoint['epoch']} epochs checkpoint "
                                  f"{resume} has trained already: {fix}")
        # The warm-up is the same fraction of every schedule, whatever the budget made of the epochs.
        warmup = int(round(cfg.warmup_epochs / cfg.epochs * self.total_updates))
        # On the base optimizer (same param_groups): its step() runs on every path, parallel included.
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            getattr(self.optimizer, "base_optimizer", self.optimizer), cosine_with_warmup(self.total_updates, warmup))
        self.sigma_schedule = (CosineIncSigma(self.optimizer, self.total_updates, inc=self.sigma_inc)
                               if self.sigma_inc is not None else None)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

        self.epoch = 0
        self.train_time = 0.0
        self.history: List[Dict[str, Any]] = []
        if checkpoint is not None:
            self._restore(checkpoint, resume)
        # Built after the restore: it starts every rank from rank 0's weights, buffers and noise state.
        self.parallel_step = ParallelMixedStep(self.optimizer, self.model) if cfg.parallel else None
        if checkpoint is None:
            self._claim_folder()  # last of the checks: a bad setting is reported as itself, not as this
        self.tensorboard = (TensorBoardLog(self.out, first_epoch=self.epoch + 1)
                            if cfg.log == "tensorboard" and self.env.is_main else None)

    def _claim_folder(self) -> None:
        """A fresh run's output folder must not hold another run, unless ``overwrite`` says to replace
        it (its checkpoint and summary are removed now, so that none of the old run outlives the new)."""
        found = [name for name in RUN_FILES if (self.out / name).exists()]
        if not found:
            return
        if not self.cfg.overwrite:
            raise ConfigError(f"out={self.cfg.out!r} holds a run already ({', '.join(found)}): pass --resume to "
                              f"continue it or --overwrite to replace it, or choose another --out")
        if self.env.is_main:
            for name in found:
                (self.out / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ resume
    def _check_compatible(self, saved: Dict[str, Any], where: str) -> None:
        saved = with_legacy_defaults(saved)
        changed = [f"{k} (checkpoint: {saved.get(k)!r}, now: {v!r})"
                   for k, v in self.cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]
        if changed:
            raise CheckpointError(f"checkpoint {where} was written for another run: " + "; ".join(changed))

    def _restore(self, ckpt: Dict[str, Any], where: str) -> None:
        try:
            if self.cfg.fsdp:  # the full tensors, read by every rank, sliced like the parameters here
                from ..distributed import fsdp

                fsdp.load_full_model_state(self.model, ckpt["model"])
                fsdp.load_full_optimizer_state(self.optimizer, ckpt["optimizer"])
            else:
                self.model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
            self.lr_schedule.load_state_dict(ckpt["lr_schedule"])
            if self.sigma_schedule is not None:
                self.sigma_schedule.load_state_dict(ckpt["sigma_schedule"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            if self.nrs is not None:
                self.nrs.load_state_dict(ckpt["nrs"])
        except (RuntimeError, KeyError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"checkpoint {where} does not fit this model/optimizer: {first}") from None
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.epoch = int(ckpt["epoch"])
        self.train_time = float(ckpt["train_time"])
        self.history = list(ckpt["history"])
        # metrics.jsonl restarts from what the checkpoint knew: no rows of a lost epoch remain.
        if self.env.is_main:
            with open(self.out / "metrics.jsonl", "w") as handle:
                for row in self.history:
                    handle.write(json.dumps(row) + "\n")

    def _checkpoint(self) -> None:
        if self.cfg.fsdp:  # gathering the shards is a collective: every rank takes part, rank 0 keeps them
            from ..distributed import fsdp

            model, optimizer = fsdp.full_model_state(self.model), fsdp.full_optimizer_state(self.optimizer)
        elif self.env.is_main:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        if not self.env.is_main:
            return
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        save_checkpoint(self.out / "checkpoint.pt", {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "train_time": self.train_time,
            "history": self.history,
            "model": model,
            "optimizer": optimizer,
            "lr_schedule": self.lr_schedule.state_dict(),
            "sigma_schedule": self.sigma_schedule.state_dict() if self.sigma_schedule else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "nrs": self.nrs.state_dict() if self.nrs else None,
            "rng": rng,
        })

    # ------------------------------------------------------------------ training
    def _closure(self, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            if self.nrs is not None and self.cfg.fsdp:
                # A sharded model's neighbour runs on the shards shifted in place, each branch
                # backpropagated at its own weights: NRS does its backward itself.
                with self.amp():
                    return self.nrs.backward(self.model, x, y, base_loss=self.criterion)
            with self.amp():
                if self.nrs is not None:
                    loss = self.nrs(self.model, x, y, base_loss=self.criterion)
                else:
                    loss = self.criterion(self.net(x), y)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            return loss.detach()
        return closure

    def _update(self, batches: Sequence[Batch]) -> Tensor:
        """One update of the method from one or two batches; returns the step's loss."""
        closures = [self._closure(x, y) for x, y in batches]
        if self.parallel_step is not None:
            return self.parallel_step.step(*closures)
        if self.wrapped:
            return self.optimizer.step(*closures)
        self.optimizer.zero_grad(set_to_none=True)
        loss = closures[0]()
        if self.manual_sync:
            average_gradients(self.model.parameters())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.step()
        if self.manual_sync:
            broadcast_buffers(self.model)  # rank 0's running statistics, as DDP keeps them
        return loss

    def _batches(self) -> Any:
        it = iter(self.train_loader)
        return zip(it, it) if self.pairs else ((b,) for b in it)

    def _updates_done(self) -> int:
        return sum(row["updates"] for row in self.history)

    def _train_epoch(self, progress: Progress) -> Dict[str, Any]:
        self.train_loader.set_epoch(self.epoch)
        self.model.train()
        # The budget may end the last epoch early (e.g. a mixed method matching SGD's updates).
        todo = min(self.updates_per_epoch, self.total_updates - self._updates_done())
        progress.start_epoch(self.epoch, self.epochs, todo)
        loss_sum = torch.zeros((), device=self.device)
        samples = updates = 0
        start = time.perf_counter()
        for batches in itertools.islice(self._batches(), todo):
            loss = self._update(batches)
            if self.cfg.fsdp and self.distributed:
                broadcast_buffers(self.model)  # rank 0's running statistics on every rank, as DDP keeps them
            if self.scaler is not None:
                self.scaler.update()  # the scale of the next update: lowered after an inf, raised in time
            self.lr_schedule.step()
            if self.sigma_schedule is not None:
                self.sigma_schedule.step()
            loss_sum += loss.float()
            samples += sum(len(y) for _, y in batches) * self.env.world_size  # every rank a shard alike
            updates += 1
            if updates % 10 == 0 or updates == todo:
                progress.update(10 if updates % 10 == 0 else updates % 10, loss=float(loss),
                                lr=self.optimizer.param_groups[0]["lr"])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.train_time += elapsed
        return {"step_loss": float(loss_sum) / max(updates, 1), "updates": updates, "samples": samples,
                "epoch_time_s": elapsed, "samples_per_s": samples / elapsed if elapsed > 0 else None}

    def run(self, on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """Train to the end of the schedule; ``on_epoch`` sees each epoch's row of ``metrics.jsonl``
        once it is checkpointed (a sweep reports validation accuracy from it, and may stop the run
        by raising)."""
        cfg = self.cfg
        progress = Progress(cfg.progress if self.env.is_main else "none")
        wall_start = time.perf_counter()
        # A fresh run starts its own metrics.jsonl; a resumed one continues what _restore wrote.
        metrics = open(self.out / "metrics.jsonl", "a" if self.history else "w") if self.env.is_main else None
        start_epoch = self.epoch
        try:
            last = self.epochs if cfg.stop_after is None else min(self.epochs, cfg.stop_after)
            while self.epoch < last:
                stats = self._train_epoch(progress)
                self.epoch += 1
                row: Dict[str, Any] = {"epoch": self.epoch, "epochs": self.epochs, **stats,
                                       "train_time_s": self.train_time,
                                       "lr": self.optimizer.param_groups[0]["lr"],
                                       "sigma": self.optimizer.param_groups[0].get("sigma")}
                for split, loader in self.eval_loaders.items():
                    if split == "train":
                        continue
                    row[f"{split}_loss"], row[f"{split}_acc"] = evaluate(self.model, loader, self.amp,
                                                                          self.distributed, self.filler)
                self.history.append(row)
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if self.tensorboard is not None:
                    self.tensorboard.epoch(row, lam=self.optimizer.param_groups[0].get("lam"),
                                           skipped_steps=getattr(self.optimizer, "skipped_steps", 0))
                self._checkpoint()
                progress.end_epoch(row)
                if on_epoch is not None:
                    on_epoch(row)
        finally:
            if metrics is not None:
                metrics.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        summary = self._summary(time.perf_counter() - wall_start, start_epoch)
        if self.env.is_main:
            tmp = self.out / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(self.out / "summary.json")
        return summary

    def _summary(self, wall_time: float, start_epoch: int) -> Dict[str, Any]:
        cfg = self.cfg
        result: Dict[str, Any] = {
            "config": cfg.to_dict(),
            "hparams": cfg.hparams(),
            "versions": {"flatmin": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "threads": torch.get_num_threads(),  # CPU threads: the numbers of a CPU run depend on them
            "seed": cfg.seed,
            "method": cfg.method,
            "budget": cfg.budget,
            "epochs": self.epochs,
            "completed": self.epoch >= self.epochs,
            "stopped_early": self.epoch < self.epochs,  # by --stop-after: continue with --resume
            "epochs_done": self.epoch,
            "start_epoch": start_epoch,  # > 0 for a resumed run; == epochs_done when it trained nothing
            "updates_per_epoch": self.updates_per_epoch,
            "updates": self._updates_done(),
            "grad_evals": self._updates_done() * self.grads_per_update,
            "samples_seen": sum(row["samples"] for row in self.history),
            "train_time_s": self.train_time,
            "wall_time_s": wall_time,
        }
        for split, loader in self.eval_loaders.items():
            result[f"{split}_loss"], result[f"{split}_acc"] = evaluate(self.model, loader, self.amp, self.distributed,
                                                                      self.filler)
        result["workers"] = self.env.world_size
        if isinstance(self.dataset, FolderDataset):
            result["preprocessing"] = self.dataset.preprocessing
        if "train_acc" in result and "test_acc" in result:
            result["gap"] = result["train_acc"] - result["test_acc"]
        if self.wrapped:
            result["skipped_steps"] = self.optimizer.skipped_steps
        # The Hessian of a sharded model is taken on rank 0 from an unsharded copy (gathered by all ranks).
        model = self._unsharded_model() if cfg.flatness and cfg.fsdp else self.model
        if cfg.flatness and self.env.is_main:
            # The training split: an image folder's from split_loader (its evaluation loaders hold test only).
            train_data = (split_loader(self.dataset, "train", cfg.eval_batch_size, self.device, seed=cfg.seed)
                          if isinstance(self.dataset, FolderDataset) else self.eval_loaders["train"])
            batches = list(itertools.islice(iter(train_data), cfg.flatness))
            result["flatness_split"] = "train"
            loss = nn.CrossEntropyLoss()
            result["hessian_top"] = hessian_eigenvalues(model, loss, batches, k=1, iters=30, tol=1e-3,
                                                        seed=cfg.seed)[0]
            result["hessian_trace"], result["hessian_trace_se"] = hessian_trace(model, loss, batches,
                                                                                probes=30, seed=cfg.seed)
        if self.device.type == "cuda":
            result["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB
        result["history"] = self.history
        return result

    def _unsharded_model(self) -> Optional[nn.Module]:
        """On rank 0, a plain copy of the sharded model with its gathered weights (one full copy on
        the training device); ``None`` on the other ranks. Every rank must call it."""
        from ..distributed import fsdp

        state = fsdp.full_model_state(self.model)
        if not self.env.is_main:
            return None
        with torch.device("meta"):  # no initialisation to compute, no draw from the global generator
            model = create_model(self.cfg.model, self.dataset.num_classes, self.dataset.input_shape)
        model.to_empty(device=self.device).load_state_dict(state)
        return model.train(self.model.training)


def load_trained(checkpoint: str, device: str = "cpu") -> Tuple[TrainConfig, nn.Module, Any]:
    """The config, the trained model (eval mode, on ``device``) and the data set of a checkpoint
    written by ``flatmin train``."""
    ckpt = load_checkpoint(checkpoint, require=("config", "model"))
    cfg = TrainConfig.from_dict(with_legacy_defaults(ckpt["config"]), where=str(checkpoint))
    dataset = load_dataset(cfg.data, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction, seed=0, cutout=0,
                           image_size=cfg.image_size, normalize=cfg.normalize)
    model = create_model(cfg.model, dataset.num_classes, dataset.input_shape)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit model {cfg.model!r}: "
                              f"{str(err).strip().splitlines()[0]}") from None
    return cfg, model.to(_resolve_device(device)).eval(), dataset


def train(cfg: TrainConfig, resume: Optional[str] = None,
          on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Train one run described by ``cfg`` (optionally resumed from a checkpoint); returns the summary.
    ``on_epoch`` is called with each epoch's metrics row. Under torchrun every worker calls this; it
    leaves the process group at the end."""
    try:
        summary = Trainer(cfg, resume=resume).run(on_epoch)
        if torch.distributed.is_initialized():
            # Every rank done before any tears the group down: a rank leaving early can abort a
            # peer that is still closing its gloo connections.
            torch.distributed.barrier()
        return summary
    finally:
        cleanup()
