"""Hostile soak (not part of the test suite): valid traffic mixed with issue 18's hostile requests, loopback only.

Starts `oodguard serve` on the shipped bundle (models/default) with a models directory and the admin
API on, then runs two phases on the same server:

1. clean: valid /v1/predict uploads (JPEG, multipart) and GET /v1/models at a steady --rate for
   --clean-minutes - the reference p99;
2. hostile: the same valid traffic for --minutes while --attackers loops send, in turn, every
   reproduction of issue 18's adversarial review (below; --kinds picks some). The attackers run in
   their own process with their own client, as they would be other machines: sharing the valid
   client's event loop, their 16 MiB sends delayed the valid requests on the client side.

Then it lets the server settle for --settle-s and samples its RSS again: the server's and every
process's below it (heavy-decode worker, validation fork server), both started by one large PNG and
one refused upload at the end of the warm-up. Reported: the status
counts of valid and hostile requests (5xx counted separately), RSS after warm-up, at the end of the
hostile phase and after settling, and the p50 / p99 of valid requests in each phase. Pass criteria
(exit status 1 when one fails): no 5xx at all - 503s included, valid traffic stays under the
server's queue and timeout limits - and every valid request answered 200; RSS after settling within
--rss-tolerance (10%) of its value after warm-up; hostile-phase p99 of valid requests at most
--p99-factor (2x) the clean p99. Everything is also written as JSON, with the tail's attribution:
for each hostile kind, the share of the slowest 1% of valid requests that overlapped one of its
requests against the share of all valid requests that did (a lift far above 1 names the cause).

Hostile requests (issue 18 finding numbers; each expects a 4xx, a closed connection, or nothing):
   1  /v2 infer [64,3,32,32] binary with "outputs" naming `logits` 20,000 times      -> 422
   2  admin upload: tar.gz of 1,200 nested directories                                 -> 422 archive
   3  admin upload: a bundle adding 0 x Loop(2^62) to its logits                       -> 422 timeout
   4  16 MiB JSON bodies of numbers to /v2 and /v1                                     -> 422
   5  20 pipelined requests on a connection that never reads, held open                -> closed by the server
   6  /v1 JSON {"x": <5000-digit integer>}                                             -> 422
   7  Content-Length 100000, 10 bytes sent, disconnect                                 -> (499 in the metrics)
   8  admin upload: external data in a local function's attribute default              -> 422 onnx
   9  admin upload: a NaN threshold in the manifest                                    -> 422 schema
  10  admin register: a 300-character path; activate a 300-character name              -> 400 / 422
  11  a pipelined second request with a 120 KB header                                  -> closed, never served
  12  admin paths with a wrong token (admin on: 401/403; off is tested in the suite)   -> 4xx
  13  a 16-bit 4096 x 4096 PNG to /v1/predict                                          -> 200 (bounded memory)
  14  GET /v1/models (versions listed from the store, each manifest parsed once)       -> 200

Bounded: --minutes, --max-requests valid requests, and one hostile request per attacker at a time.
Needs the dev extra (onnx, for the hostile bundles). Example (the full run, ~13 min on quiet cores):

    python bench/soak_hostile.py --minutes 10 --clean-minutes 2
    python bench/soak_hostile.py --minutes 0.5 --clean-minutes 0.25 --rate 20 --out /tmp/soak.json   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import platform
import secrets
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/soak_hostile.py` puts bench/ first on sys.path, not the repo
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.load import make_jpeg  # noqa: E402
from bench.serve_process import clean_env, descendants, proc_vm_kb, start_oodguard, stop as stop_server  # noqa: E402

MIB = 1 << 20
V2 = "/v2/models/default/infer"


# -- the hostile requests, built once -------------------------------------------------------------------


def _tar(build) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        build(tar)
    return buf.getvalue()


def _bundle_tar(bundle: Path) -> bytes:
    return _tar(lambda tar: tar.add(bundle, arcname="bundle"))


def _nested_tar(depth: int = 1200) -> bytes:
    def build(tar: tarfile.TarFile) -> None:
        for level in range(1, depth + 1):
            info = tarfile.TarInfo("/".join(["d"] * level))
            info.type = tarfile.DIRTYPE
            tar.addfile(info)

    return _tar(build)


def _external_function_attribute_bundle(root: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    from oodguard.service.bundle import write_manifest
    from oodguard.service.manifest import MODEL_FILE, load_manifest
    from tests.service.bundle_factory import build_tiny_onnx, make_tiny_bundle

    bundle = make_tiny_bundle(root, "tiny", "ext")
    tensor = numpy_helper.from_array(np.ones((1,), np.float32), "w")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    tensor.ClearField("raw_data")
    fn = helper.make_function("local.fn", "F", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
                              [helper.make_opsetid("", 17)])
    fn.attribute_proto.append(helper.make_attribute("w", tensor))
    model = build_tiny_onnx()
    model.functions.append(fn)
    model.opset_import.append(helper.make_opsetid("local.fn", 1))
    (bundle / MODEL_FILE).write_bytes(model.SerializeToString())
    write_manifest(bundle, load_manifest(bundle))
    return bundle


def _nan_threshold_bundle(root: Path) -> Path:
    from tests.service.bundle_factory import make_tiny_bundle

    bundle = make_tiny_bundle(root, "tiny", "nan")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["operating_points"][0]["threshold"] = float("nan")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def _png(arr_or_img) -> bytes:
    buf = io.BytesIO()
    (arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


@dataclass
class Payloads:
    v2_repeated_outputs: tuple[bytes, dict]
    nested_tar: bytes
    endless_tar: bytes
    external_tar: bytes
    nan_tar: bytes
    json_numbers_v2: bytes
    json_numbers_v1: bytes
    png16: bytes

    @classmethod
    def build(cls, work: Path) -> "Payloads":
        from tests.service.bundle_factory import make_endless_bundle

        raw = np.zeros((64, 3, 32, 32), "<f4").tobytes()
        head = json.dumps({"inputs": [{"name": "image", "shape": [64, 3, 32, 32], "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "outputs": [{"name": "logits"}] * 20_000}).encode()
        numbers = b'{"inputs": [{"name": "image", "shape": [64, 3, 32, 32], "datatype": "FP32", "data": ['
        numbers += b"0," * ((16 * MIB - 2048 - len(numbers)) // 2) + b"0]}]}"
        v1_numbers = b'{"images": [], "x": [' + b"0," * ((16 * MIB - 2048) // 2) + b"0]}"
        wide = (np.arange(4096 * 4096, dtype=np.uint32) % 65536).astype(np.uint16).reshape(4096, 4096)
        return cls(
            v2_repeated_outputs=(head + raw, {"Inference-Header-Content-Length": str(len(head))}),
            nested_tar=_nested_tar(),
            endless_tar=_bundle_tar(make_endless_bundle(work / "endless")),
            external_tar=_bundle_tar(_external_function_attribute_bundle(work / "external")),
            nan_tar=_bundle_tar(_nan_threshold_bundle(work / "nan")),
            json_numbers_v2=numbers,
            json_numbers_v1=v1_numbers,
            png16=_png(wide),
        )


# -- bookkeeping ----------------------------------------------------------------------------------------


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)  # seconds, valid requests answered 200
    valid_status: Counter = field(default_factory=Counter)
    hostile_status: Counter = field(default_factory=Counter)  # "kind status" -> count
    errors: list[str] = field(default_factory=list)  # transport errors of valid requests, and 5xx bodies
    requests: int = 0
    valid_spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of valid 200s
    hostile_spans: list[tuple[str, float, float]] = field(default_factory=list)  # (kind, start, end)


def _record(phase: Phase, kind: str, status: int | str, body: str = "") -> None:
    phase.hostile_status[f"{kind} {status}"] += 1
    if isinstance(status, int) and status >= 500:
        phase.errors.append(f"{kind}: {status} {body[:200]}")


def rss_mib(pid: int) -> float:
    """Resident memory of the server and every process below it (heavy-decode workers, the validation fork
    server and children), in MiB: a sum of RSS, so pages shared after a fork count once per process."""
    return round(sum(proc_vm_kb(p, "VmRSS") for p in [pid, *descendants(pid)]) / 1024, 1)


# -- traffic --------------------------------------------------------------------------------------------


async def valid_traffic(client: httpx.AsyncClient, phase: Phase, rate: float, concurrency: int, stop_at: float,
                        max_requests: int) -> None:
    files = {"file": ("img.jpg", make_jpeg(seed=1), "image/jpeg")}
    next_slot = [time.monotonic()]

    async def worker() -> None:
        while True:
            slot = max(next_slot[0], time.monotonic() - 1.0 / rate)  # steady pace; never a catch-up burst
            next_slot[0] = slot + 1.0 / rate
            if slot >= stop_at or phase.requests >= max_requests:
                return
            if (delay := slot - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            phase.requests += 1
            start = time.monotonic()
            try:  # one request in 20 lists the models (#14): answered from the manifest cache
                if phase.requests % 20 == 0:
                    r = await client.get("/v1/models")
                else:
                    r = await client.post("/v1/predict", files=files)
            except httpx.HTTPError as exc:
                phase.errors.append(f"valid: {type(exc).__name__}: {exc}")
                phase.valid_status["transport-error"] += 1
                continue
            phase.valid_status[r.status_code] += 1
            if r.status_code == 200:
                end = time.monotonic()
                phase.latencies.append(end - start)
                phase.valid_spans.append((start, end))
            else:
                phase.errors.append(f"valid: {r.status_code} {r.text[:200]}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _raw(port: int, data: bytes, read_s: float = 10.0, close_after_send: bool = False) -> bytes:
    """Send `data` on a fresh connection; return what the server sent until it closed (or read_s passed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if close_after_send:
            return b""
        out = b""
        deadline = time.monotonic() + read_s
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=max(0.01, deadline - time.monotonic()))
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def _first_status(data: bytes) -> int | str:
    return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else "closed"


async def attacker(client: httpx.AsyncClient, port: int, token: str, p: Payloads, phase: Phase, offset: int,
                   stop_at: float, kinds: list[str]) -> None:
    """Sends every hostile request in turn (starting at `offset`), one at a time, until `stop_at`."""
    admin = {"Authorization": f"Bearer {token}"}
    gz = {**admin, "Content-Type": "application/gzip"}

    async def post(kind: str, path: str, **kw) -> None:
        try:
            r = await client.post(path, **kw)
        except httpx.HTTPError as exc:
            _record(phase, kind, f"transport-error {type(exc).__name__}")
            return
        _record(phase, kind, r.status_code, r.text)

    async def pipelined_never_read() -> None:  # 5: the server answers two and closes; we hold it 3 s unread
        one = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(one * 20)
        await writer.drain()
        await asyncio.sleep(3.0)
        writer.close()
        _record(phase, "05-pipelined-unread", "sent")

    async def disconnect_mid_body() -> None:  # 7
        head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        await _raw(port, head + b"0123456789", close_after_send=True)
        _record(phase, "07-disconnect", "sent")

    async def pipelined_big_head() -> None:  # 11
        first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        second = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 120_000 + b"\r\n\r\n"
        out = await _raw(port, first + second, read_s=5)
        served = out.count(b"HTTP/1.1 200")
        _record(phase, "11-pipelined-120KB-head", f"served-{served}" if served <= 1 else "served-the-big-head-500")

    steps = [
        ("01-v2-repeated-outputs", lambda: post("01-v2-repeated-outputs", V2, content=p.v2_repeated_outputs[0],
                                                headers=p.v2_repeated_outputs[1])),
        ("02-nested-tar", lambda: post("02-nested-tar", "/admin/models", content=p.nested_tar, headers=gz)),
        ("03-endless-loop-bundle", lambda: post("03-endless-loop-bundle", "/admin/models", content=p.endless_tar,
                                                headers=gz, timeout=120)),
        ("04-16MiB-json-v2", lambda: post("04-16MiB-json-v2", V2, content=p.json_numbers_v2)),
        ("04-16MiB-json-v1", lambda: post("04-16MiB-json-v1", "/v1/predict", content=p.json_numbers_v1,
                                          headers={"content-type": "application/json"})),
        ("05-pipelined-unread", pipelined_never_read),
        ("06-5000-digit-int", lambda: post("06-5000-digit-int", "/v1/predict",
                                           content=b'{"x": ' + b"9" * 5000 + b', "images": []}',
                                           headers={"content-type": "application/json"})),
        ("07-disconnect", disconnect_mid_body),
        ("08-external-data-in-function", lambda: post("08-external-data-in-function", "/admin/models",
                                                      content=p.external_tar, headers=gz)),
        ("09-nan-threshold", lambda: post("09-nan-threshold", "/admin/models", content=p.nan_tar, headers=gz)),
        ("10-long-register-path", lambda: post("10-long-register-path", "/admin/models", json={"path": "a" * 300},
                                               headers=admin)),
        ("10-long-activate-name", lambda: post("10-long-activate-name", "/admin/models/" + "n" * 300 + "/1/activate",
                                               headers=admin)),
        ("11-pipelined-120KB-head", pipelined_big_head),
        ("12-wrong-admin-token", lambda: post("12-wrong-admin-token", "/admin/rollback",
                                              headers={"Authorization": "Bearer " + "x" * 40})),
        ("13-16-bit-4096-png", lambda: post("13-16-bit-4096-png", "/v1/predict", content=p.png16,
                                            headers={"content-type": "image/png"})),
    ]
    steps = [(kind, step) for kind, step in steps if not kinds or any(kind.startswith(k) for k in kinds)]
    i = offset
    while time.monotonic() < stop_at:
        kind, step = steps[i % len(steps)]
        start = time.monotonic()
        await step()
        phase.hostile_spans.append((kind, start, time.monotonic()))
        i += 1
        await asyncio.sleep(0.05)


def tail_attribution(phase: Phase, quantile: float = 99.0) -> dict:
    """Which hostile kinds overlap the slowest valid requests, against how often they overlap any valid request.

    For each kind: the share of the tail (valid requests at or above the `quantile` latency) that
    overlapped at least one request of that kind, the share of all valid requests that did, and their
    ratio (lift). A kind whose lift is well above 1 is where the tail comes from; kinds that simply take
    long overlap everything and have a lift near 1.
    """
    if not phase.valid_spans or not phase.hostile_spans:
        return {}
    cut = float(np.percentile([end - start for start, end in phase.valid_spans], quantile))
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for kind, start, end in phase.hostile_spans:
        by_kind.setdefault(kind, []).append((start, end))
    tail = [(s, e) for s, e in phase.valid_spans if e - s >= cut]
    out = {}
    for kind, spans in sorted(by_kind.items()):
        starts = np.array([s for s, _ in spans])
        ends = np.array([e for _, e in spans])

        def overlaps(s: float, e: float) -> bool:
            return bool(np.any((starts < e) & (ends > s)))

        in_tail = sum(overlaps(s, e) for s, e in tail) / len(tail)
        in_all = sum(overlaps(s, e) for s, e in phase.valid_spans) / len(phase.valid_spans)
        out[kind] = {"tail_share": round(in_tail, 3), "all_share": round(in_all, 3),
                     "lift": round(in_tail / in_all, 2) if in_all else None,
                     "median_s": round(float(np.median(ends - starts)), 3)}
    return {"quantile": quantile, "cut_ms": round(cut * 1000, 2), "tail_n": len(tail), "kinds": out}


async def attack(base: str, port: int, token: str, payloads: Payloads, attackers: int, kinds: list[str],
                 stop_at: float) -> Phase:
    """`attackers` hostile loops on their own client until `stop_at`; what they saw (statuses, spans, errors)."""
    phase = Phase()
    async with httpx.AsyncClient(base_url=base, timeout=60.0, limits=httpx.Limits(max_connections=attackers + 2)) as client:
        await asyncio.gather(*(attacker(client, port, token, payloads, phase, k * 3, stop_at, kinds)
                               for k in range(attackers)))
    return phase


def attackers_process(args, base: str, port: int, token: str, payloads: Payloads, start, conn) -> None:
    """The attackers' own process (forked): waits for `start`, attacks for --minutes, sends back its Phase.

    Apart from the valid traffic's client, as attackers are in reality: in one event loop, sending a
    16 MiB body or waiting on a held-open connection delayed the valid requests' own sends and reads,
    and that client-side delay was measured as the server's latency.
    """
    start.wait()
    phase = asyncio.run(attack(base, port, token, payloads, args.attackers, args.kinds, time.monotonic() + args.minutes * 60))
    conn.send((dict(phase.hostile_status), phase.hostile_spans, phase.errors))
    conn.close()


async def run(args, base: str, port: int, pid: int, token: str, warm_png: bytes, warm_tar: bytes, start_attack,
              attack_results) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=60.0, limits=limits) as client:
        warm = Phase()
        await valid_traffic(client, warm, args.rate, args.concurrency, time.monotonic() + args.warmup_s, args.max_requests)
        # the processes a server keeps once used (a heavy-decode worker, the validation fork server) are
        # started before RSS is first sampled: what is compared is the steady state, not their start-up
        await client.post("/v1/predict", content=warm_png, headers={"content-type": "image/png"})
        await client.post("/admin/models", content=warm_tar, headers={"Authorization": f"Bearer {token}",
                                                                       "Content-Type": "application/gzip"})
        rss_start = rss_mib(pid)

        clean = Phase()
        await valid_traffic(client, clean, args.rate, args.concurrency, time.monotonic() + args.clean_minutes * 60,
                            args.max_requests)
        rss_after_clean = rss_mib(pid)

        hostile = Phase()
        start_attack.set()
        stop_at = time.monotonic() + args.minutes * 60
        rss_samples: list[float] = []

        async def sample() -> None:
            while time.monotonic() < stop_at:
                rss_samples.append(rss_mib(pid))
                await asyncio.sleep(1.0)

        await asyncio.gather(valid_traffic(client, hostile, args.rate, args.concurrency, stop_at, args.max_requests), sample())
        # the attackers' last requests may still be running (an endless bundle: up to --validate-timeout)
        statuses, spans, errors = await asyncio.get_running_loop().run_in_executor(None, attack_results.recv)
        hostile.hostile_status.update(statuses)
        hostile.hostile_spans.extend(spans)
        hostile.errors.extend(errors)
        rss_end = rss_mib(pid)
        await asyncio.sleep(args.settle_s)
        rss_settled = rss_mib(pid)
        metrics = (await client.get("/metrics")).text
        models = await client.get("/v1/models")
    return {
        "warm": warm, "clean": clean, "hostile": hostile, "rss_start": rss_start, "rss_after_clean": rss_after_clean,
        "rss_peak_sampled": max(rss_samples, default=rss_end), "rss_end": rss_end, "rss_settled": rss_settled,
        "metrics": metrics, "models_status": models.status_code,
    }


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else float("nan")


def _server_5xx(metrics: str) -> dict[str, float]:
    out = {}
    for line in metrics.splitlines():
        if line.startswith("oodguard_requests_total{") and 'status="5' in line:
            out[line.split(" ")[0]] = float(line.split()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="hostile phase (valid + hostile traffic)")
    p.add_argument("--clean-minutes", type=float, default=2.0, help="clean phase (valid traffic only): the reference p99")
    p.add_argument("--warmup-s", type=float, default=20.0, help="valid traffic before RSS is first sampled")
    p.add_argument("--settle-s", type=float, default=10.0, help="idle time before the last RSS sample")
    p.add_argument("--rate", type=float, default=50.0, help="valid requests/s (steady pace)")
    p.add_argument("--concurrency", type=int, default=8, help="valid-traffic connections")
    p.add_argument("--attackers", type=int, default=2, help="hostile loops, each one request at a time")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="valid-request budget per phase (bound)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of the server")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed settled-RSS growth over the start")
    p.add_argument("--p99-factor", type=float, default=2.0, help="allowed hostile-phase p99 / clean p99")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE", help="extra server environment")
    p.add_argument("--out", default=None, help="JSON output (default runs/soak/soak-hostile-<UTC time>.json)")
    p.add_argument("--kinds", type=lambda v: [k for k in v.split(",") if k], default=[],
                   help="only the hostile requests whose kind starts with one of these (e.g. 13,04); default all")
    args = p.parse_args(argv)
    if not (0 < args.minutes <= 24 * 60 and 0 < args.clean_minutes <= 24 * 60 and args.rate > 0
            and args.concurrency >= 1 and args.attackers >= 1):
        p.error("need 0 < --minutes, --clean-minutes <= 1440, --rate > 0, --concurrency >= 1, --attackers >= 1")

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else REPO / "runs" / "soak" / f"soak-hostile-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".server.log")
    token = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="oodguard-soak-hostile-") as tmp:
        work = Path(tmp)
        payloads = Payloads.build(work)
        serve_args = ["--bundle", str(REPO / "models" / "default"), "--models-dir", str(work / "models"),
                      "--threads", str(args.threads), "--decode-threads", "1", "--validate-timeout", "10",
                      "--client-timeout", "5"]
        env = {**clean_env(), "OODGUARD_ADMIN_TOKEN": token, "OMP_NUM_THREADS": "1", **dict(e.split("=", 1) for e in args.server_env)}
        proc, base = start_oodguard(serve_args, make_jpeg(seed=1), log_path, env=env)
        port = int(base.rsplit(":", 1)[1])
        load_before, t_start = os.getloadavg(), time.time()
        fork = multiprocessing.get_context("fork")  # before any event loop or thread: the payloads are inherited
        start_attack = fork.Event()
        attack_results, attack_conn = fork.Pipe(duplex=False)
        attackers = fork.Process(target=attackers_process, args=(args, base, port, token, payloads, start_attack, attack_conn),
                                 name="soak-attackers", daemon=True)
        attackers.start()
        try:
            result = asyncio.run(run(args, base, port, proc.pid, token, payloads.png16, payloads.nan_tar, start_attack,
                                     attack_results))
        finally:
            if attackers.is_alive():
                attackers.kill()
            attackers.join(10)
            exit_code = stop_server(proc, grace_s=60)
        load_after = os.getloadavg()
        leftovers = sorted(p.name for p in (work / "models" / ".incoming").glob("*")) if (work / "models" / ".incoming").is_dir() else []

    clean, hostile = result["clean"], result["hostile"]
    server_log = log_path.read_text(errors="replace")
    fivexx = {
        "valid_clean": sum(n for s, n in clean.valid_status.items() if isinstance(s, int) and s >= 500),
        "valid_hostile": sum(n for s, n in hostile.valid_status.items() if isinstance(s, int) and s >= 500),
        "hostile": sum(n for k, n in hostile.hostile_status.items() if k.split()[-1].isdigit() and int(k.split()[-1]) >= 500)
        + sum(n for k, n in hostile.hostile_status.items() if k.endswith("-500")),
        "server_metrics": _server_5xx(result["metrics"]),
    }
    p99_clean, p99_hostile = _pct(clean.latencies, 99), _pct(hostile.latencies, 99)
    rss_growth = (result["rss_settled"] - result["rss_start"]) / result["rss_start"]
    checks = {
        "zero_5xx": not any(v for k, v in fivexx.items() if k != "server_metrics") and not any(fivexx["server_metrics"].values()),
        "valid_all_200": set(clean.valid_status) <= {200} and set(hostile.valid_status) <= {200},
        "rss_back_within_tolerance": rss_growth <= args.rss_tolerance,
        "p99_within_factor": p99_hostile <= args.p99_factor * p99_clean,
        "no_traceback": "Traceback" not in server_log,
        "no_staging_leftover": not leftovers,
        "server_exit_0": exit_code == 0,
    }
    summary = {
        "valid": {"clean": dict(clean.valid_status), "hostile": {str(k): v for k, v in hostile.valid_status.items()}},
        "hostile_requests": dict(sorted(hostile.hostile_status.items())),
        "5xx": fivexx,
        "rss_mib": {k: result[k] for k in ("rss_start", "rss_after_clean", "rss_peak_sampled", "rss_end", "rss_settled")},
        "rss_growth": round(rss_growth, 4),
        "latency_ms": {"clean": {"p50": _pct(clean.latencies, 50), "p99": p99_clean, "n": len(clean.latencies)},
                       "hostile": {"p50": _pct(hostile.latencies, 50), "p99": p99_hostile, "n": len(hostile.latencies)}},
        "tail_attribution": tail_attribution(hostile),
        "checks": checks,
        "server_exit_code": exit_code,
        "staging_leftovers": leftovers,
    }
    setup = {**vars(args), "bundle": "models/default", "started_at": datetime.fromtimestamp(t_start, timezone.utc).isoformat(),
             "server_args": serve_args, "command": " ".join([sys.executable, *sys.argv])}
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
               "note": "valid client, attackers (own process) and server share the machine's cores"}
    out.write_text(json.dumps({"setup": setup, "machine": machine, "summary": summary,
                               "errors": (clean.errors + hostile.errors)[:100]}, indent=2, default=str) + "\n")

    print(f"valid requests   clean {dict(clean.valid_status)}   hostile phase {dict(hostile.valid_status)}")
    print("hostile requests (kind status: count)")
    for key, n in sorted(hostile.hostile_status.items()):
        print(f"  {key:<50} {n}")
    print(f"5xx: {fivexx}")
    rss = summary["rss_mib"]
    print(f"RSS MiB: start {rss['rss_start']}  after clean {rss['rss_after_clean']}  peak (1 s samples) "
          f"{rss['rss_peak_sampled']}  end {rss['rss_end']}  settled {rss['rss_settled']}  growth {rss_growth:+.1%}")
    print(f"valid latency ms: clean p50 {summary['latency_ms']['clean']['p50']} p99 {p99_clean}   "
          f"hostile p50 {summary['latency_ms']['hostile']['p50']} p99 {p99_hostile}")
    attribution = summary["tail_attribution"]
    if attribution:
        print(f"slowest 1% of valid requests (>= {attribution['cut_ms']} ms, n={attribution['tail_n']}): "
              "share overlapping each hostile kind vs share of all valid requests")
        for kind, row in sorted(attribution["kinds"].items(), key=lambda kv: -(kv[1]["lift"] or 0)):
            print(f"  {kind:<30} tail {row['tail_share']:.3f}  all {row['all_share']:.3f}  lift {row['lift']}  "
                  f"(median {row['median_s']} s)")
    print("checks: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    print(f"wrote {out} (server log {log_path})")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
