"""Serving throughput of two git revisions side by side: did a change cost speed? (loopback only)

    python bench/compare_revisions.py af3891f HEAD --concurrency 32 --rounds 3

Each revision is checked out into a temporary `git worktree`; its `oodguard serve` runs from there
(the same interpreter and installed dependencies, only oodguard's own code differs), on the same
bundle with the same flags. The two servers are up at the same time and are measured in turns -
A, B, A, B, ... - with the closed-loop client of bench/load.py, so drift on the machine (another
job, thermal state) lands on both. Reported per revision: requests/s and p50 / p99 of each round,
the median over rounds, and B's median requests/s over A's. Run it on quiet cores: it measures the
machine as much as the code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/compare_revisions.py` from anywhere
    sys.path.insert(0, str(REPO))

from bench.load import make_jpeg, run_raw_load  # noqa: E402
from bench.serve_process import ServerSpec, clean_env, free_port, start, stop  # noqa: E402


def checkout(rev: str, into: Path) -> Path:
    """A worktree of `rev` at `into`, importable as the `oodguard` package from its root.

    The repository maps `oodguard.training` / `oodguard.service` to the top-level folders at install
    time (pyproject's package-dir); links inside the worktree's `oodguard/` give the same layout to a
    `python -m oodguard.cli` started there (the working directory comes first on sys.path).
    """
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(into), rev],
                   check=True, capture_output=True, text=True)
    for sub in ("training", "service"):
        (into / "oodguard" / sub).symlink_to(into / sub, target_is_directory=True)
    return into


def remove(tree: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    shutil.rmtree(tree, ignore_errors=True)


def serve_from(tree: Path, bundle: Path, server_args: list[str], image: bytes, log: Path):
    port = free_port()
    argv = [sys.executable, "-m", "oodguard.cli", "serve", "--bundle", str(bundle), *server_args, "--port", str(port)]
    proc = start(ServerSpec("oodguard", argv, env=clean_env()), port, image, log, cwd=tree)  # its code, not ours
    return proc, f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev_a", help="The reference revision (e.g. the commit before a change).")
    ap.add_argument("rev_b", help="The revision compared with it (e.g. HEAD).")
    ap.add_argument("--bundle", default=str(REPO / "models" / "default"))
    ap.add_argument("--server-args", default="", help="Extra `oodguard serve` flags for both, e.g. '--threads 1'.")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="Measurements per revision, taken in turns.")
    ap.add_argument("--duration", type=float, default=20.0, help="Seconds per measurement.")
    ap.add_argument("--warmup", type=int, default=200, help="Requests before each measurement.")
    ap.add_argument("--json", dest="json_out", help="Write the results here.")
    args = ap.parse_args(argv)

    bundle = Path(args.bundle).resolve()
    image = make_jpeg()
    work = Path(tempfile.mkdtemp(prefix="oodguard-compare-"))
    revs = {"A": args.rev_a, "B": args.rev_b}
    servers: dict[str, tuple] = {}
    rounds: dict[str, list[dict]] = {"A": [], "B": []}
    try:
        for key, rev in revs.items():
            tree = checkout(rev, work / key)
            servers[key] = serve_from(tree, bundle, args.server_args.split(), image, work / f"{key}.log")
        for i in range(args.rounds):
            for key in ("A", "B"):
                result = asyncio.run(run_raw_load(servers[key][1], image, args.concurrency, 10**9, args.duration,
                                                  args.warmup))
                rounds[key].append({"requests_per_s": result.requests_per_s, "p50_ms": result.p50_ms,
                                    "p99_ms": result.p99_ms, "errors": result.errors})
                print(f"round {i + 1} {key} {revs[key]:>12}: {result.requests_per_s:7.1f} req/s  "
                      f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms  errors {result.errors}", flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)
        for key in revs:
            remove(work / key)
        shutil.rmtree(work, ignore_errors=True)

    medians = {k: statistics.median(r["requests_per_s"] for r in rounds[k]) for k in rounds}
    ratio = medians["B"] / medians["A"]
    print(f"median req/s at concurrency {args.concurrency}: A ({revs['A']}) {medians['A']:.1f}, "
          f"B ({revs['B']}) {medians['B']:.1f}; B/A = {ratio:.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"revisions": revs, "bundle": str(bundle), "rounds": rounds,
                                                   "median_requests_per_s": medians, "ratio_b_over_a": ratio,
                                                   "setup": vars(args)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
