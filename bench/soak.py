"""Soak test (not part of the test suite): steady load for N minutes with periodic hot swaps, loopback only.

Starts `oodguard serve` with a models directory holding two versions of one bundle (the bundle given
with --bundle, else models/default, else a tiny synthetic bundle from the test factory), sends
predictions at a steady rate, and swaps the active version through the admin API every
--swap-every seconds (A -> B -> A ...). Bounded: --minutes of measured time after --warmup-s, at
most --max-requests requests and --max-swaps swaps.

Every --window-s it samples the server's RSS, threads and open file descriptors and the window's
latency percentiles. Pass criteria (exit status 1 when one fails):
  - zero errors: every request answered 200 by one of the two versions, every swap succeeded;
  - RSS flat: every sample after warm-up within --rss-tolerance (10%) of the first one.
It prints a table and writes everything (settings, machine, series, summary) as JSON.

    python bench/soak.py --minutes 10                # ~10.5 min; JSON under runs/soak/
    python bench/soak.py --minutes 1 --rate 100 --swap-every 10 --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/soak.py` puts bench/ first on sys.path, not the repo
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.load import make_jpeg  # noqa: E402
from oodguard.service.manifest import load_manifest  # noqa: E402
from bench.serve_process import clean_env, start_oodguard, stop as stop_server  # noqa: E402


# -- bundles ------------------------------------------------------------------------------------------


def _default_bundle(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    default = REPO / "models" / "default"
    return default if (default / "manifest.json").is_file() else None


def make_versions(source: Path | None, workdir: Path) -> tuple[Path, Path, str]:
    """Two copies of one bundle as versions soak-a / soak-b (re-pinned manifests). Returns (a, b, what)."""
    from oodguard.service.bundle import write_manifest

    if source is None:
        from tests.service.bundle_factory import make_tiny_bundle  # needs the dev extra (onnx)

        source = make_tiny_bundle(workdir / "tiny", "soak", "0")
        what = "tiny synthetic bundle (tests/service/bundle_factory.py, 8x8 input)"
    else:
        what = f"{source} ({load_manifest(source).name} {load_manifest(source).version})"
    out = []
    for version in ("soak-a", "soak-b"):
        dest = workdir / version
        shutil.copytree(source, dest)
        write_manifest(dest, load_manifest(dest).model_copy(update={"version": version}))
        out.append(dest)
    return out[0], out[1], what


def proc_stats(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split()[1] for line in status if ":" in line and len(line.split()) > 1}
    return {
        "rss_kb": int(fields["VmRSS"]),
        "hwm_kb": int(fields["VmHWM"]),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


# -- the run -------------------------------------------------------------------------------------------


@dataclass
class Window:
    t_end_s: float  # since the measured period began
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    rss_mib: float
    threads: int
    fds: int


@dataclass
class Soak:
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds) of answered requests
    errors: list[dict] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    swaps: list[dict] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    requests: int = 0


async def _load(client: httpx.AsyncClient, soak: Soak, image: bytes, rate: float, concurrency: int,
                t0: float, stop_at: float, max_requests: int, valid_versions: set[str]) -> None:
    files = {"file": ("img.jpg", image, "image/jpeg")}
    next_slot = [time.monotonic()]

    async def worker() -> None:
        while True:
            slot = max(next_slot[0], time.monotonic() - 1.0 / rate)  # steady pace; never a catch-up burst
            next_slot[0] = slot + 1.0 / rate
            if slot >= stop_at or soak.requests >= max_requests:
                return
            delay = slot - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            soak.requests += 1
            start = time.monotonic()
            try:
                r = await client.post("/v1/predict", files=files)
            except httpx.HTTPError as exc:
                soak.errors.append({"t": round(start - t0, 3), "error": f"{type(exc).__name__}: {exc}"})
                continue
            elapsed = time.monotonic() - start
            version = r.json().get("model", {}).get("version") if r.status_code == 200 else None
            if r.status_code != 200 or version not in valid_versions:
                soak.errors.append({"t": round(start - t0, 3), "status": r.status_code, "body": r.text[:200]})
                continue
            soak.versions[version] = soak.versions.get(version, 0) + 1
            soak.latencies.append((start - t0, elapsed))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _swapper(client: httpx.AsyncClient, soak: Soak, model: str, token: str, every_s: float, t0: float,
                   stop_at: float, max_swaps: int) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    targets = ["soak-b", "soak-a"]
    while len(soak.swaps) < max_swaps:
        await asyncio.sleep(min(every_s, max(0.0, stop_at - time.monotonic())))
        if time.monotonic() >= stop_at:
            return
        target = targets[len(soak.swaps) % 2]
        start = time.monotonic()
        try:
            r = await client.post(f"/admin/models/{model}/{target}/activate", headers=headers, timeout=120)
            ok, detail = r.status_code == 200, r.json()
        except httpx.HTTPError as exc:
            ok, detail = False, {"error": str(exc)}
        soak.swaps.append({
            "t": round(start - t0, 3), "to": target, "ok": ok, "seconds": round(time.monotonic() - start, 4),
            "timings_s": detail.get("timings_s") if ok else detail,
        })


async def _sampler(soak: Soak, pid: int, every_s: float, t0: float, stop_at: float) -> None:
    seen_latencies = seen_errors = 0
    seen_requests = 0
    while True:
        await asyncio.sleep(max(0.0, min(every_s, stop_at - time.monotonic())))
        now = time.monotonic()
        window = [lat for _, lat in soak.latencies[seen_latencies:]]
        stats = proc_stats(pid)
        soak.windows.append(Window(
            t_end_s=round(now - t0, 1),
            requests=soak.requests - seen_requests,
            errors=len(soak.errors) - seen_errors,
            p50_ms=round(float(np.percentile(window, 50)) * 1000, 2) if window else float("nan"),
            p99_ms=round(float(np.percentile(window, 99)) * 1000, 2) if window else float("nan"),
            rss_mib=round(stats["rss_kb"] / 1024, 1),
            threads=stats["threads"],
            fds=stats["fds"],
        ))
        seen_latencies, seen_errors, seen_requests = len(soak.latencies), len(soak.errors), soak.requests
        if now >= stop_at:
            return


async def run(args, base: str, pid: int, model: str, token: str) -> tuple[Soak, Soak]:
    """Warm-up, then the measured soak; swaps activate `model`'s versions soak-a / soak-b in turn."""
    image = make_jpeg(seed=1)
    valid = {"soak-a", "soak-b"}
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=base, timeout=30.0, limits=limits) as client:
        # Warm-up: the same load and two swaps, so the measured RSS starts from a warmed server.
        warm = Soak()
        t0 = time.monotonic()
        stop = t0 + args.warmup_s
        await asyncio.gather(
            _load(client, warm, image, args.rate, args.concurrency, t0, stop, args.max_requests, valid),
            _swapper(client, warm, model, token, max(1.0, args.warmup_s / 3), t0, stop, 2),
        )
        if len(warm.swaps) % 2:  # leave soak-a active, as at the start
            await _swapper(client, warm, model, token, 0.0, time.monotonic(), time.monotonic() + 60, len(warm.swaps) + 1)

        soak = Soak()
        t0 = time.monotonic()
        stop = t0 + args.minutes * 60
        soak.windows.append(Window(0.0, 0, 0, float("nan"), float("nan"), round(proc_stats(pid)["rss_kb"] / 1024, 1),
                                   proc_stats(pid)["threads"], proc_stats(pid)["fds"]))
        await asyncio.gather(
            _load(client, soak, image, args.rate, args.concurrency, t0, stop, args.max_requests, valid),
            _swapper(client, soak, model, token, args.swap_every, t0, stop, args.max_swaps),
            _sampler(soak, pid, args.window_s, t0, stop),
        )
    return warm, soak


def summarise(soak: Soak, warm: Soak, args) -> dict:
    duration = args.minutes * 60
    edge = max(args.window_s, min(60.0, duration / 5))  # first / last minute (or fifth, for short runs)
    first = [lat for t, lat in soak.latencies if t < edge]
    last = [lat for t, lat in soak.latencies if t >= duration - edge]

    def pct(values, q):
        return round(float(np.percentile(values, q)) * 1000, 2) if values else None

    rss = [w.rss_mib for w in soak.windows]
    rss_start, rss_end = rss[0], rss[-1]
    rss_dev = max(abs(r - rss_start) for r in rss) / rss_start
    swaps_failed = sum(not s["ok"] for s in soak.swaps + warm.swaps)
    swap_seconds = [s["seconds"] for s in soak.swaps if s["ok"]]
    return {
        "requests": soak.requests,
        "answered_200": len(soak.latencies),
        "errors": len(soak.errors) + len(warm.errors),
        "swaps": len(soak.swaps),
        "swaps_failed": swaps_failed,
        "swap_seconds_p50": round(float(np.median(swap_seconds)), 4) if swap_seconds else None,
        "swap_seconds_max": round(max(swap_seconds), 4) if swap_seconds else None,
        "responses_by_version": soak.versions,
        "requests_per_s": round(len(soak.latencies) / duration, 1),
        "latency_window_s": edge,
        "p50_ms_start": pct(first, 50), "p99_ms_start": pct(first, 99),
        "p50_ms_end": pct(last, 50), "p99_ms_end": pct(last, 99),
        "p50_ms_all": pct([lat for _, lat in soak.latencies], 50), "p99_ms_all": pct([lat for _, lat in soak.latencies], 99),
        "rss_mib_start": rss_start, "rss_mib_end": rss_end, "rss_mib_min": min(rss), "rss_mib_max": max(rss),
        "rss_max_deviation": round(rss_dev, 4),
        "threads_start": soak.windows[0].threads, "threads_end": soak.windows[-1].threads,
        "fds_start": soak.windows[0].fds, "fds_end": soak.windows[-1].fds,
        "pass_zero_errors": len(soak.errors) + len(warm.errors) == 0 and swaps_failed == 0,
        "pass_rss_flat": rss_dev <= args.rss_tolerance,
    }


def print_report(summary: dict, soak: Soak, setup: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    series = Table(title=f"soak: {setup['minutes']} min at {setup['rate']} req/s, swap every {setup['swap_every_s']} s")
    for col in ("t (s)", "requests", "errors", "p50 ms", "p99 ms", "RSS MiB", "threads", "fds"):
        series.add_column(col, justify="right")
    for w in soak.windows:
        series.add_row(f"{w.t_end_s:.0f}", str(w.requests), str(w.errors), f"{w.p50_ms:.1f}", f"{w.p99_ms:.1f}",
                       f"{w.rss_mib:.1f}", str(w.threads), str(w.fds))
    console.print(series)
    s = summary
    table = Table(title="summary")
    table.add_column("")
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    table.add_row(f"p50 latency (ms, first/last {s['latency_window_s']:.0f} s)", str(s["p50_ms_start"]), str(s["p50_ms_end"]))
    table.add_row(f"p99 latency (ms, first/last {s['latency_window_s']:.0f} s)", str(s["p99_ms_start"]), str(s["p99_ms_end"]))
    table.add_row("server RSS (MiB)", str(s["rss_mib_start"]), str(s["rss_mib_end"]))
    table.add_row("threads / open fds", f"{s['threads_start']} / {s['fds_start']}", f"{s['threads_end']} / {s['fds_end']}")
    console.print(table)
    console.print(
        f"requests {s['requests']} (200: {s['answered_200']}, by version {s['responses_by_version']}), "
        f"errors {s['errors']}, swaps {s['swaps']} (failed {s['swaps_failed']}, p50 {s['swap_seconds_p50']} s), "
        f"{s['requests_per_s']} req/s; RSS range {s['rss_mib_min']}-{s['rss_mib_max']} MiB "
        f"(max deviation {s['rss_max_deviation']:.1%})"
    )
    verdict = "PASS" if s["pass_zero_errors"] and s["pass_rss_flat"] else "FAIL"
    console.print(f"{verdict}: zero errors {s['pass_zero_errors']}, RSS flat within "
                  f"{setup['rss_tolerance']:.0%} {s['pass_rss_flat']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="measured duration (after warm-up)")
    p.add_argument("--warmup-s", type=float, default=30.0, help="load + two swaps before measuring")
    p.add_argument("--rate", type=float, default=200.0, help="target requests/s (steady pace)")
    p.add_argument("--concurrency", type=int, default=16, help="client connections")
    p.add_argument("--swap-every", type=float, default=30.0, help="seconds between swaps (A -> B -> A ...)")
    p.add_argument("--window-s", type=float, default=30.0, help="sampling window for RSS and latency")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="request budget (bound)")
    p.add_argument("--max-swaps", type=int, default=200, help="swap budget (bound)")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS deviation from the first sample")
    p.add_argument("--bundle", default=None, help="bundle to soak (default: models/default, else a tiny synthetic one)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of the server")
    p.add_argument("--out", default=None, help="JSON output (default runs/soak/soak-<UTC time>.json)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.minutes > 24 * 60 or args.rate <= 0 or args.concurrency < 1:
        p.error("need 0 < --minutes <= 1440, --rate > 0, --concurrency >= 1")

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else REPO / "runs" / "soak" / f"soak-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="oodguard-soak-") as tmp:
        work = Path(tmp)
        a, b, what = make_versions(_default_bundle(args.bundle), work)
        models = work / "models"
        log_path = out.with_suffix(".server.log")
        serve_args = ["--bundle", str(a), "--models-dir", str(models), "--threads", str(args.threads), "--decode-threads", "1"]
        proc, base = start_oodguard(serve_args, make_jpeg(seed=1), log_path, env={**clean_env(), "OODGUARD_ADMIN_TOKEN": token})
        try:
            (models / "incoming").mkdir(exist_ok=True)
            shutil.copytree(b, models / "incoming" / "soak-b")
            r = httpx.post(f"{base}/admin/models", json={"path": "incoming/soak-b"},
                           headers={"Authorization": f"Bearer {token}"}, timeout=120)
            if r.status_code not in (200, 201):
                raise SystemExit(f"registering soak-b failed: {r.status_code} {r.text}")
            load_before = os.getloadavg()
            t_start = time.time()
            warm, soak = asyncio.run(run(args, base, proc.pid, load_manifest(a).name, token))
            load_after = os.getloadavg()
        finally:
            exit_code = stop_server(proc, grace_s=60)

    setup = {
        "minutes": args.minutes, "warmup_s": args.warmup_s, "rate": args.rate, "concurrency": args.concurrency,
        "swap_every_s": args.swap_every, "window_s": args.window_s, "rss_tolerance": args.rss_tolerance,
        "bundle": what, "server_threads": args.threads, "started_at": datetime.fromtimestamp(t_start, timezone.utc).isoformat(),
    }
    machine = {
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "note": "client and server share the machine's cores; other work on the machine is included in the load",
    }
    summary = summarise(soak, warm, args)
    summary["server_exit_code"] = exit_code
    result = {
        "setup": setup, "machine": machine, "summary": summary,
        "windows": [asdict(w) for w in soak.windows], "swaps": soak.swaps, "errors": soak.errors[:100],
        "warmup": {"requests": warm.requests, "errors": warm.errors[:20], "swaps": warm.swaps},
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_report(summary, soak, setup)
    print(f"wrote {out} (server log {log_path})")
    return 0 if summary["pass_zero_errors"] and summary["pass_rss_flat"] and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
