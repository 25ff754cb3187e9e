"""The training loop for all five methods (msp, oe, adv, aoe, aloe), read top to bottom in `_train()`.

One step, following the reference ALOE code (see ../shared/ALOE.md) without its wasted clean forward:

    x_in, y   <- next in-distribution batch (augmented)          x_out <- next outlier batch (augmented)
    adv/aoe/aloe: x_in  <- PGD maximising CE(f(x_in), y)          (model in train mode, like the reference)
    aloe:         x_out <- PGD maximising L_OE(f(x_out))           (push outliers toward confident)
    logits <- f([x_in; x_out])                                     (one joint forward: BN sees both)
    loss   <- CE(logits_in, y) + λ·L_OE(logits_out)                (the OE term only for oe/aoe/aloe)
    SGD nesterov step, cosine learning rate per iteration
    --ema-decay:  the weight average follows the new weights       (then it is the run's model)

`_train` is: set-up → data → model, optimiser, schedule → resume (or start and record the run) → the loop
(batch, attack, loss, optimiser step, bookkeeping, budget fit, stop check, epoch log + checkpoint) →
final checkpoint, test accuracy, summary. Its steps are the small functions below it, in that order.

Stopping: the schedule ends, `--stop-at-step`, `--time-budget`, or Ctrl-C / SIGTERM — each saves
`checkpoints/last.pt` first; it is also written every `--save-every-epochs` epochs and, with
`--save-every-steps N`, every N steps (all a SIGKILL can lose). `--resume` restores model, optimiser,
schedule, data-stream positions and every RNG, so N/2 + N/2 steps give bit-identical weights to N steps.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import distributed as ddp
from .architectures import create_model
from .attacks import pgd_linf
from .augment import UploadAugment
from .config import (
    ATTACKS_INLIERS,
    ATTACKS_OUTLIERS,
    DISC_CLASSES,
    DISC_IN,
    DISC_OUT,
    USES_OUTLIERS,
    TrainConfig,
    config_from_dict,
)
from .data import (
    BatchStream, ImageSet, calibration_split, held_out_outliers, load_in_distribution, load_outliers, outlier_holdout,
    to_tensor,
)
from .loop_parts import (
    BudgetFit, CosineSchedule, ProgressBar, StepMeter, StopSignals, accuracy, attack_bn, autocast, capture_rng_state,
    resolve_device, restore_rng_state, warn_if_cpu_is_contended,
)
from .losses import ce_per_sample, oe_loss, oe_loss_per_sample
from .scores import detector_margin
from .run_dir import (
    CHECKPOINT_FORMAT, append_log, check_run_dir, code_version, environment_info, last_checkpoint_path,
    load_checkpoint, load_initial_weights, prepare_run_dir, resolve_model_config, save_last_checkpoint,
    write_run_record, write_summary,
)

log = logging.getLogger(__name__)

_WARMUP_STEPS = 5  # steps excluded from images/s (allocator and oneDNN warm-up)
_DATA_INIT_IMAGES = 5_000  # training images a model's data_init sees (airbench's whitening: 5,000)
# Knobs that may change on --resume without breaking bit-for-bit continuation.
OPERATIONAL_KEYS = ("out", "resume", "overwrite", "time_budget", "stop_at_step", "threads", "progress",
                    "log_every", "eval_test", "device", "data_dir", "cache_dir", "keep_epoch_checkpoints",
                    "save_every_steps", "disc_val_samples")


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # global optimiser steps done
    total_steps: int  # the schedule length
    epoch: float  # epochs done (fractional)
    stopped: str  # completed | stop_at_step | time_budget | interrupted | terminated
    images_per_s: float  # in-distribution training images per second (all ranks), after warm-up
    all_images_per_s: float  # in-distribution + outlier images per second
    train_seconds: float  # this invocation's time in the loop
    test_accuracy: float | None = None
    step_losses: list[float] = field(default_factory=list)  # this invocation's per-step losses
    config: TrainConfig | None = None  # the configuration actually run (the stored one on --resume)
    model: nn.Module | None = None  # the run's model as in last.pt (unwrapped, train mode; with --ema-decay the average)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("step_losses", "config", "model")}
        d["run_dir"] = str(self.run_dir)
        return d


def train(cfg: TrainConfig) -> TrainResult:
    cfg.validate()
    if cfg.resume:
        cfg = _resumed_config(cfg)
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    info = ddp.init_distributed(use_cuda)
    try:
        return _train(cfg, info)
    finally:
        _close_augment_pool()
        ddp.cleanup(info)


def _train(cfg: TrainConfig, info: ddp.DistInfo) -> TrainResult:
    # -- set-up: device, threads, precision; refuse an unusable run directory before any work ----------
    device = resolve_device(cfg.device, info)
    threads = cfg.threads or max(1, len(os.sched_getaffinity(0)) // info.local_world_size)
    torch.set_num_threads(threads)
    warn_if_cpu_is_contended(threads, device)
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    run_dir = Path(cfg.out)
    if info.is_main:  # only rank 0: the others might see the directory rank 0 has just created
        check_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite)

    # -- data: training split (calibration images held out), outliers — before anything is written ------
    train_set, outlier_set, split, disc_val = _load_training_data(cfg)
    if info.is_main:
        prepare_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    ddp.barrier(info)
    # a detector (disc) has two outputs, in-distribution and outlier; a classifier one per class
    classes = list(DISC_CLASSES) if cfg.method == "disc" else train_set.classes
    num_classes = len(classes) or int(train_set.labels.max()) + 1
    in_stream, out_stream = _batch_streams(cfg, info, train_set, outlier_set, device)
    steps_per_epoch = in_stream.batches_per_epoch

    # -- model, optimiser, schedule, attack generator, loss scaler ------------------------------------
    raw_model = _build_model(cfg, num_classes, device)
    optimizer = torch.optim.SGD(_param_groups(cfg, raw_model), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    planned = _planned_total(cfg, steps_per_epoch)
    schedule = CosineSchedule(cfg.lr, cfg.min_lr, planned, max(cfg.warmup_steps, int(cfg.warmup_frac * planned)))
    planned_total = schedule.total_steps  # the epochs/max-steps plan: a budget fit never goes beyond it
    attack_gen = torch.Generator(device=device).manual_seed(cfg.seed * 31 + info.rank)
    # fp16 autocast needs loss scaling (bf16 does not)
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" and not torch.cuda.is_bf16_supported() else None
    state = _TrainState(raw_model, optimizer, schedule, in_stream, out_stream, attack_gen, scaler,
                        _weight_average(cfg, raw_model),
                        data_sha256={"train": train_set.sha256, "outliers": outlier_set.sha256 if outlier_set else None})

    # -- resume, or start (from scratch or another run's weights) and record the run -------------------
    if cfg.resume:
        step, seconds_before = _resume(state, run_dir, info, train_set, outlier_set)
        planned_total = max(planned_total, schedule.total_steps)
    else:
        step, seconds_before = 0, 0.0
        # data lineage: the full training file (the calibration split indexes into it) and the outlier file
        lineage = {"in_distribution": {**train_set.describe(), "n": split["n_total"]},
                   "outliers": outlier_set.describe() if outlier_set is not None else None}
        if cfg.init_from:  # fine-tuning: weights only; optimiser, schedule and data order start fresh
            lineage["init_from"] = load_initial_weights(raw_model, cfg.init_from, split)
            log.info("initialised weights from %s%s", lineage["init_from"]["checkpoint"],
                     f" (output layer {lineage['init_from']['head']})" if "head" in lineage["init_from"] else "")
        elif hasattr(raw_model, "data_init"):  # data-dependent initialisation (airbench's whitening stem)
            sample = np.random.default_rng(cfg.seed).permutation(len(train_set))[:_DATA_INIT_IMAGES]
            raw_model.data_init(to_tensor(train_set.images[np.sort(sample)]).to(device))
        if info.is_main:
            write_run_record(run_dir, {
                "train": cfg.to_dict(), "model_config": raw_model.model_config, "num_classes": num_classes,
                "classes": classes, "lineage": lineage, "code_version": code_version(),
                "environment": environment_info(device, threads, info, amp),
            }, split)
    model, attack_model = _wrap_for_training(cfg, raw_model, info, device)
    raw_model.train()

    # -- the loop -------------------------------------------------------------------------------------
    n_in = cfg.batch_size
    n_out = cfg.outlier_batch_size if out_stream is not None else 0
    meter = StepMeter(schedule.total_steps - step, n_in, info.world_size, device, warmup_steps=_WARMUP_STEPS)
    fit_to_budget = cfg.time_budget is not None and cfg.fit_schedule_to_budget
    budget = BudgetFit(cfg.time_budget, planned_total) if fit_to_budget else None
    progress = ProgressBar(info.is_main and cfg.progress, schedule.total_steps, step, f"{cfg.method}/{cfg.model}",
                           cfg.log_every)
    stopped = "completed"
    loop_start = time.perf_counter()
    loop_seconds = 0.0
    with StopSignals() as signals:
        while step < schedule.total_steps:
            t0 = time.perf_counter()
            x_in, y, x_out = _next_batch(in_stream, out_stream, device)
            if cfg.method == "disc":  # the detector's target: every inlier is "in", whatever its class
                y = torch.full_like(y, DISC_IN)
            x_in, x_out = _attack(cfg, raw_model, attack_model, x_in, y, x_out, attack_gen, device, amp)
            lr = _set_lr(optimizer, schedule.lr_at(step))
            logits, loss, ce, oe = _loss(cfg, model, x_in, y, x_out, device, amp)
            _optimiser_step(optimizer, scaler, loss)
            if state.ema is not None:
                state.ema.update_parameters(raw_model)
            meter.record(loss, ce, oe, logits[:n_in], y, started=t0)  # no host sync here
            step += 1
            loop_seconds = time.perf_counter() - loop_start

            if budget is not None and budget.refit(schedule, step, loop_seconds, meter, info, device, steps_per_epoch):
                progress.set_total(schedule.total_steps)
            progress.show(step, schedule.total_steps, meter, lr)

            # stop conditions, agreed across ranks so every rank leaves at the same step
            reason = _stop_reason(cfg, step, loop_seconds, meter, signals)
            stopping = step < schedule.total_steps and ddp.any_rank(info, reason is not None, device)

            # one log line per epoch (and for the partial epoch a run ends or stops in), then the checkpoint
            end_of_epoch = in_stream.position == steps_per_epoch
            if end_of_epoch or stopping or step == schedule.total_steps:
                epoch = in_stream.epoch + 1 if end_of_epoch else round(step / steps_per_epoch, 4)
                record = _epoch_record(meter, info, device, epoch, step, lr, seconds_before + loop_seconds,
                                       has_outliers=x_out is not None)
                if disc_val is not None and info.is_main:  # rank 0 validates (the others wait at the next collective)
                    record["disc_val"] = _disc_validate(cfg, state.delivered_model, disc_val, device)
                    if state.ema is not None:  # the trained weights too: what the average buys, side by side
                        record["disc_val_trained_weights"] = _disc_validate(cfg, raw_model, disc_val, device)
                if info.is_main:
                    append_log(run_dir, record)
                    log.info("epoch %s step %d loss %.4f acc %.4f %.0f img/s%s", record["epoch"], step, record["loss"],
                             record["train_acc"], record["images_per_s"],
                             "" if disc_val is None else " validation AUROC clean %.4f pgd %.4f" % (
                                 record["disc_val"]["auroc_clean"], record["disc_val"]["auroc_pgd"]))
                if end_of_epoch and (in_stream.epoch + 1) % cfg.save_every_epochs == 0:
                    _save(state, cfg, info, run_dir, step, seconds_before + loop_seconds, epoch=in_stream.epoch + 1)
                meter.new_epoch()
            elif cfg.save_every_steps and step % cfg.save_every_steps == 0:  # mid-epoch: --resume continues exactly
                _save(state, cfg, info, run_dir, step, seconds_before + loop_seconds)
            if stopping:
                stopped = reason or "interrupted"
                break

    # -- the end: final checkpoint, test accuracy, summary -----------------------------------------------
    progress.close()
    loop_seconds = time.perf_counter() - loop_start
    ddp.broadcast_buffers(info, raw_model)  # every rank ends with rank 0's BN statistics (the saved model)
    _save(state, cfg, info, run_dir, step, seconds_before + loop_seconds)  # last.pt of a completed run: its final model
    test_acc = None
    if cfg.eval_test and cfg.method != "disc" and info.is_main and stopped not in ("interrupted", "terminated"):
        test_acc = _test_accuracy(cfg, state.delivered_model, device)
    ddp.barrier(info)

    ips = meter.timed_images_per_s()
    result = TrainResult(
        run_dir=run_dir, step=step, total_steps=schedule.total_steps, epoch=step / steps_per_epoch, stopped=stopped,
        images_per_s=ips, all_images_per_s=ips * (n_in + n_out) / n_in, train_seconds=loop_seconds,
        test_accuracy=test_acc, step_losses=meter.step_losses(), config=cfg, model=state.delivered_model,
    )
    if info.is_main:
        write_summary(run_dir, {"event": "end", **result.to_dict(), "method": cfg.method, "model": cfg.model,
                                "threads": threads, "world_size": info.world_size, "device": str(device)})
    return result


# -- before the loop ---------------------------------------------------------------------------------------


def _resumed_config(cfg: TrainConfig) -> TrainConfig:
    """On --resume the stored config wins, except for operational knobs (see OPERATIONAL_KEYS)."""
    state = load_checkpoint(last_checkpoint_path(cfg.out))
    stored = config_from_dict(state["config"])
    model_config = resolve_model_config(dict(state["model_config"]), state["model"])  # legacy architectures
    model_kwargs = {k: v for k, v in model_config.items() if k not in ("name", "num_classes")}
    operational = {k: getattr(cfg, k) for k in OPERATIONAL_KEYS}
    if cfg.save_every_steps is None:  # not given again: the run keeps saving as often as it did
        operational["save_every_steps"] = stored.save_every_steps
    return replace(stored, model_kwargs=model_kwargs, **operational)


def _load_training_data(cfg: TrainConfig) -> tuple[ImageSet, ImageSet | None, dict[str, Any],
                                                   tuple[torch.Tensor, torch.Tensor] | None]:
    """(training images minus the calibration split [and subset], outliers or None, split record, the detector's
    validation images or None)."""
    kw = {"data_dir": cfg.data_dir, "cache_dir": cfg.cache_dir, "on_corrupt": cfg.on_corrupt}
    full = load_in_distribution(cfg.data, "train", **kw)
    if cfg.calibration_size >= len(full) // 2:
        raise ValueError(f"--calibration-size {cfg.calibration_size} is too large for {len(full)} training images "
                         f"in {full.source}; use at most {len(full) // 2 - 1}")
    train_idx, cal_idx = calibration_split(len(full), cfg.calibration_size, cfg.split_seed)
    split = {"dataset": full.source, "dataset_sha256": full.sha256, "n_total": len(full),
             "calibration_size": len(cal_idx), "seed": cfg.split_seed, "cal_indices": cal_idx.tolist()}
    if cfg.subset is not None:
        if cfg.subset > len(train_idx):
            raise ValueError(f"--subset {cfg.subset} exceeds the {len(train_idx)} training images left after calibration")
        train_idx = np.sort(np.random.default_rng(cfg.split_seed + 1).choice(train_idx, cfg.subset, replace=False))
        split["subset_indices"] = train_idx.tolist()
    split["train_size"] = len(train_idx)
    outliers = disc_val = None
    if cfg.method in USES_OUTLIERS:
        outliers = load_outliers(cfg.outliers, **kw)
        keep, held_out = outlier_holdout(outliers, cfg.outlier_holdout, cfg.split_seed)
        split["outlier_holdout"] = {"source": outliers.source, "sha256": outliers.sha256, **held_out}
        disc_val = _disc_validation_set(cfg, full, cal_idx, held_out_outliers(outliers, split["outlier_holdout"]))
        outliers = outliers.subset(keep)
    return full.subset(train_idx), outliers, split, disc_val


def _batch_streams(cfg: TrainConfig, info: ddp.DistInfo, train_set: ImageSet, outlier_set: ImageSet | None,
                   device: torch.device) -> tuple[BatchStream, BatchStream | None]:
    """Each rank's shard of every epoch; the same augmentation for inliers and outliers, so that no form
    (encoding, size) may tell one from the other."""
    pool, workers = None, 1
    cores = len(os.sched_getaffinity(0)) // info.local_world_size
    if cfg.upload_augment and device.type == "cuda" and cores > 2:
        # on a GPU, rendering the uploads on one core would bound the step; on the CPU it is a few percent
        workers = min(8, cores - 1)
        pool = _open_augment_pool(workers)
    upload = UploadAugment(p_apply=cfg.upload_augment_p, quality=(cfg.upload_quality_min, cfg.upload_quality_max),
                           p_blur=cfg.upload_blur_p) if cfg.upload_augment else None
    augment = {"crop_pad": cfg.crop_pad, "upload_augment": upload,
               "augment_pool": pool, "augment_workers": workers,
               "rank": info.rank, "world_size": info.world_size, "channels_last": cfg.channels_last}
    in_stream = BatchStream(train_set.images, train_set.labels, cfg.batch_size, seed=cfg.seed, **augment)
    out_stream = None
    if outlier_set is not None:
        out_stream = BatchStream(outlier_set.images, None, cfg.outlier_batch_size, seed=cfg.seed + 7_919, **augment)
    return in_stream, out_stream


_augment_pool: ProcessPoolExecutor | None = None


def _open_augment_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes for the upload augmentation, started clean ("spawn": no copy of CUDA state or threads)."""
    global _augment_pool
    _close_augment_pool()
    _augment_pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return _augment_pool


def _close_augment_pool() -> None:
    global _augment_pool
    if _augment_pool is not None:
        _augment_pool.shutdown(cancel_futures=True)
        _augment_pool = None


def _build_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The same initial weights on every rank (seeded here; DDP also broadcasts rank 0's weights)."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _weight_average(cfg: TrainConfig, model: nn.Module) -> AveragedModel | None:
    """The exponential moving average of `model`'s weights and BN statistics (torch's own), or None when off.
    Its first update copies the weights, so it may be made before a resume or an init_from loads them."""
    if cfg.ema_decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)


def _planned_total(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch


@dataclass
class _TrainState:
    """Everything a checkpoint holds besides the config; --resume restores all of it."""

    model: nn.Module  # the bare model (not DDP, not compiled)
    optimizer: torch.optim.Optimizer
    schedule: CosineSchedule
    in_stream: BatchStream
    out_stream: BatchStream | None
    attack_gen: torch.Generator
    scaler: torch.amp.GradScaler | None
    ema: AveragedModel | None  # the weight average (--ema-decay), or None
    data_sha256: dict[str, str | None]  # of the training and outlier files: --resume refuses other data

    @property
    def delivered_model(self) -> nn.Module:
        """The run's model: the weight average when there is one, else the trained weights."""
        return self.ema.module if self.ema is not None else self.model

    def checkpoint(self, cfg: TrainConfig, info: ddp.DistInfo, step: int, train_seconds: float) -> dict[str, Any] | None:
        """Every rank contributes its streams/RNG; rank 0 gets the full state (others: None)."""
        mine = {"in_stream": self.in_stream.state_dict(), "rng": capture_rng_state(),
                "attack_generator": self.attack_gen.get_state(),
                "out_stream": self.out_stream.state_dict() if self.out_stream is not None else None}
        per_rank = ddp.gather_to_main(info, mine)
        if not info.is_main:
            return None
        # "model" is what every reader loads (evaluate, export, guard, init_from): the delivered model
        state = {"format": CHECKPOINT_FORMAT, "model": self.delivered_model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.schedule.state_dict(), "step": step, "epoch": step / self.in_stream.batches_per_epoch,
                 "per_rank": per_rank, "model_config": self.model.model_config, "config": cfg.to_dict(),
                 "train_seconds": train_seconds, "world_size": info.world_size, "data_sha256": self.data_sha256}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:  # the weights being trained, and how many updates the average has seen
            state["trained_model"] = self.model.state_dict()
            state["ema_updates"] = int(self.ema.n_averaged)
        return state

    def restore(self, state: dict[str, Any], rank: int) -> None:
        self.model.load_state_dict(state.get("trained_model", state["model"]))
        if self.ema is not None:
            self.ema.module.load_state_dict(state["model"])
            self.ema.n_averaged.fill_(int(state.get("ema_updates", 0)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        per_rank = state["per_rank"][rank]
        self.in_stream.load_state_dict(per_rank["in_stream"])
        if self.out_stream is not None:
            self.out_stream.load_state_dict(per_rank["out_stream"])
        self.attack_gen.set_state(per_rank["attack_generator"])
        restore_rng_state(per_rank["rng"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def _resume(state: _TrainState, run_dir: Path, info: ddp.DistInfo, train_set: ImageSet,
            outlier_set: ImageSet | None) -> tuple[int, float]:
    """Load last.pt into the freshly built `state`; (step, training seconds before this invocation)."""
    ckpt = load_checkpoint(last_checkpoint_path(run_dir), map_location="cpu")
    stored_sha = ckpt.get("data_sha256", {})
    for key, s in (("train", train_set), ("outliers", outlier_set)):
        if s is not None and stored_sha.get(key) not in (None, s.sha256):
            raise ValueError(f"--resume: {key} data {s.source} changed since the checkpoint (sha256 differs)")
    if int(ckpt.get("world_size", 1)) != info.world_size:
        raise ValueError(f"--resume: the checkpoint was written by {ckpt.get('world_size', 1)} process(es), "
                         f"this launch has {info.world_size}; resume with the same number of processes")
    state.restore(ckpt, info.rank)
    step = int(ckpt["step"])
    log.info("resumed %s at step %d (epoch %.2f)", run_dir, step, step / state.in_stream.batches_per_epoch)
    return step, float(ckpt.get("train_seconds", 0.0))


def _wrap_for_training(cfg: TrainConfig, raw_model: nn.Module, info: ddp.DistInfo,
                       device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(model for the training forward: DDP and/or compiled; model for the attack: compiled at most)."""
    attack_model: nn.Module = torch.compile(raw_model) if cfg.compile else raw_model
    model: nn.Module = raw_model
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model, attack_model


# -- one step -----------------------------------------------------------------------------------------------


def _next_batch(in_stream: BatchStream, out_stream: BatchStream | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x_in, y = in_stream.next()
    x_in, y = x_in.to(device, non_blocking=True), y.to(device, non_blocking=True)
    x_out = out_stream.next()[0].to(device, non_blocking=True) if out_stream is not None else None
    return x_in, y, x_out


def _attack(cfg: TrainConfig, raw_model: nn.Module, attack_model: nn.Module, x_in: torch.Tensor, y: torch.Tensor,
            x_out: torch.Tensor | None, generator: torch.Generator, device: torch.device,
            amp: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PGD on the inliers (adv/aoe/aloe: raise their CE) and on the outliers (aloe: raise their OE loss, i.e.
    push them toward confident), on the bare model: no DDP gradient sync for input gradients."""
    if cfg.method not in ATTACKS_INLIERS and cfg.method not in ATTACKS_OUTLIERS:
        return x_in, x_out
    pgd = {"eps": cfg.eps, "steps": cfg.attack_steps, "step_size": cfg.step_size, "random_start": cfg.random_start,
           "generator": generator}
    with attack_bn(raw_model, cfg.attack_bn), autocast(device, amp):
        if cfg.method == "disc":  # the detector: inliers pushed toward "outlier", outliers toward "in"
            x_in = pgd_linf(lambda z: ce_per_sample(attack_model(z), y), x_in, **pgd)
            out_target = torch.full((x_out.shape[0],), DISC_OUT, dtype=torch.long, device=x_out.device)
            x_out = pgd_linf(lambda z: ce_per_sample(attack_model(z), out_target), x_out, **pgd)
            return x_in, x_out
        if cfg.method in ATTACKS_INLIERS:
            x_in = pgd_linf(lambda z: ce_per_sample(attack_model(z), y), x_in, **pgd)
        if cfg.method in ATTACKS_OUTLIERS:
            x_out = pgd_linf(lambda z: oe_loss_per_sample(attack_model(z)), x_out, **pgd)
    return x_in, x_out


def _param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict[str, Any]]:
    """SGD parameter groups. Weight decay on every trained parameter, BN and biases included, as in the
    reference code; with `norm_bias_lr_scale` != 1 the BatchNorm shifts get their own group, at lr x scale
    and weight decay / scale (`_set_lr` applies the group's `lr_scale`). Frozen parameters are left out."""
    decay = cfg.resolved_weight_decay()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if cfg.norm_bias_lr_scale == 1.0:
        return [{"params": [p for _, p in trained], "weight_decay": decay, "lr_scale": 1.0}]
    norm_biases = {f"{name}.bias" for name, m in model.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
    scale = cfg.norm_bias_lr_scale
    return [{"params": [p for n, p in trained if n not in norm_biases], "weight_decay": decay, "lr_scale": 1.0},
            {"params": [p for n, p in trained if n in norm_biases], "weight_decay": decay / scale, "lr_scale": scale}]


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def _loss(cfg: TrainConfig, model: nn.Module, x_in: torch.Tensor, y: torch.Tensor, x_out: torch.Tensor | None,
          device: torch.device, amp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, loss, ce, oe): one joint forward over [inliers; outliers], loss = CE + λ·OE (CE alone without
    outliers; oe is then 0). For `disc`, oe is the outliers' cross-entropy to the "outlier" output."""
    n_in = cfg.batch_size
    inputs = torch.cat([x_in, x_out]) if x_out is not None else x_in
    with autocast(device, amp):
        logits = model(inputs)
    ce = F.cross_entropy(logits[:n_in].float(), y, label_smoothing=cfg.label_smoothing)
    if cfg.method == "disc":
        out_target = torch.full((len(x_out),), DISC_OUT, dtype=torch.long, device=y.device)
        oe = F.cross_entropy(logits[n_in:].float(), out_target, label_smoothing=cfg.label_smoothing)
    else:
        oe = oe_loss(logits[n_in:]) if x_out is not None else torch.zeros((), device=device)
    loss = ce + cfg.lambda_oe * oe if x_out is not None else ce
    return logits, loss, ce, oe


def _optimiser_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


# -- bookkeeping ------------------------------------------------------------------------------------------


def _stop_reason(cfg: TrainConfig, step: int, loop_seconds: float, meter: StepMeter, signals: StopSignals) -> str | None:
    """This rank's reason to stop after this step (None: go on). The time budget stops before a step that
    would overrun it."""
    if cfg.stop_at_step is not None and step >= cfg.stop_at_step:
        return "stop_at_step"
    if cfg.time_budget is not None and loop_seconds + meter.mean_step_seconds() > cfg.time_budget:
        return "time_budget"
    return signals.received


def _epoch_record(meter: StepMeter, info: ddp.DistInfo, device: torch.device, epoch: int | float, step: int, lr: float,
                  train_seconds: float, has_outliers: bool) -> dict[str, Any]:
    """The epoch's log.jsonl line, averaged over every rank's steps (a collective: every rank calls it)."""
    totals = ddp.sum_across_ranks(info, meter.sums.tolist() + [meter.epoch_steps], device)
    steps_all = max(1.0, totals[4])
    return {"epoch": epoch, "step": step, "loss": totals[0] / steps_all, "ce": totals[1] / steps_all,
            "oe": totals[2] / steps_all if has_outliers else None, "train_acc": totals[3] / (steps_all * meter.n_in),
            "images_per_s": meter.epoch_images_per_s(), "lr": lr, "time": round(train_seconds, 3),
            "epoch_seconds": round(meter.epoch_seconds, 3)}


def _save(state: _TrainState, cfg: TrainConfig, info: ddp.DistInfo, run_dir: Path, step: int, train_seconds: float,
          epoch: int | None = None) -> None:
    """checkpoints/last.pt (and epoch_XXX.pt with --keep-epoch-checkpoints); a collective: every rank calls it."""
    ckpt = state.checkpoint(cfg, info, step, train_seconds)
    if ckpt is not None:
        save_last_checkpoint(run_dir, ckpt, epoch_tag=epoch if cfg.keep_epoch_checkpoints else None)


# -- the detector's validation (catastrophic-overfitting watch) ------------------------------------------------

_DISC_VAL_ATTACK_STEPS = 10


def _disc_validation_set(cfg: TrainConfig, full: ImageSet, cal: np.ndarray,
                         held: ImageSet) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(calibration-split images of `full`, held-out-class outliers `held`), `disc_val_samples` of each, seeded:
    validation data only (neither is trained on), for `disc` runs; None otherwise."""
    if cfg.method != "disc" or cfg.disc_val_samples <= 0:
        return None
    rng = np.random.default_rng(cfg.split_seed + 3)
    if len(cal) == 0 or len(held) == 0:
        log.warning("disc validation off: it needs a calibration split and held-out outlier classes")
        return None
    cal = np.sort(rng.choice(cal, min(cfg.disc_val_samples, len(cal)), replace=False))
    out = np.sort(rng.choice(len(held), min(cfg.disc_val_samples, len(held)), replace=False))
    return to_tensor(full.images[cal]), to_tensor(held.images[out])


def _disc_validate(cfg: TrainConfig, model: nn.Module, val: tuple[torch.Tensor, torch.Tensor],
                   device: torch.device) -> dict[str, float]:
    """AUROC of the detector's margin (logit in - logit out), clean and under PGD-10 (step ε/4) at the training ε
    on both sides, in eval mode. A clean AUROC that holds while the PGD one collapses is catastrophic overfitting."""
    from .ood_metrics import ood_metrics

    was_training = model.training
    model.eval()
    margins = {}
    try:
        for name, x, direction in (("in", val[0], -1.0), ("out", val[1], 1.0)):
            clean, adv = [], []
            for start in range(0, len(x), 250):
                xb = x[start:start + 250].to(device)
                margin = lambda z: detector_margin(model(z).float())  # noqa: E731
                with torch.no_grad():
                    clean.append(margin(xb))
                xa = pgd_linf(lambda z: direction * margin(z), xb, eps=cfg.eps, steps=_DISC_VAL_ATTACK_STEPS,
                              step_size=cfg.eps / 4, random_start=False)
                with torch.no_grad():
                    adv.append(margin(xa))
            margins[name] = (torch.cat(clean).cpu().numpy(), torch.cat(adv).cpu().numpy())
    finally:
        model.train(was_training)
    return {"auroc_clean": ood_metrics(margins["in"][0], margins["out"][0])["auroc"],
            "auroc_pgd": ood_metrics(margins["in"][1], margins["out"][1])["auroc"],
            "n_in": int(len(val[0])), "n_out": int(len(val[1])), "attack": f"PGD-{_DISC_VAL_ATTACK_STEPS} both sides"}


# -- after the loop -------------------------------------------------------------------------------------


def _test_accuracy(cfg: TrainConfig, model: nn.Module, device: torch.device) -> float | None:
    try:
        test = load_in_distribution(cfg.data, "test", data_dir=cfg.data_dir, cache_dir=cfg.cache_dir,
                                    on_corrupt=cfg.on_corrupt)
        return accuracy(model, test.images, test.labels, device, channels_last=cfg.channels_last)
    except ValueError as exc:  # DataError: no test split for this dataset
        log.warning("no test accuracy: %s", exc)
        return None
