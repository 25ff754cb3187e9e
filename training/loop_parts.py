"""Pieces of the training loop that are not the loop: the learning-rate schedule and its fit to a time
budget, the step meter (losses, images/s), the progress bar, stop signals, device and precision, BN
behaviour during the training attack, CPU contention, the process's RNG state (for checkpoints), accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as ddp
from .data import iterate_batches

log = logging.getLogger(__name__)


class CosineSchedule:
    """lr(step): optional linear warm-up, then cosine from lr to min_lr over `total_steps` (per iteration).

    `refit(step, total)` changes the end point mid-run (time budgets) without a jump in the learning
    rate: the cosine progress reached at `step` is kept and the rest is spread over the new remainder.
    Without refits, progress = (step - warmup) / (total - warmup), exactly the paper's schedule.
    """

    def __init__(self, lr: float, min_lr: float, total_steps: int, warmup_steps: int = 0):
        self.lr, self.min_lr, self.total_steps, self.warmup_steps = lr, min_lr, total_steps, warmup_steps
        self.anchor_step, self.anchor_progress = warmup_steps, 0.0  # progress at anchor_step

    def progress(self, step: int) -> float:
        if step <= self.anchor_step:  # the past (only reported): linear up to the anchor
            done = step - self.warmup_steps
            return self.anchor_progress * max(0, done) / max(1, self.anchor_step - self.warmup_steps)
        span = max(1, self.total_steps - self.anchor_step)
        return min(1.0, self.anchor_progress + (1.0 - self.anchor_progress) * (step - self.anchor_step) / span)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = self.progress(step)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def refit(self, step: int, total_steps: int) -> None:
        if step > self.anchor_step:
            self.anchor_step, self.anchor_progress = step, self.progress(step)
        self.total_steps = max(total_steps, step + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "min_lr": self.min_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "anchor_step": self.anchor_step, "anchor_progress": self.anchor_progress}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.lr, self.min_lr, self.total_steps, self.warmup_steps = s["lr"], s["min_lr"], s["total_steps"], s["warmup_steps"]
        self.anchor_step = s.get("anchor_step", self.warmup_steps)
        self.anchor_progress = s.get("anchor_progress", 0.0)


class StepMeter:
    """A run's per-step losses (this invocation), the epoch's sums for its log line (kept on the device: no
    host sync per step) and step times for images/s (the first `warmup_steps` excluded)."""

    def __init__(self, max_steps: int, n_in: int, world_size: int, device: torch.device, warmup_steps: int = 0):
        self.n_in, self.world_size, self.warmup_steps = n_in, world_size, warmup_steps
        self.losses = torch.zeros(max(1, max_steps), dtype=torch.float32, device=device)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, ce, oe, correct — this epoch
        self.steps = 0  # this invocation
        self.epoch_steps, self.epoch_seconds = 0, 0.0
        self.timed_steps, self.timed_seconds = 0, 0.0

    def record(self, loss: torch.Tensor, ce: torch.Tensor, oe: torch.Tensor, logits_in: torch.Tensor,
               y: torch.Tensor, started: float) -> None:
        correct = (logits_in.argmax(1) == y).sum()
        self.sums += torch.stack([loss.detach().double(), ce.detach().double(), oe.detach().double(), correct.double()])
        self.losses[self.steps] = loss.detach().float()
        self.steps += 1
        self.epoch_steps += 1
        dt = time.perf_counter() - started
        self.epoch_seconds += dt
        if self.steps > self.warmup_steps:
            self.timed_seconds += dt
            self.timed_steps += 1

    def mean_step_seconds(self) -> float:
        return self.timed_seconds / max(1, self.timed_steps)

    def epoch_images_per_s(self) -> float:
        return self.n_in * self.world_size * self.epoch_steps / max(self.epoch_seconds, 1e-9)

    def timed_images_per_s(self) -> float:
        return self.n_in * self.world_size * self.timed_steps / self.timed_seconds if self.timed_steps else float("nan")

    def new_epoch(self) -> None:
        self.sums.zero_()
        self.epoch_steps, self.epoch_seconds = 0, 0.0

    def step_losses(self) -> list[float]:
        return self.losses[: self.steps].tolist()


class BudgetFit:
    """--time-budget with --fit-schedule: once the step time is known (`probe_steps` timed steps, or 10% of
    the budget), fit the cosine schedule to the time left, then re-fit every `refit_every` steps from the
    recent step time, so the learning rate reaches ~min_lr when the budget ends."""

    probe_steps = 20  # timed steps before the first fit
    refit_every = 50  # then re-fit every this many steps: a shared machine's speed drifts

    def __init__(self, time_budget: float, planned_total: int):
        self.time_budget, self.planned_total = time_budget, planned_total
        self.last_fit: tuple[int, float] | None = None  # (step, loop seconds) of the last fit

    def refit(self, schedule: CosineSchedule, step: int, loop_seconds: float, meter: StepMeter, info: ddp.DistInfo,
              device: torch.device, steps_per_epoch: int) -> bool:
        """True when the schedule was (re-)fitted at this step."""
        probed = meter.timed_steps >= self.probe_steps or (meter.timed_steps >= 3 and loop_seconds > 0.1 * self.time_budget)
        if not probed or (self.last_fit is not None and step - self.last_fit[0] < self.refit_every):
            return False
        if self.last_fit is None:
            per_step = meter.timed_seconds / meter.timed_steps
        else:
            per_step = (loop_seconds - self.last_fit[1]) / (step - self.last_fit[0])
        remaining = self.time_budget - loop_seconds
        fitted = min(self.planned_total, step + max(1, int(0.97 * remaining / per_step)))
        fitted = ddp.broadcast_int(info, fitted, device)
        if fitted != schedule.total_steps:
            log.log(logging.INFO if self.last_fit is None else logging.DEBUG,
                    "time budget %.0fs: %.3fs/step -> schedule fitted to %d steps (%.2f epochs)",
                    self.time_budget, per_step, fitted, fitted / steps_per_epoch)
        schedule.refit(step, fitted)
        self.last_fit = (step, loop_seconds)
        return True


class ProgressBar:
    """tqdm on stderr (when enabled), updated every `log_every` steps, at the end, and every 2 s when steps
    are slow. Each update reads the epoch's sums from the device (a host sync)."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str, log_every: int):
        self.bar = None
        self.log_every = log_every
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True,
                            desc=desc, mininterval=1.0)
        self.shown = time.perf_counter()

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total

    def show(self, step: int, total: int, meter: StepMeter, lr: float) -> None:
        if self.bar is None or not (step % self.log_every == 0 or step == total
                                    or time.perf_counter() - self.shown > 2.0):
            return
        self.shown = time.perf_counter()
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{meter.sums[0].item() / meter.epoch_steps:.3f}",
                             acc=f"{meter.sums[3].item() / (meter.epoch_steps * meter.n_in):.3f}",
                             img_s=f"{meter.epoch_images_per_s():.0f}", lr=f"{lr:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopSignals:
    """Ctrl-C / SIGTERM set a flag the loop checks after each step; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = "interrupted" if signum == signal.SIGINT else "terminated"
        log.warning("%s: finishing this step, saving a checkpoint (Ctrl-C again to abort)", signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def warn_if_cpu_is_contended(threads: int, device: torch.device) -> None:
    """Several OpenMP threads that spin-wait for each other starve when other processes share the cores:
    on the shared 2-core machine this was built on, 2 spinning threads ran 5x slower than 1 under load.
    `oodguard train` sets a short GOMP_SPINCOUNT (unless OpenMP waiting is configured) before importing
    torch, which avoids most of it."""
    if device.type != "cpu" or threads < 2 or not hasattr(os, "getloadavg"):
        return
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" or "GOMP_SPINCOUNT" in os.environ:
        return
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if load > cores - 0.5:
        log.warning("load average %.1f on %d cores and %d spinning OpenMP threads: set GOMP_SPINCOUNT=10000 or "
                    "OMP_WAIT_POLICY=PASSIVE (before starting Python), or use --threads 1; each is often several "
                    "times faster on a busy CPU", load, cores,
                    threads)


def resolve_device(name: str, info: ddp.DistInfo | None = None) -> torch.device:
    """`auto` (this rank's GPU when CUDA is there, else the CPU), `cpu`, `cuda` or `cuda:N`; else ValueError."""
    if name == "auto":
        rank = info.local_rank if info is not None else 0
        return torch.device(f"cuda:{rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def attack_bn(model: nn.Module, mode: str) -> Iterator[None]:
    """BN behaviour while the training attack runs (see TrainConfig.attack_bn)."""
    if mode == "train":  # the reference: batch statistics, running statistics updated by the attack batch
        yield
    elif mode == "eval":
        model.eval()
        try:
            yield
        finally:
            model.train()
    else:  # "frozen": batch statistics, running statistics restored afterwards
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
        try:
            yield
        finally:
            for m, (mean, var, n) in zip(bns, saved):
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)


# -- RNG state as tensors / plain containers (weights_only-loadable) ----------------------------------


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# -- evaluation -------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device,
             batch_size: int = 500, channels_last: bool = False) -> float:
    """Top-1 accuracy of `model` in eval mode on uint8 HWC images (restores the model's mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start, x in iterate_batches(images, batch_size):
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pred = model(x).argmax(1).cpu().numpy()
        correct += int((pred == labels[start:start + len(pred)]).sum())
    model.train(was_training)
    return correct / max(1, len(images))

