"""The training loop for all five methods (msp, oe, adv, aoe, aloe), read top to bottom in `train()`.

One step, following the reference ALOE code (see ../shared/ALOE.md) without its wasted clean forward:

    x_in, y   <- next in-distribution batch (augmented)          x_out <- next outlier batch (augmented)
    adv/aoe/aloe: x_in  <- PGD maximising CE(f(x_in), y)          (model in train mode, like the reference)
    aloe:         x_out <- PGD maximising L_OE(f(x_out))           (push outliers toward confident)
    logits <- f([x_in; x_out])                                     (one joint forward: BN sees both)
    loss   <- CE(logits_in, y) + λ·L_OE(logits_out)                (the OE term only for oe/aoe/aloe)
    SGD nesterov step, cosine learning rate per iteration

Stopping: the schedule ends, `--stop-at-step`, `--time-budget`, or Ctrl-C / SIGTERM — each saves
`checkpoints/last.pt` first. `--resume` restores model, optimiser, schedule, data-stream positions and
every RNG, so N/2 + N/2 steps give bit-identical weights to N steps.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as ddp
from .attacks import pgd_linf
from .config import ATTACKS_INLIERS, ATTACKS_OUTLIERS, USES_OUTLIERS, TrainConfig, config_from_dict
from .augment import UploadAugment
from .data import BatchStream, ImageSet, calibration_split, load_in_distribution, load_outliers, outlier_holdout
from .loop_parts import (
    CosineSchedule, StopSignals, accuracy, attack_bn, autocast, capture_rng_state, resolve_device, restore_rng_state,
    warn_if_cpu_is_contended,
)
from .losses import ce_per_sample, oe_loss, oe_loss_per_sample
from .architectures import create_model
from .run_dir import (
    CHECKPOINT_FORMAT, CONFIG_FILE, LOG_FILE, SPLIT_FILE, SUMMARY_FILE, check_run_dir, code_version, environment_info,
    last_checkpoint_path, load_checkpoint, load_initial_weights, prepare_run_dir, resolve_model_config,
    save_checkpoint, write_json_atomic,
)

log = logging.getLogger(__name__)

_WARMUP_STEPS = 5  # steps excluded from images/s (allocator and oneDNN warm-up)
_PROBE_STEPS = 20  # timed steps before fitting the schedule to a time budget
_REFIT_EVERY = 50  # then re-fit every this many steps: a shared machine's speed drifts
# Knobs that may change on --resume without breaking bit-for-bit continuation.
OPERATIONAL_KEYS = ("out", "resume", "overwrite", "time_budget", "stop_at_step", "threads", "progress",
                    "log_every", "eval_test", "device", "data_dir", "cache_dir", "keep_epoch_checkpoints")


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
    model: nn.Module | None = None  # the trained model (unwrapped, train mode), as in last.pt


    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("step_losses", "config", "model")}
        d["run_dir"] = str(self.run_dir)
        return d


def _load_training_data(cfg: TrainConfig, info: ddp.DistInfo) -> tuple[ImageSet, ImageSet | None, dict[str, Any]]:
    """(training images minus the calibration split [and subset], outliers or None, split record)."""
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
    outliers = None
    if cfg.method in USES_OUTLIERS:
        outliers = load_outliers(cfg.outliers, **kw)
        keep, held_out = outlier_holdout(outliers, cfg.outlier_holdout, cfg.split_seed)
        split["outlier_holdout"] = {"source": outliers.source, "sha256": outliers.sha256, **held_out}
        outliers = outliers.subset(keep)
    return full.subset(train_idx), outliers, split


def _planned_total(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch


def _resumed_config(cfg: TrainConfig) -> TrainConfig:
    """On --resume the stored config wins, except for operational knobs (see OPERATIONAL_KEYS)."""
    state = load_checkpoint(last_checkpoint_path(cfg.out))
    stored = config_from_dict(state["config"])
    model_config = resolve_model_config(dict(state["model_config"]), state["model"])  # legacy architectures
    model_kwargs = {k: v for k, v in model_config.items() if k not in ("name", "num_classes")}
    return replace(stored, model_kwargs=model_kwargs, **{k: getattr(cfg, k) for k in OPERATIONAL_KEYS})


def _append_log(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


# -- the loop ---------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> TrainResult:
    cfg.validate()
    if cfg.resume:
        cfg = _resumed_config(cfg)
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    info = ddp.init_distributed(use_cuda)
    try:
        return _train(cfg, info)
    finally:
        ddp.cleanup(info)


def _train(cfg: TrainConfig, info: ddp.DistInfo) -> TrainResult:
    device = resolve_device(cfg.device, info)
    threads = cfg.threads or max(1, len(os.sched_getaffinity(0)) // info.local_world_size)
    torch.set_num_threads(threads)
    warn_if_cpu_is_contended(threads, device)
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    run_dir = Path(cfg.out)
    if info.is_main:  # only rank 0: the others might see the directory rank 0 has just created
        check_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite)

    # data: training split (calibration images held out), outliers — before anything is written
    train_set, outlier_set, split = _load_training_data(cfg, info)
    if info.is_main:
        prepare_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    ddp.barrier(info)
    num_classes = len(train_set.classes) or int(train_set.labels.max()) + 1
    # the same augmentation for inliers and outliers: no form (encoding, size) may tell one from the other
    augment = {"crop_pad": cfg.crop_pad, "upload_augment": UploadAugment() if cfg.upload_augment else None,
               "rank": info.rank, "world_size": info.world_size, "channels_last": cfg.channels_last}
    in_stream = BatchStream(train_set.images, train_set.labels, cfg.batch_size, seed=cfg.seed, **augment)
    out_stream = None
    if outlier_set is not None:
        out_stream = BatchStream(outlier_set.images, None, cfg.outlier_batch_size, seed=cfg.seed + 7_919, **augment)

    # model, optimiser, schedule (same init on every rank; DDP also broadcasts rank 0's weights)
    torch.manual_seed(cfg.seed)
    raw_model = create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs).to(device)
    if cfg.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    # weight decay on every parameter, BN and biases included, as in the reference code
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.resolved_weight_decay())
    schedule = CosineSchedule(cfg.lr, cfg.min_lr, _planned_total(cfg, in_stream.batches_per_epoch), cfg.warmup_steps)
    attack_gen = torch.Generator(device=device).manual_seed(cfg.seed * 31 + info.rank)
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" and not torch.cuda.is_bf16_supported() else None
    step, train_seconds_before = 0, 0.0
    fit_to_budget = cfg.time_budget is not None and cfg.fit_schedule_to_budget
    planned_total = schedule.total_steps  # the epochs/max-steps plan: a budget fit never goes beyond it

    # data lineage: the full training file (the calibration split indexes into it) and the outlier file
    data_lineage = {"in_distribution": {**train_set.describe(), "n": split["n_total"]},
                    "outliers": outlier_set.describe() if outlier_set is not None else None}
    if cfg.resume:
        state = load_checkpoint(last_checkpoint_path(run_dir), map_location="cpu")
        stored_sha = state.get("data_sha256", {})
        for key, s in (("train", train_set), ("outliers", outlier_set)):
            if s is not None and stored_sha.get(key) not in (None, s.sha256):
                raise ValueError(f"--resume: {key} data {s.source} changed since the checkpoint (sha256 differs)")
        if int(state.get("world_size", 1)) != info.world_size:
            raise ValueError(f"--resume: the checkpoint was written by {state.get('world_size', 1)} process(es), "
                             f"this launch has {info.world_size}; resume with the same number of processes")
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        per_rank = state["per_rank"][info.rank]
        in_stream.load_state_dict(per_rank["in_stream"])
        if out_stream is not None:
            out_stream.load_state_dict(per_rank["out_stream"])
        attack_gen.set_state(per_rank["attack_generator"])
        restore_rng_state(per_rank["rng"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, train_seconds_before = int(state["step"]), float(state.get("train_seconds", 0.0))
        planned_total = max(planned_total, schedule.total_steps)
        log.info("resumed %s at step %d (epoch %.2f)", run_dir, step, step / in_stream.batches_per_epoch)
    else:
        if cfg.init_from:  # fine-tuning: weights only; optimiser, schedule and data order start fresh
            data_lineage["init_from"] = load_initial_weights(raw_model, cfg.init_from, split)
            log.info("initialised weights from %s", data_lineage["init_from"]["checkpoint"])
    if not cfg.resume and info.is_main:
        write_json_atomic(run_dir / CONFIG_FILE, {
            "train": cfg.to_dict(), "model_config": raw_model.model_config, "num_classes": num_classes,
            "classes": train_set.classes, "lineage": data_lineage, "code_version": code_version(),
            "environment": environment_info(device, threads, info, amp),
        })
        write_json_atomic(run_dir / SPLIT_FILE, split, indent=None)

    attack_model: nn.Module = torch.compile(raw_model) if cfg.compile else raw_model
    model: nn.Module = raw_model
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    raw_model.train()

    def make_checkpoint() -> dict[str, Any] | None:
        """Every rank contributes its streams/RNG; rank 0 gets the full state (others: None)."""
        mine = {"in_stream": in_stream.state_dict(), "rng": capture_rng_state(),
                "attack_generator": attack_gen.get_state(),
                "out_stream": out_stream.state_dict() if out_stream is not None else None}
        per_rank = ddp.gather_to_main(info, mine)
        if not info.is_main:
            return None
        state = {"format": CHECKPOINT_FORMAT, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": schedule.state_dict(), "step": step, "epoch": step / in_stream.batches_per_epoch,
                 "per_rank": per_rank, "model_config": raw_model.model_config, "config": cfg.to_dict(),
                 "train_seconds": train_seconds_before + loop_seconds, "world_size": info.world_size,
                 "data_sha256": {"train": train_set.sha256, "outliers": outlier_set.sha256 if outlier_set else None}}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    def save(epoch_tag: int | None = None) -> None:
        state = make_checkpoint()
        if state is None:
            return
        path = last_checkpoint_path(run_dir)
        save_checkpoint(path, state)
        if epoch_tag is not None and cfg.keep_epoch_checkpoints:
            tagged = path.with_name(f"epoch_{epoch_tag:03d}.pt")
            tagged.unlink(missing_ok=True)
            os.link(path, tagged)  # last.pt is later replaced by a new inode, so this copy stays intact

    # -- loop ---------------------------------------------------------------------------------------------
    spe = in_stream.batches_per_epoch
    n_in = cfg.batch_size
    n_out = cfg.outlier_batch_size if out_stream is not None else 0
    losses_this_run = torch.zeros(max(1, schedule.total_steps - step), dtype=torch.float32, device=device)
    first_step = step
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, ce sum, oe sum, correct — for the epoch line
    epoch_steps, epoch_seconds, loop_seconds, timed_seconds, timed_steps = 0, 0.0, 0.0, 0.0, 0
    stopped = "completed"
    progress = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=schedule.total_steps, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True,
                        desc=f"{cfg.method}/{cfg.model}", mininterval=1.0)
    last_fit: tuple[int, float] | None = None  # (step, loop seconds) of the last budget fit
    loop_start = progress_shown = time.perf_counter()
    with StopSignals() as signals:
        while step < schedule.total_steps:
            t0 = time.perf_counter()
            x_in, y = in_stream.next()
            x_in, y = x_in.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x_out = out_stream.next()[0].to(device, non_blocking=True) if out_stream is not None else None

            # 1. attacks (on the bare model: no DDP gradient sync for input gradients)
            if cfg.method in ATTACKS_INLIERS or cfg.method in ATTACKS_OUTLIERS:
                with attack_bn(raw_model, cfg.attack_bn), autocast(device, amp):
                    if cfg.method in ATTACKS_INLIERS:
                        x_in = pgd_linf(lambda z: ce_per_sample(attack_model(z), y), x_in, eps=cfg.eps,
                                        steps=cfg.attack_steps, step_size=cfg.step_size,
                                        random_start=cfg.random_start, generator=attack_gen)
                    if cfg.method in ATTACKS_OUTLIERS:
                        x_out = pgd_linf(lambda z: oe_loss_per_sample(attack_model(z)), x_out, eps=cfg.eps,
                                         steps=cfg.attack_steps, step_size=cfg.step_size,
                                         random_start=cfg.random_start, generator=attack_gen)

            # 2. one joint forward over [inliers; outliers], CE + λ·OE, SGD step
            lr = schedule.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs = torch.cat([x_in, x_out]) if x_out is not None else x_in
            with autocast(device, amp):
                logits = model(inputs)
            ce = F.cross_entropy(logits[:n_in].float(), y, label_smoothing=cfg.label_smoothing)
            oe = oe_loss(logits[n_in:]) if x_out is not None else torch.zeros((), device=device)
            loss = ce + cfg.lambda_oe * oe if x_out is not None else ce
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()

            # 3. book-keeping (no host sync here except on log steps)
            correct = (logits[:n_in].argmax(1) == y).sum()
            stats += torch.stack([loss.detach().double(), ce.detach().double(), oe.detach().double(), correct.double()])
            losses_this_run[step - first_step] = loss.detach().float()
            step += 1
            epoch_steps += 1
            dt = time.perf_counter() - t0
            epoch_seconds += dt
            if step - first_step > _WARMUP_STEPS:
                timed_seconds += dt
                timed_steps += 1
            loop_seconds = time.perf_counter() - loop_start

            # fit the cosine schedule to the time budget once the step time is known, then keep re-fitting
            # from the recent step time, so the learning rate reaches ~min_lr when the budget ends
            probed = fit_to_budget and (timed_steps >= _PROBE_STEPS
                                        or (timed_steps >= 3 and loop_seconds > 0.1 * cfg.time_budget))
            if probed and (last_fit is None or step - last_fit[0] >= _REFIT_EVERY):
                if last_fit is None:
                    per_step = timed_seconds / timed_steps
                else:
                    per_step = (loop_seconds - last_fit[1]) / (step - last_fit[0])
                remaining = cfg.time_budget - loop_seconds
                fitted = min(planned_total, step + max(1, int(0.97 * remaining / per_step)))
                fitted = ddp.broadcast_int(info, fitted, device)
                if fitted != schedule.total_steps:
                    log.log(logging.INFO if last_fit is None else logging.DEBUG,
                            "time budget %.0fs: %.3fs/step -> schedule fitted to %d steps (%.2f epochs)",
                            cfg.time_budget, per_step, fitted, fitted / spe)
                schedule.refit(step, fitted)
                last_fit = (step, loop_seconds)
                if progress is not None:
                    progress.total = schedule.total_steps

            if progress is not None and (step % cfg.log_every == 0 or step == schedule.total_steps
                                         or time.perf_counter() - progress_shown > 2.0):  # slow steps: by time
                progress_shown = time.perf_counter()
                progress.update(step - progress.n)
                ips = n_in * info.world_size * epoch_steps / max(epoch_seconds, 1e-9)
                progress.set_postfix(loss=f"{stats[0].item() / epoch_steps:.3f}",
                                     acc=f"{stats[3].item() / (epoch_steps * n_in):.3f}", img_s=f"{ips:.0f}",
                                     lr=f"{lr:.4f}", refresh=False)

            # stop conditions, agreed across ranks so every rank leaves at the same step
            reason = None
            if cfg.stop_at_step is not None and step >= cfg.stop_at_step:
                reason = "stop_at_step"
            elif cfg.time_budget is not None and loop_seconds + (timed_seconds / max(1, timed_steps)) > cfg.time_budget:
                reason = "time_budget"
            elif signals.received:
                reason = signals.received
            stopping = step < schedule.total_steps and ddp.any_rank(info, reason is not None, device)

            # one log line per epoch (and for the partial epoch a run ends or stops in)
            end_of_epoch = in_stream.position == spe
            if end_of_epoch or stopping or step == schedule.total_steps:
                totals = ddp.sum_across_ranks(info, stats.tolist() + [epoch_steps], device)
                steps_all = max(1.0, totals[4])
                record = {"epoch": in_stream.epoch + 1 if end_of_epoch else round(step / spe, 4), "step": step,
                          "loss": totals[0] / steps_all, "ce": totals[1] / steps_all,
                          "oe": totals[2] / steps_all if x_out is not None else None,
                          "train_acc": totals[3] / (steps_all * n_in),
                          "images_per_s": n_in * info.world_size * epoch_steps / max(epoch_seconds, 1e-9),
                          "lr": lr, "time": round(train_seconds_before + loop_seconds, 3),
                          "epoch_seconds": round(epoch_seconds, 3)}
                if info.is_main:
                    _append_log(run_dir, record)
                    log.info("epoch %s step %d loss %.4f acc %.4f %.0f img/s", record["epoch"], step, record["loss"],
                             record["train_acc"], record["images_per_s"])
                if end_of_epoch and (in_stream.epoch + 1) % cfg.save_every_epochs == 0:
                    save(epoch_tag=in_stream.epoch + 1)
                stats.zero_()
                epoch_steps, epoch_seconds = 0, 0.0
            if stopping:
                stopped = reason or "interrupted"
                break

    if progress is not None:
        progress.close()
    loop_seconds = time.perf_counter() - loop_start
    ddp.broadcast_buffers(info, raw_model)  # every rank ends with rank 0's BN statistics (the saved model)
    save()  # the final / interrupted state (last.pt of a completed run is its final model)

    test_acc = None
    if cfg.eval_test and info.is_main and stopped not in ("interrupted", "terminated"):
        try:
            test = load_in_distribution(cfg.data, "test", data_dir=cfg.data_dir, cache_dir=cfg.cache_dir,
                                        on_corrupt=cfg.on_corrupt)
            test_acc = accuracy(raw_model, test.images, test.labels, device, channels_last=cfg.channels_last)
        except ValueError as exc:  # DataError: no test split for this dataset
            log.warning("no test accuracy: %s", exc)
    ddp.barrier(info)

    ips = n_in * info.world_size * timed_steps / timed_seconds if timed_steps else float("nan")
    result = TrainResult(
        run_dir=run_dir, step=step, total_steps=schedule.total_steps, epoch=step / spe, stopped=stopped,
        images_per_s=ips, all_images_per_s=ips * (n_in + n_out) / n_in, train_seconds=loop_seconds,
        test_accuracy=test_acc, step_losses=losses_this_run[: step - first_step].tolist(), config=cfg,
        model=raw_model,
    )
    if info.is_main:
        summary = {"event": "end", **result.to_dict(), "method": cfg.method, "model": cfg.model,
                   "threads": threads, "world_size": info.world_size, "device": str(device)}
        _append_log(run_dir, summary)
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
    return result
