"""Slow and idle clients against a real `oodguard serve` on loopback: none can hold the server.

Already covered in test_uvicorn.py (not repeated here): a head larger than the limit (431), a head
that never completes and a connection that says nothing (408 after the head deadline), connections
beyond --max-connections (JSON 503), a 17 MiB body (413). This file adds:

- slowloris: a head dribbled one byte at a time is still cut at the head deadline, counted from its
  first byte (dribbling does not extend it);
- a client that stalls in the middle of its body gets 408 `body_timeout` and the connection closes;
- an idle keep-alive connection is closed after the keep-alive timeout;
- 300 concurrent idle / half-open connections cost little memory, normal requests are still served
  promptly meanwhile, and the server closes every one of them at the head deadline.
"""

from __future__ import annotations

import selectors
import socket
import time

import httpx
import pytest

from bench.serve_process import read_http_response, start_serve

from .bundle_factory import encode_image

pytestmark = pytest.mark.slow

HEAD_DEADLINE_S = 1.0
PNG = encode_image((0, 0, 255), fmt="PNG")


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("slow") / "serve.log"
    with start_serve(
        ["--bundle", str(tiny_bundle), "--client-timeout", str(HEAD_DEADLINE_S), "--decode-threads", "1"],
        log,
        env={"OODGUARD_KEEP_ALIVE_TIMEOUT_S": "1"},
    ) as proc:
        yield proc
        assert proc.stop() == 0, proc.log()


def _connect(base: str, timeout: float = 10.0) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_slowloris_dribbling_a_head_is_cut_at_the_head_deadline(server):
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: slowloris\r\nX-Padding: " + b"a" * 200
    reply = b""
    with _connect(server.base) as sock:
        sock.settimeout(0.2)
        t0 = time.monotonic()
        for byte in head:  # one byte every 0.2 s: 54 s for the whole head if nobody stops it
            try:
                sock.sendall(bytes([byte]))
                data = sock.recv(65536)
            except TimeoutError:
                continue  # nothing from the server yet: dribble on
            except (BrokenPipeError, ConnectionResetError):
                break
            reply += data
            break  # the server answered or closed
        elapsed = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in reply, reply[:200]
    # Cut at the deadline, long before the head would end; generous above for a loaded machine.
    assert HEAD_DEADLINE_S * 0.8 < elapsed < HEAD_DEADLINE_S + 20.0, elapsed


def test_a_client_stalling_mid_body_gets_408_and_is_closed(server):
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    with _connect(server.base, timeout=60) as sock:
        sock.sendall(head + PNG[:50])  # ... and nothing more
        t0 = time.monotonic()
        reply = _read_until_closed(sock)
        elapsed = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b'"body_timeout"' in reply and b"application/json" in reply
    assert HEAD_DEADLINE_S * 0.8 < elapsed < HEAD_DEADLINE_S + 20.0, elapsed  # held for good otherwise


def test_an_idle_keep_alive_connection_is_closed(server):
    with _connect(server.base, timeout=60) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive by default in HTTP/1.1
        assert read_http_response(sock).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        rest = _read_until_closed(sock)  # the server closes the idle connection by itself
        elapsed = time.monotonic() - t0
    assert rest == b"" and elapsed < 1.0 + 20.0, (rest[:100], elapsed)  # keep-alive timeout 1 s; generous


def test_many_idle_connections_cost_little_memory_and_requests_are_still_served(tiny_bundle, tmp_path):
    n_idle = 300
    deadline_s = 5.0
    with start_serve(
        ["--bundle", str(tiny_bundle), "--client-timeout", str(deadline_s), "--decode-threads", "1"], tmp_path / "serve.log"
    ) as server:
        with httpx.Client(base_url=server.base, timeout=10) as c:
            for _ in range(5):
                assert c.post("/v1/predict", content=PNG, headers={"content-type": "image/png"}).status_code == 200
        rss_before = server.vm_kb("VmRSS")
        idle = []
        t_open = time.monotonic()
        for i in range(n_idle):
            sock = _connect(server.base)
            if i % 2:  # half say nothing, half send half a head
                sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
            idle.append(sock)
        try:
            time.sleep(0.3)
            latencies = []
            with httpx.Client(base_url=server.base, timeout=10) as c:
                for _ in range(20):
                    t0 = time.monotonic()
                    r = c.post("/v1/predict", content=PNG, headers={"content-type": "image/png"})
                    latencies.append(time.monotonic() - t0)
                    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "blue"
            rss_held = server.vm_kb("VmRSS")
            assert max(latencies) < 5.0, latencies  # served while 300 connections idle (generous: a loaded machine)
            assert rss_held - rss_before < 32 * 1024, f"{n_idle} idle connections cost {(rss_held - rss_before) / 1024:.1f} MiB"

            # Every idle connection is closed by the server at the head deadline (408), none held longer.
            selector = selectors.DefaultSelector()
            for sock in idle:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            replies: dict[int, bytes] = {}
            while len(replies) < n_idle and time.monotonic() - t_open < deadline_s + 30:
                for key, _ in selector.select(timeout=0.5):
                    sock = key.fileobj
                    try:
                        data = sock.recv(65536)
                    except ConnectionResetError:
                        data = b""
                    if data:
                        replies[sock.fileno()] = replies.get(sock.fileno(), b"") + data
                        continue
                    replies.setdefault(sock.fileno(), b"")
                    selector.unregister(sock)
            closed_after = time.monotonic() - t_open
        finally:
            for sock in idle:
                sock.close()
        assert len(replies) == n_idle, f"{n_idle - len(replies)} connections still open after {closed_after:.1f} s"
        assert sum(r.startswith(b"HTTP/1.1 408") for r in replies.values()) >= n_idle * 0.95
        assert deadline_s * 0.8 < closed_after < deadline_s + 30
        print(f"\n{n_idle} idle connections: RSS {rss_before / 1024:.1f} -> {rss_held / 1024:.1f} MiB, "
              f"p100 request latency meanwhile {max(latencies) * 1000:.0f} ms, all closed after {closed_after:.1f} s")
        assert server.stop() == 0
