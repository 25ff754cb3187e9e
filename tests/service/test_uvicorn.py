"""A real `oodguard serve` process on a loopback port: predict, errors, metrics, clean SIGTERM shutdown."""

from __future__ import annotations

import io
import os
import signal
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.serve_process import start_serve

from .bundle_factory import encode_image

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tiny_bundle, request, tmp_path):
    extra = getattr(request, "param", [])
    with start_serve(["--bundle", str(tiny_bundle), "--max-wait-ms", "2", "--decode-threads", "1", *extra],
                     tmp_path / "serve.log") as served:
        yield served


def test_serve_predict_errors_metrics_and_clean_shutdown(server):
    base = server.base
    with httpx.Client(base_url=base, timeout=10) as c:
        r = c.post("/v1/predict", files={"file": ("img.png", encode_image((0, 255, 0), fmt="PNG"), "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        (pred,) = body["predictions"]
        assert pred["label"] == "green" and pred["decision"] == "accept"
        for key in ("class_index", "confidence", "top_k", "ood_score", "score_name", "p_value", "threshold", "operating_point"):
            assert key in pred
        assert body["model"]["name"] == "tiny" and body["request_id"] == r.headers["x-request-id"]

        garbage = c.post("/v1/predict", files={"file": ("x.jpg", os.urandom(512), "image/jpeg")})
        assert 400 <= garbage.status_code < 500
        assert garbage.headers["content-type"].startswith("application/json") and "code" in garbage.json()["error"]

        huge = c.post("/v1/predict", content=b"\0" * (17 << 20), headers={"content-type": "image/png"})
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"

        metrics = c.get("/metrics").text
        assert 'oodguard_requests_total{endpoint="/v1/predict",status="200"} 1.0' in metrics
        assert 'oodguard_decisions_total{decision="accept"} 1.0' in metrics
        assert "server" not in {k.lower() for k in r.headers}  # no server banner

        # A body far larger than the head limit, sent with its head in one write, is still served.
        noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noise).save(buf, format="PNG")
        assert len(buf.getvalue()) > 100_000
        big = c.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
        assert big.status_code == 200, big.text

    assert server.stop(signal.SIGTERM) == 0, server.log()
    assert "Traceback" not in server.log()


def _raw(base: str, payload: bytes, wait_s: float = 0.0) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        if payload:
            s.sendall(payload)
        time.sleep(wait_s)
        chunks = []
        while chunk := s.recv(65536):  # until the server closes the connection
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize("server", [["--client-timeout", "1"]], indirect=True)
def test_oversized_and_slow_request_heads_are_cut_off(server):
    base = server.base
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    reply = _raw(base, big)
    assert reply.startswith(b"HTTP/1.1 431") and b'"header_too_large"' in reply

    t0 = time.monotonic()
    reply = _raw(base, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
    assert reply.startswith(b"HTTP/1.1 408") and 0.8 < time.monotonic() - t0 < 20  # client timeout 1 s; generous

    t0 = time.monotonic()
    assert _raw(base, b"").startswith(b"HTTP/1.1 408")  # connects and says nothing
    assert time.monotonic() - t0 < 20

    ok = _raw(base, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("server", [["--max-connections", "2"]], indirect=True)
def test_connections_beyond_the_limit_get_a_json_503(server):
    base = server.base
    host, port = base.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.2)
        reply = _raw(base, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503") and b'"too_many_connections"' in reply and b"retry-after: 1" in reply
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert _raw(base, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_quiet_garbage_collector_freezes_and_raises_the_young_threshold():
    import gc

    from oodguard.service.cli import GC_GEN0_THRESHOLD, quiet_garbage_collector

    before = gc.get_threshold()
    try:
        quiet_garbage_collector()
        assert gc.get_freeze_count() > 1000  # the imported modules' objects
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


_MMAP_CHILD = """
import sys
from oodguard.service.cli import pin_mmap_threshold
def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
pinned = pin_mmap_threshold(int(sys.argv[1]))
base = rss_mib()
a = b"a" * (16 << 20); del a  # freeing an mmapped 16 MiB chunk raises glibc's dynamic threshold to 16 MiB
chunks, keep = [], []
for i in range(16):  # 64 MiB of 4 MiB buffers, with small heap survivors between them (no trimming)
    chunks.append(b"b" * (4 << 20)); keep.append(b"x" * 1024 + bytes(i))
del chunks
print(pinned, rss_mib() - base)
"""


@pytest.mark.parametrize("threshold, pinned, max_growth_mib", [(131072, True, 8), (0, False, None)])
def test_a_pinned_mmap_threshold_returns_large_freed_buffers_to_the_os(threshold, pinned, max_growth_mib):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MMAP_CHILD, str(threshold)], capture_output=True, text=True, timeout=60)
    was_pinned, growth = out.stdout.split()
    assert was_pinned == str(pinned), out.stderr
    if max_growth_mib is not None:
        assert int(growth) < max_growth_mib, growth  # glibc's dynamic threshold kept ~64 MiB resident



# -- the uvicorn internals the connection guards rely on ---------------------------------------------------


def test_uvicorn_and_httptools_are_pinned_to_the_versions_the_guards_were_tested_with():
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from oodguard.service.http_protocol import TESTED_VERSIONS

    root = Path(__file__).resolve().parents[2]
    serve_extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    lock = (root / "locks" / "serve.txt").read_text()
    for package, tested in TESTED_VERSIONS.items():
        assert version(package) == tested, (
            f"{package} {version(package)} is installed, but service/http_protocol.py's guards were tested with {tested}"
        )
        assert any(req.split("==")[0].split("[")[0] == package and req.endswith(f"=={tested}") for req in serve_extra), serve_extra
        assert f"\n{package}=={tested} " in lock


def test_the_httptools_protocol_hooks_the_guards_rely_on_are_unchanged():
    import hashlib
    import inspect
    import re

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

    from oodguard.service.http_protocol import UVICORN_DATA_RECEIVED_SHA256, UVICORN_HOOKS, GuardedHttpToolsProtocol

    missing = [m for m in UVICORN_HOOKS["methods"] if not callable(getattr(HttpToolsProtocol, m, None))]
    assert not missing, f"uvicorn's HttpToolsProtocol no longer has {missing}: the guards in service/http_protocol.py break"
    protocol_source = inspect.getsource(HttpToolsProtocol)
    for attribute in UVICORN_HOOKS["attributes"]:
        assert re.search(rf"self\.{attribute}\b[^=\n]*=", protocol_source), f"HttpToolsProtocol no longer sets self.{attribute}"
    cycle_source = inspect.getsource(RequestResponseCycle)
    for attribute in UVICORN_HOOKS["cycle_attributes"]:
        assert re.search(rf"self\.{attribute}\b[^=\n]*=", cycle_source), f"RequestResponseCycle no longer sets self.{attribute}"
    # data_received is re-implemented, not extended: upstream's must still be the one it was copied from.
    upstream = hashlib.sha256(inspect.getsource(HttpToolsProtocol.data_received).encode()).hexdigest()
    assert upstream == UVICORN_DATA_RECEIVED_SHA256, "uvicorn changed HttpToolsProtocol.data_received: re-read it"
    # Everything the subclass overrides is on the list the test checks.
    overridden = {n for n in vars(GuardedHttpToolsProtocol) if hasattr(HttpToolsProtocol, n) and not n.startswith("__")}
    assert overridden <= set(UVICORN_HOOKS["methods"]), overridden - set(UVICORN_HOOKS["methods"])


_ARENAS_CHILD = """
import ctypes, sys, threading
from oodguard.service.cli import limit_malloc_arenas
limited = limit_malloc_arenas(int(sys.argv[1]))
def work():
    keep = [b"x" * (1024 + i % 3000) for i in range(20000)]  # > 512 B: glibc malloc, not pymalloc
    del keep
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(limited, flush=True)
ctypes.CDLL("libc.so.6").malloc_stats()  # "Arena N:" per arena, on stderr
"""


@pytest.mark.parametrize("arenas, limited", [(2, True), (0, False)])
def test_malloc_arenas_are_capped_for_the_service_threads(arenas, limited):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _ARENAS_CHILD, str(arenas)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(limited)]
    used = out.stderr.count("Arena ")
    if limited:
        assert 1 <= used <= 2, out.stderr
    else:  # glibc's default: the 8 threads get arenas of their own (8 per core allowed)
        assert used > 2, out.stderr
