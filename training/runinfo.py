"""What a run records about itself: the run directory's lifecycle, code version and environment."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CHECKPOINT_DIR, CONFIG_FILE, LOG_FILE, SPLIT_FILE, last_checkpoint_path

log = logging.getLogger(__name__)

# Files a run writes; --overwrite removes exactly these (never anything else the user put there).
RUN_FILES = (CONFIG_FILE, SPLIT_FILE, LOG_FILE, "summary.json")


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists without --resume, nothing to resume, ...)."""


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse early (before any data loading or writing) when the run directory cannot be used."""
    if resume:
        if not last_checkpoint_path(run_dir).is_file():
            raise RunDirError(f"{run_dir}: nothing to resume (no {CHECKPOINT_DIR}/last.pt)")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirError(f"{run_dir}: already exists and is not empty; pass --resume to continue that run "
                          "or --overwrite to start it again")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """check_run_dir, then create it (removing a previous run's files with --overwrite)."""
    check_run_dir(run_dir, resume, overwrite)
    if resume:
        return
    if run_dir.is_dir() and any(run_dir.iterdir()):
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
        log.warning("--overwrite: removed the previous run's files in %s", run_dir)
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)


def code_version() -> str | None:
    """`git describe --always --dirty` of the source tree, or None outside a git checkout."""
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=src,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info(device: torch.device, threads: int, dist_info: Any, amp: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "threads": threads, "device": str(device), "amp": amp,
        "world_size": dist_info.world_size, "backend": dist_info.backend,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env
