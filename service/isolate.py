"""Bundle validation in a child process with a wall-clock limit.

A bundle's graph is the deployer's code in all but name: `0 x Loop(M=2^62)` added to `logits` is a
5.7 KB bundle whose golden-output check never returns, and onnxruntime offers no way to stop a
`session.run` from another thread except `RunOptions.terminate`, which a hostile graph may never
check in time. So every bundle that comes from the models directory or the admin API is first
verified (`verify_bundle`: schema, hashes, ONNX scan, onnxruntime load, golden outputs) and warmed
with the batch sizes the service will use, in a child process that is killed when it takes longer
than `validate_timeout_s`. Only a bundle that passed there is loaded by the service itself.

Children come from a `forkserver` that imports numpy, onnxruntime, the bundle code and the CLI
once (a child would otherwise import `oodguard.cli` again, ~0.1-0.3 s of CPU), so a check
costs a fork (tens of milliseconds), not an interpreter start-up, and runs at niceness 19: a busy
admin pipeline takes idle CPU, not the predictions' share. The fork server stays for
the life of the process (~70 MiB resident). As with any multiprocessing start method but `fork`,
a script that calls this at import time needs the `if __name__ == "__main__":` guard (the
children import the main module; `oodguard serve` has it). A child that dies (a crash
inside onnxruntime on a malformed graph) is a failed check too. A child whose server was killed
outright (SIGKILL: nothing left to stop it) ends itself CHILD_GRACE_S after its time limit.
`kill_children()` ends every running check (at shutdown, so SIGTERM is never held up by a
validation).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from .bundle import BundleError

log = logging.getLogger(__name__)

# Under `python -m oodguard.cli` every child re-runs the main module as __mp_main__ (multiprocessing's
# spawn preparation; its imports are the fork server's, so it costs milliseconds), and runpy warns
# each time that `oodguard.cli` is already imported: one RuntimeWarning per validation in the server's
# log, saying nothing an operator can act on. The fork server imports this module (_PRELOAD), so its
# children inherit the filter; in the server itself it matches nothing else.
warnings.filterwarnings("ignore", message=r"'oodguard\.cli' found in sys\.modules", category=RuntimeWarning)

_PRELOAD = ["numpy", "onnxruntime", "oodguard.service.bundle", "oodguard.service.isolate"]
# A validation competes for the cores that serve requests; at the lowest normal priority it runs on
# idle CPU first, so a slow or hostile bundle delays its own verdict rather than every prediction.
# 19, not 10: against a busy server thread a niceness-10 child still gets ~10% of a shared core
# (CFS weights 110 : 1024), a niceness-19 one ~1.5% (15 : 1024) - and, unlike SCHED_IDLE, it is
# never starved outright, so a deploy during a traffic peak still finishes, only later.
CHILD_NICENESS = 19
# A child outlives its time limit by at most this much even when nobody is left to kill it (the
# server was SIGKILLed - OOM killer, an orchestrator's deadline - while a bundle spun in a Loop).
CHILD_GRACE_S = 5
_lock = threading.Lock()
_children: set = set()
_context = None


def process_context():
    """The fork server's multiprocessing context (created once, with its preloads): validation children
    and the heavy-decode workers (heavy_decode.py) both come from it."""
    global _context
    with _lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(forkserver_preload())
            _context = ctx
        return _context


def forkserver_preload() -> list[str]:
    """What the fork server imports once: the bundle code, and what the main module imports, which
    every child would otherwise import again when it re-runs the main module.

    `python -m oodguard.cli`: the module itself. The `oodguard` console script (a script, no
    __spec__): its "__main__" entry is a no-op before Python 3.13.8 / 3.14 (CPython gh-126631: the
    fork server never receives the script's path), so each child re-runs the 3-line script, whose
    `from oodguard.cli import main` would import the CLI, typer and the service afresh: 0.121 s a
    validation child instead of 0.021 s (2-core machine, tiny bundle, 10 checks). Preloading
    oodguard.cli leaves the children only the script itself to run.
    """
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", "__main__")
    if name == "__main__":  # a script: preload the CLI when that is where its code comes from
        imported = {getattr(value, "__module__", None) for value in vars(main).values()} if main is not None else set()
        return ["__main__", *_PRELOAD, *(["oodguard.cli"] if "oodguard.cli" in imported else [])]
    # a package's __main__ (`python -m pytest`) is not re-run by the children; importing it would run it
    return ["__main__", *_PRELOAD, *([] if name.endswith(".__main__") else [name])]


def verify_in_child(bundle_dir: str | Path, *, intra_op_threads: int, warm_batches: tuple[int, ...], timeout_s: float) -> None:
    """Raise BundleError unless the bundle verifies and runs its warm-up batches within `timeout_s`."""
    ctx = process_context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child, args=(str(bundle_dir), int(intra_op_threads), tuple(warm_batches), float(timeout_s), sender),
        name="oodguard-validate", daemon=True,
    )
    with _lock:
        proc.start()
        _children.add(proc)
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise BundleError(
                "timeout", f"validation and warm-up did not finish within {timeout_s:g} s (validate_timeout_s); "
                "a graph that loops or computes for that long cannot serve"
            )
        try:
            outcome = receiver.recv()
        except (EOFError, OSError):
            proc.join(5)
            raise BundleError("onnx", f"the validation process died (exit status {proc.exitcode})") from None
        if outcome is not None:
            check, message = outcome
            raise BundleError(check, message)
    finally:
        receiver.close()
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        with _lock:
            _children.discard(proc)


def kill_children() -> int:
    """Kill every running validation child; returns how many were running."""
    with _lock:
        running = [p for p in _children if p.is_alive()]
    for proc in running:
        proc.kill()
    return len(running)


def _child(bundle_dir: str, intra_op_threads: int, warm_batches: tuple[int, ...], timeout_s: float, sender) -> None:
    from .bundle import verify_bundle
    from .loaded_model import LoadedModel

    try:
        # SIGALRM's default action ends the process, even inside onnxruntime's C++: the parent kills a
        # late child itself, this only matters when the parent is gone
        signal.alarm(math.ceil(timeout_s) + CHILD_GRACE_S)
        os.nice(CHILD_NICENESS)
        report = verify_bundle(bundle_dir, intra_op_threads=intra_op_threads)
        LoadedModel(Path(bundle_dir), report.manifest, report.sha256, report.session, report.calibration,
                    report.form_calibration).warm(warm_batches)
        sender.send(None)
    except BundleError as exc:
        sender.send((exc.check, exc.reason))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as a failed check
        sender.send(("onnx", f"{type(exc).__name__}: {exc}"[:500]))
    finally:
        sender.close()
