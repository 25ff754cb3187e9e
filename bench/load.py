"""Closed-loop HTTP load for `oodguard serve`: requests/s and latency percentiles, loopback only.

N concurrent clients each send one request, wait for the answer, send the next, until the request
budget or the time budget is spent (whichever first). Every run is bounded in both.

    # against a running service
    python bench/load.py --url http://127.0.0.1:8000 --concurrency 32 --requests 3000 --duration 20

    # start `oodguard serve` itself, batching on and then off, same bundle, same image
    python bench/load.py --bundle models/default --compare --concurrency 32 --requests 3000

The image is a CIFAR-size (32x32) JPEG sent as multipart `file` (or `--image PATH`). The client
runs in this process and shares the machine's cores with the server: numbers are for comparing
configurations on one machine, not absolute capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/load.py` puts bench/ first on sys.path, not the repo
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.serve_process import multipart_request, start_oodguard, stop, tree_cpu_seconds  # noqa: E402


@dataclass
class LoadResult:
    label: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    server: dict = field(default_factory=dict)


def make_jpeg(size: int = 32, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


async def run_load(url: str, image: bytes, concurrency: int, max_requests: int, max_seconds: float, warmup: int) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    files = {"file": ("img.jpg", image, "image/jpeg")}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:
        for _ in range(warmup):  # connections, caches, onnxruntime arenas
            await client.post("/v1/predict", files=files)
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        issued = 0
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker() -> None:
            nonlocal issued
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", files=files)
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                latencies.append(time.perf_counter() - t0)
                statuses[key] = statuses.get(key, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return _summarise(latencies, statuses, elapsed, concurrency)


async def run_raw_load(
    url: str, image: bytes, concurrency: int, max_requests: int, max_seconds: float, warmup: int, path: str = "/v1/predict"
) -> LoadResult:
    """The same closed loop with a minimal asyncio HTTP/1.1 client (keep-alive, Content-Length bodies).

    httpx costs about as much CPU per request as the service itself; on a small machine it, not the
    server, sets the pace. This client costs a few tens of microseconds per request.
    """
    host_port = url.removeprefix("http://")
    host, port = host_port.split(":")
    request = multipart_request(host_port, image, path)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    issued = 0

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = head[9:12].decode()
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        return status

    async def worker(deadline: float, budget: int, record: bool) -> None:
        nonlocal issued
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while issued < budget and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                try:
                    key = await one(reader, writer)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    key = type(exc).__name__
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                if record:
                    latencies.append(time.perf_counter() - t0)
                    statuses[key] = statuses.get(key, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(time.perf_counter() + 30, warmup, False) for _ in range(min(concurrency, max(warmup, 1)))))
    issued = 0
    start = time.perf_counter()
    await asyncio.gather(*(worker(start + max_seconds, max_requests, True) for _ in range(concurrency)))
    return _summarise(latencies, statuses, time.perf_counter() - start, concurrency)


def _summarise(latencies: list[float], statuses: dict[str, int], elapsed: float, concurrency: int) -> LoadResult:
    lat_ms = np.array(latencies) * 1000.0
    done = len(latencies)
    return LoadResult(
        label="",
        concurrency=concurrency,
        requests=done,
        errors=done - statuses.get("200", 0),
        seconds=round(elapsed, 3),
        requests_per_s=round(done / elapsed, 1) if elapsed > 0 else 0.0,
        p50_ms=round(float(np.percentile(lat_ms, 50)), 2) if done else float("nan"),
        p95_ms=round(float(np.percentile(lat_ms, 95)), 2) if done else float("nan"),
        p99_ms=round(float(np.percentile(lat_ms, 99)), 2) if done else float("nan"),
        statuses=statuses,
    )


def batch_stats(url: str) -> dict:
    """Mean batch size and batch count from the server's own metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for s in family.samples:
            if s.name in ("oodguard_batch_size_sum", "oodguard_batch_size_count"):
                values[s.name] = s.value
    count = values.get("oodguard_batch_size_count", 0.0)
    return {"batches": int(count), "mean_batch_size": round(values.get("oodguard_batch_size_sum", 0.0) / count, 2) if count else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="A running service. Omit with --bundle to start one.")
    p.add_argument("--bundle", help="Start `oodguard serve --bundle BUNDLE` on a free loopback port.")
    p.add_argument("--compare", action="store_true", help="With --bundle: run batching on, then off.")
    p.add_argument("--server-args", default="", help="Extra `oodguard serve` flags, e.g. '--threads 2'.")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=3000, help="Request budget per run (upper bound).")
    p.add_argument("--duration", type=float, default=20.0, help="Time budget per run in seconds (upper bound).")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--image", help="Image file to send (default: a random 32x32 JPEG).")
    p.add_argument(
        "--client", choices=["httpx", "raw"], default="httpx",
        help="httpx.AsyncClient, or a minimal asyncio HTTP/1.1 client that leaves the CPU to the server.",
    )
    p.add_argument("--json", dest="json_out", help="Write results as JSON here.")
    args = p.parse_args(argv)
    if not args.url and not args.bundle:
        p.error("give --url or --bundle")
    image = open(args.image, "rb").read() if args.image else make_jpeg()

    runs: list[tuple[str, list[str]]]
    extra = args.server_args.split()
    if args.url:
        runs = [("service", [])]
    elif args.compare:
        runs = [("batching on", ["--batching", *extra]), ("batching off", ["--no-batching", *extra])]
    else:
        runs = [("service", extra)]

    results = []
    log_dir = Path(tempfile.mkdtemp(prefix="oodguard-load-"))
    for label, flags in runs:
        proc = None
        url = args.url
        if url is None:
            serve_args = ["--bundle", args.bundle, "--log-level", "WARNING", *flags]
            proc, url = start_oodguard(serve_args, image, log_dir / f"serve-{len(results)}.log", ready_timeout_s=60)
        try:
            runner = run_raw_load if args.client == "raw" else run_load
            c0 = tree_cpu_seconds(proc.pid) if proc else None
            result = asyncio.run(runner(url, image, args.concurrency, args.requests, args.duration, args.warmup))
            if proc is not None:  # server CPU per request: what the server costs, whoever sets the pace
                result.server["cpu_us_per_request"] = round((tree_cpu_seconds(proc.pid) - c0) / max(result.requests, 1) * 1e6)
            result.label = label
            result.server.update({"flags": flags, **batch_stats(url)})
        finally:
            if proc is not None:
                stop(proc)
        results.append(result)
        print(
            f"{label:>13}: {result.requests_per_s:8.1f} req/s  p50 {result.p50_ms:7.2f} ms  p95 {result.p95_ms:7.2f} ms  "
            f"p99 {result.p99_ms:7.2f} ms  ({result.requests} requests in {result.seconds:.1f} s, {result.errors} errors, "
            f"mean batch {result.server.get('mean_batch_size')}, server CPU {result.server.get('cpu_us_per_request', '?')} us/request)",
            flush=True,
        )
    env = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "image_bytes": len(image),
        "concurrency": args.concurrency,
        "client": args.client,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(env))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"env": env, "results": [asdict(r) for r in results]}, f, indent=2)
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
