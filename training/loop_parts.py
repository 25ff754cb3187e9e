"""Pieces of the training loop that are not the loop: the learning-rate schedule, stop signals, device
and precision, BN behaviour during the training attack, CPU contention, the process's RNG state (for
checkpoints), accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
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

