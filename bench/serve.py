"""Serving benchmark: oodguard next to its bounds and to what users would otherwise run, on loopback.

For each bundle (default: models/default and a ResNet-18 bundle built on first use) and each
concurrency (default 1, 8, 32, 128), one system at a time:

  oodguard            `oodguard serve`, dynamic batching on (its defaults)
  oodguard-nobatch    `oodguard serve --no-batching`
  floor               bare ASGI app: multipart + JPEG decode to floats, no framework, no model
  fastapi-onnx        hand-written FastAPI endpoint, one onnxruntime run per request
  fastapi-torch       the same with the run's eager PyTorch model
  torchserve[-batch32] TorchServe 0.12, default batching and batch 32 / 5 ms (with --torchserve)
  ceiling             onnxruntime in this process on batches of 32, no HTTP (not a server)

Limit: the service's HTTP work and the model share the same cores, so the honest bound is the serial
composition limit = 1 / (1/floor + 1/ceiling) images/s (bench/serve_report.py). Each server is a
subprocess on a free loopback port, started and stopped (SIGTERM, wait) by this script; the load is
bench/load.py's raw asyncio client (closed loop, keep-alive, one pre-built multipart request of one
CIFAR-size JPEG) in this process, the same for every system. On a small machine the client competes
with the server for the cores, so its own CPU per request is measured and reported.

Fairness (recorded in the JSON): every model runs with the same intra-op thread count as oodguard's
onnxruntime (`--threads`, default 1; `--peer-threads 0` gives the peers their libraries' defaults
instead), torch-based peers with the short OpenMP spin our own trainer uses (GOMP_SPINCOUNT=10000:
libgomp's default spin collapses when the client shares the cores), TorchServe with one worker per
core; every uvicorn server is one process. The ResNet-18 bundle is a one-step-trained network:
weights do not change speed (bench/serve_bundles.py).

    python bench/serve.py                                   # both bundles, all systems but TorchServe
    python bench/serve.py --torchserve --out docs/bench/serve.json --markdown docs/benchmarks-serve.md
    python bench/serve.py --bundles runs/accept/bundle --concurrency 1,8 --requests 50 --duration 5   # smoke
    python bench/serve.py --render docs/bench/serve.json --markdown docs/benchmarks-serve.md           # re-render

Exit status 1 when a cell of the service had errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/serve.py` puts bench/ first on sys.path, not the repo
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench import load, serve_bundles, serve_report, serve_torchserve  # noqa: E402
from bench.serve_process import (  # noqa: E402
    ServerSpec, free_port, self_cpu_seconds, start, stop, torch_env, tree_cpu_seconds,
)

PEERS_DIR = REPO / "bench" / "peers"
CORES = len(os.sched_getaffinity(0))
VERSION_PACKAGES = ("onnxruntime", "numpy", "pillow", "fastapi", "starlette", "uvicorn", "httptools", "uvloop",
                    "python-multipart", "torch", "torchserve")


# -- measurements ---------------------------------------------------------------------------------------


def measure_cell(port: int, path: str, image: bytes, concurrency: int, args: argparse.Namespace, server_pid: int) -> dict:
    """One bounded closed-loop run. CPU per request counts the warm-up requests too (they are inside the window)."""
    server0, client0 = tree_cpu_seconds(server_pid), self_cpu_seconds()
    wall0 = time.perf_counter()
    runner = load.run_raw_load(f"http://127.0.0.1:{port}", image, concurrency, args.requests, args.duration,
                               args.warmup, path)
    result = asyncio.run(asyncio.wait_for(runner, timeout=args.duration + 90))
    wall = time.perf_counter() - wall0
    server_cpu, client_cpu = tree_cpu_seconds(server_pid) - server0, self_cpu_seconds() - client0
    sent = result.requests + args.warmup
    return {
        "images_per_s": result.requests_per_s, "p50_ms": result.p50_ms, "p95_ms": result.p95_ms, "p99_ms": result.p99_ms,
        "requests": result.requests, "errors": result.errors, "seconds": result.seconds, "statuses": result.statuses,
        "server_cpu_us_per_request": round(server_cpu / sent * 1e6), "client_cpu_us_per_request": round(client_cpu / sent * 1e6),
        "cpu_utilisation_cores": {"server": round(server_cpu / wall, 2), "client": round(client_cpu / wall, 2)},
    }


def measure_ceiling(bundle: Path, image: bytes, threads: int, seconds: float, batch: int = 32) -> dict:
    """onnxruntime in this process, batches of `batch` copies of the benchmark image, all outputs (as served)."""
    from oodguard.service.bundle import make_session
    from oodguard.service.manifest import load_manifest
    from oodguard.service.preprocess import preprocess_image

    x = np.repeat(preprocess_image(image, load_manifest(bundle).input)[None], batch, axis=0)
    session = make_session(bundle / "model.onnx", intra_op_threads=threads, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    for _ in range(3):
        session.run(None, feed)
    runs, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds or runs < 3:
        session.run(None, feed)
        runs += 1
    elapsed = time.perf_counter() - t0
    return {"images_per_s": round(batch * runs / elapsed, 1), "batch": batch, "batches": runs,
            "seconds": round(elapsed, 3), "intra_op_threads": threads,
            "cpu_cores_used": round((time.process_time() - cpu0) / elapsed, 2)}


# -- systems ---------------------------------------------------------------------------------------------


def systems_for(bundle: serve_bundles.BenchBundle, threads: int, args: argparse.Namespace,
                workdir: Path) -> list[ServerSpec | tuple[str, str]]:
    """Specs to run with oodguard at `threads` intra-op threads, or (system, reason) for those that cannot run here."""
    py = sys.executable
    flags = ["--threads", str(threads), *shlex.split(args.server_args)]
    serve = [py, "-m", "oodguard.cli", "serve", "--bundle", str(bundle.path), "--log-level", "WARNING", *flags]
    peers = threads if args.peer_threads is None else args.peer_threads
    peer_threads = ["--threads", str(peers)] if peers else []
    specs: list[ServerSpec | tuple[str, str]] = [
        ServerSpec("floor", [py, str(PEERS_DIR / "bare_asgi.py")], settings={"process": "1 uvicorn worker, httptools"}),
        ServerSpec("oodguard", [*serve, "--batching"], settings={"flags": ["--batching", *flags]}),
        ServerSpec("oodguard-nobatch", [*serve, "--no-batching"], settings={"flags": ["--no-batching", *flags]}),
        ServerSpec("fastapi-onnx", [py, str(PEERS_DIR / "fastapi_onnx.py"), "--bundle", str(bundle.path), *peer_threads],
                   settings={"process": "1 uvicorn worker"}, settings_url="/readyz"),
    ]
    if bundle.run_dir is None:
        specs.append(("fastapi-torch", "no training run with checkpoints/last.pt for this bundle"))
    else:
        env = torch_env()
        specs.append(ServerSpec("fastapi-torch", [py, str(PEERS_DIR / "fastapi_torch.py"), "--run", str(bundle.run_dir),
                                                  *peer_threads], env=env, settings_url="/readyz",
                                settings={"process": "1 uvicorn worker", "GOMP_SPINCOUNT": env.get("GOMP_SPINCOUNT")}))
    specs += _torchserve_specs(bundle, threads, args, workdir)
    wanted = set(args.systems.split(",")) if args.systems else set(serve_report.SYSTEMS)
    return [s for s in specs if (s.system if isinstance(s, ServerSpec) else s[0]) in wanted]


def _torchserve_specs(bundle, threads: int, args, workdir: Path) -> list[ServerSpec | tuple[str, str]]:
    names = list(serve_torchserve.SETTINGS)
    if not args.torchserve:
        return [(n, "pass --torchserve (installs torchserve 0.12 into this venv)") for n in names]
    if bundle.run_dir is None:
        return [(n, "no training run with checkpoints/last.pt for this bundle") for n in names]
    reason = serve_torchserve.ensure_installed(install=True)
    if reason:
        return [(n, reason) for n in names]
    workers = args.torchserve_workers or CORES
    # workers x threads never above oodguard's own thread budget (one worker per core by default)
    threads = args.peer_threads or max(1, min(threads, CORES) // workers)
    ts_dir = workdir / "torchserve" / bundle.name
    try:
        store = serve_torchserve.archive(bundle.run_dir / "checkpoints" / "last.pt", bundle.manifest()["classes"],
                                         ts_dir, threads)
    except (RuntimeError, OSError) as exc:
        return [(n, str(exc)) for n in names]
    specs = []
    for name in names:
        ports = (free_port(), free_port(), free_port())
        argv, env, settings = serve_torchserve.command(name, store, ts_dir, ports, workers)
        env = torch_env(env)
        settings["GOMP_SPINCOUNT"] = env.get("GOMP_SPINCOUNT")
        settings["torch_threads_per_worker"] = threads
        specs.append(ServerSpec(name, argv, path=f"/predictions/{serve_torchserve.MODEL_NAME}", env=env,
                                settings={**settings, "inference_port": ports[0]}, ready_timeout_s=240))
    return specs


def run_system(spec: ServerSpec, bundle_name: str, image: bytes, args: argparse.Namespace, workdir: Path) -> dict:
    port = spec.settings.pop("inference_port", None) or free_port()
    argv = spec.argv if spec.system.startswith("torchserve") else [*spec.argv, "--port", str(port)]
    spec = ServerSpec(spec.system, argv, spec.path, spec.env, spec.settings, spec.ready_timeout_s, spec.settings_url)
    log_path = workdir / "logs" / f"{bundle_name}-{spec.system}.log"
    t0 = time.perf_counter()
    try:
        proc = start(spec, port, image, log_path)
    except RuntimeError as exc:
        print(f"  {spec.system:>18}: not run: {exc}", flush=True)
        return {"not_run": f"did not start: {exc}", "settings": spec.settings}
    entry: dict = {"settings": {**spec.settings, "startup_s": round(time.perf_counter() - t0, 1)}, "cells": {}}
    try:
        if spec.settings_url:
            entry["settings"].update(_get_json(port, spec.settings_url))
        for c in args.concurrency:
            try:
                cell = measure_cell(port, spec.path, image, c, args, proc.pid)
            except Exception as exc:  # a dead server, a hung cell: record and go on with the next system
                cell = {"failed": f"{type(exc).__name__}: {exc}"[:300]}
            entry["cells"][str(c)] = cell
            _print_cell(spec.system, c, cell)
            if "failed" in cell and proc.poll() is not None:
                break
    finally:
        stop(proc)
    return entry


def _get_json(port: int, path: str) -> dict:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        data = json.loads(conn.getresponse().read())
        return {k: v for k, v in data.items() if k != "status"}
    except (OSError, ValueError):
        return {}
    finally:
        conn.close()


def _print_cell(system: str, c: int, cell: dict) -> None:
    if "failed" in cell:
        print(f"  {system:>18} c={c:<4} failed: {cell['failed']}", flush=True)
        return
    print(f"  {system:>18} c={c:<4} {cell['images_per_s']:9.1f} img/s  p50 {cell['p50_ms']:8.2f}  p95 {cell['p95_ms']:8.2f}  "
          f"p99 {cell['p99_ms']:8.2f} ms  {cell['errors']}/{cell['requests']} err  server {cell['server_cpu_us_per_request']} "
          f"us/img  client {cell['client_cpu_us_per_request']} us/img", flush=True)


# -- the run ---------------------------------------------------------------------------------------------


def environment() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    versions = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30).stderr.splitlines()[0]
        versions["java"] = java
    except (OSError, IndexError, subprocess.TimeoutExpired):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    omp = {k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")}
    return {"cpu": cpu, "cores": CORES, "versions": versions, "oodguard_commit": commit, "omp_env": omp,
            "load_average_start": [round(x, 2) for x in os.getloadavg()], "started": datetime.now(timezone.utc).isoformat()}


def run(args: argparse.Namespace) -> dict:
    workdir = Path(args.cache_dir)
    image, image_source = serve_bundles.load_image(args.image)
    report: dict = {
        "command": "python bench/serve.py " + " ".join(shlex.quote(a) for a in args.argv),
        "environment": environment(),
        "image": {"source": image_source, "bytes": len(image)},
        "load_description": (
            f"closed loop, C clients each on one keep-alive connection sending a multipart POST of one {len(image)}-byte "
            f"32x32 JPEG ({image_source}) and waiting for the answer; per cell {args.warmup} warm-up requests, then at most "
            f"{args.requests} requests or {args.duration:g} s; bench/load.py's raw asyncio client in the benchmark "
            "process for every system (its CPU per request is in the tables)"),
        "threads": {
            "oodguard": f"1 process (uvicorn, one worker), onnxruntime intra-op threads {_threads_text(args)}, decode threads "
                        f"per `oodguard serve` defaults unless in --server-args ({args.server_args or 'none'})",
            "hand-written peers": "1 uvicorn worker; onnxruntime / torch intra-op threads "
                                  + ("as oodguard's" if args.peer_threads is None else str(args.peer_threads)
                                     if args.peer_threads else "at library defaults (see settings)")
                                  + "; torch peers with GOMP_SPINCOUNT=10000 unless OpenMP waiting is configured",
            "ceiling": f"onnxruntime intra-op threads as the service's ({_threads_text(args)})",
            "torchserve": f"{args.torchserve_workers or CORES} workers x {args.peer_threads or 'max(1, oodguard threads / workers)'} torch "
                          "thread(s) each (see settings)",
            "OMP environment": ", ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))) or "unset",
        },
        "bundles": {},
        "notes": [],
    }
    for spec, threads in zip(args.bundles, args.threads):
        bundle = serve_bundles.resolve_bundle(spec, workdir, threads=args.build_threads)
        print(f"== {bundle.name}: {bundle.description} (intra-op threads {threads})", flush=True)
        ceiling = measure_ceiling(bundle.path, image, threads, args.ceiling_seconds)
        ceiling_all = measure_ceiling(bundle.path, image, 0, args.ceiling_seconds)
        ceiling_b1 = measure_ceiling(bundle.path, image, threads, args.ceiling_seconds, batch=1)
        print(f"  {'ceiling':>18}        {ceiling['images_per_s']:9.1f} img/s  (onnxruntime, batch 32, {threads} "
              f"thread(s); all cores: {ceiling_all['images_per_s']:.1f}; batch 1: {ceiling_b1['images_per_s']:.1f})", flush=True)
        entry = {"description": bundle.description, "path": str(bundle.path), "run_dir": str(bundle.run_dir),
                 "checkpoint_matches_bundle": bundle.checkpoint_matches, "ceiling_images_per_s": ceiling["images_per_s"],
                 "ceiling": ceiling, "ceiling_all_cores": ceiling_all, "ceiling_batch1": ceiling_b1,
                 "intra_op_threads": threads, "systems": {}}
        for spec_or_reason in systems_for(bundle, threads, args, workdir):
            if isinstance(spec_or_reason, tuple):
                system, reason = spec_or_reason
                entry["systems"][system] = {"not_run": reason}
                print(f"  {system:>18}: not run: {reason}", flush=True)
                continue
            entry["systems"][spec_or_reason.system] = run_system(spec_or_reason, bundle.name, image, args, workdir)
        report["bundles"][bundle.name] = entry
        print(serve_report.ratio_table_text(bundle.name, entry), flush=True)
    report["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["notes"] = _notes(report, args)
    return report


def _threads_text(args: argparse.Namespace) -> str:
    return ", ".join(f"{b}: {t}" for b, t in zip(args.bundles, args.threads))


def _notes(report: dict, args: argparse.Namespace) -> list[str]:
    notes = []
    client = [c["client_cpu_us_per_request"] for b in report["bundles"].values() for s in b["systems"].values()
              for c in s.get("cells", {}).values() if "client_cpu_us_per_request" in c]
    if client:
        notes.append(f"The load client runs in the benchmark process on the same {CORES} cores: it cost {min(client)}-"
                     f"{max(client)} µs CPU per request (median {int(np.median(client))}), i.e. at 1,000 images/s about "
                     f"{np.median(client) / 1e3:.0%} of one core taken from whichever server is measured.")
    if any(name == "resnet18" for name in report["bundles"]):
        notes.append(serve_bundles.RESNET18_NOTE + ".")
    notes.append("limit = 1 / (1/floor + 1/ceiling) at each concurrency: the floor is the bare ASGI app's rate at that "
                 "concurrency, the ceiling onnxruntime alone on batches of 32 with the service's thread count.")
    notes.append("CPU per request includes the warm-up requests of the cell; server CPU is the whole process tree "
                 "(TorchServe: Java frontend + Python workers).")
    return notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundles", default="default,resnet18",
                   help="Comma-separated: default (models/default), resnet18 (built once under --cache-dir), or "
                        "BUNDLE_DIR[:RUN_DIR].")
    p.add_argument("--concurrency", default="1,8,32,128", help="Comma-separated client counts.")
    p.add_argument("--requests", type=int, default=3000, help="Request budget per cell (upper bound).")
    p.add_argument("--duration", type=float, default=3.0, help="Seconds per cell (upper bound).")
    p.add_argument("--warmup", type=int, default=20, help="Warm-up requests per cell (not in the statistics).")
    p.add_argument("--systems", default="", help="Comma-separated subset of: " + ", ".join(serve_report.SYSTEMS))
    p.add_argument("--torchserve", action="store_true", help="Run TorchServe (pip-installs torchserve 0.12 if missing).")
    p.add_argument("--torchserve-workers", type=int, default=0, help="TorchServe workers (default: the cores).")
    p.add_argument("--threads", default="1",
                   help="oodguard's onnxruntime intra-op threads (and the ceiling's): one number, or one per bundle "
                        "(e.g. 1,2: the small CNN leaves a core to the event loop, ResNet-18's compute wants both).")
    p.add_argument("--peer-threads", type=int, default=None,
                   help="Intra-op threads of the hand-written peers and of each TorchServe worker (default: oodguard's "
                        "for that bundle, TorchServe workers x threads <= that; 0 = the library's default, one per core).")
    p.add_argument("--server-args", default="", help="Extra `oodguard serve` flags, e.g. '--decode-threads 1'.")
    p.add_argument("--ceiling-seconds", type=float, default=3.0, help="Seconds of onnxruntime runs for the ceiling.")
    p.add_argument("--build-threads", type=int, default=None, help="Torch threads when building the ResNet-18 bundle.")
    p.add_argument("--image", help="Image to upload (default: the first CIFAR-10 test JPEG).")
    p.add_argument("--cache-dir", default=str(REPO / "runs" / "bench"), help="Built bundles, TorchServe archives, server logs.")
    p.add_argument("--out", default="docs/bench/serve.json", help="JSON results.")
    p.add_argument("--plot", default=None, help="PNG plot (default: --out with .png).")
    p.add_argument("--markdown", default=None, help="Also write the markdown tables here.")
    p.add_argument("--render", default=None, help="Only re-render an existing JSON (--markdown / --plot); run nothing.")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.bundles = [b for b in args.bundles.split(",") if b]
    try:
        threads = [int(t) for t in args.threads.split(",") if t]
    except ValueError:
        p.error("--threads takes one integer or one per bundle, e.g. 1,2")
    if len(threads) == 1:
        threads *= len(args.bundles)
    if len(threads) != len(args.bundles) or min(threads) < 1:
        p.error(f"--threads: give one count >= 1, or one per bundle ({len(args.bundles)})")
    args.threads = threads
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    except ValueError:
        p.error("--concurrency takes comma-separated integers, e.g. 1,8,32,128")
    unknown = set(args.systems.split(",")) - set(serve_report.SYSTEMS) - {""}
    if unknown:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if min(args.concurrency, default=0) < 1 or args.requests < 1 or args.duration <= 0:
        p.error("concurrency, requests and duration must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        out = Path(args.render)
    else:
        report = run(args)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}", flush=True)
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    serve_report.plot(report, str(plot_path))
    print(f"wrote {plot_path}", flush=True)
    if args.markdown:
        md = Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(plot_path.resolve(), md.resolve().parent)
        md.write_text(serve_report.render_markdown(report, plot_name=rel))
        print(f"wrote {md}", flush=True)
    if args.render:  # a run printed its tables as it went
        for name, bundle in report["bundles"].items():
            print(serve_report.ratio_table_text(name, bundle))
    errors = [c.get("errors", 0) for b in report["bundles"].values()
              for c in b["systems"].get(serve_report.SERVICE, {}).get("cells", {}).values()]
    return 1 if any(errors) else 0


if __name__ == "__main__":
    sys.exit(main())
