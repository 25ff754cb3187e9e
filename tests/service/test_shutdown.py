"""Graceful shutdown of a real `oodguard serve`: in-flight requests complete, new ones are refused, exit 0.

test_uvicorn.py checks that an idle server exits 0 on SIGTERM; here the signal arrives while work is
in flight. Requests are held in flight deterministically: `--max-wait-ms 1000` keeps predictions
queued in the batcher for up to a second (verified through `oodguard_queue_depth`), and one client
is stopped in the middle of its upload and only sends the rest after the signal. A last test shows
a client that never finishes cannot hold the shutdown beyond `graceful_shutdown_s`.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
import pytest

from bench.serve_process import read_http_response, start_serve

from .bundle_factory import encode_image

pytestmark = pytest.mark.slow

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _queue_depth(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith("oodguard_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("no oodguard_queue_depth in /metrics")


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_with_requests_in_flight(tiny_bundle, tmp_path, sig):
    server = start_serve(
        ["--bundle", str(tiny_bundle), "--max-wait-ms", "1000", "--max-batch", "64", "--decode-threads", "1"],
        tmp_path / "serve.log",
    )
    with server:
        # A keep-alive connection that is idle when the signal comes: the server closes it.
        idle = _connect(server.base)
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_http_response(idle).startswith(b"HTTP/1.1 200")

        # A client in the middle of its upload when the signal comes.
        png = encode_image(COLORS["green"], fmt="PNG")
        uploader = _connect(server.base)
        head = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n\r\n"
        uploader.sendall(head.encode() + png[:20])

        # Predictions queued in the batcher (it waits up to 1 s to fill a batch of 64).
        results: dict[int, httpx.Response | BaseException] = {}
        labels = ["red", "green", "blue"] * 2

        def predict(i: int, label: str) -> None:
            try:
                results[i] = httpx.post(
                    f"{server.base}/v1/predict",
                    content=encode_image(COLORS[label], fmt="PNG"),
                    headers={"content-type": "image/png"},
                    timeout=30,
                )
            except BaseException as exc:  # recorded, asserted below
                results[i] = exc

        threads = [threading.Thread(target=predict, args=(i, label)) for i, label in enumerate(labels)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 0.8
        while _queue_depth(server.base) < len(labels) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _queue_depth(server.base) == len(labels), "the predictions were not in flight"

        server.proc.send_signal(sig)

        # New connections are refused while the in-flight work drains.
        refused = False
        until = time.monotonic() + 2.0
        while time.monotonic() < until and not refused:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                time.sleep(0.02)
            except ConnectionRefusedError:
                refused = True
        assert refused, "the server still accepted new connections after the signal"
        assert server.proc.poll() is None, "the server exited before its in-flight requests completed"

        # The idle keep-alive connection was closed; the interrupted upload completes and is answered.
        idle.settimeout(5)
        assert idle.recv(65536) == b""
        idle.close()
        uploader.sendall(png[20:])
        reply = _read_until_closed(uploader)
        uploader.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
        assert b'"label":"green"' in reply

        for t in threads:
            t.join(timeout=30)
        for i, label in enumerate(labels):
            r = results[i]
            assert isinstance(r, httpx.Response), r
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0]["label"] == label

        assert server.proc.wait(timeout=30) == 0, server.log()
    log = server.log()
    assert "Traceback" not in log, log
    assert "stopped" in log


def test_a_client_that_never_finishes_cannot_hold_the_shutdown(tiny_bundle, tmp_path):
    grace_s = 2
    server = start_serve(
        ["--bundle", str(tiny_bundle), "--client-timeout", "60"],
        tmp_path / "serve.log",
        env={"OODGUARD_GRACEFUL_SHUTDOWN_S": str(grace_s)},
    )
    with server:
        stuck = _connect(server.base)
        stuck.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nab")
        time.sleep(1.0)  # let the server take the connection in (generous on a loaded machine)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
        reply = _read_until_closed(stuck)
        stuck.close()
    assert code == 0, server.log()
    # At the grace deadline, not at the client's (60 s): generous above, a loaded machine is slow to exit.
    assert grace_s * 0.8 < elapsed < grace_s + 20, elapsed
    # Cancelled at the grace deadline, it is told so in JSON (not uvicorn's plain-text 500).
    assert reply.startswith(b"HTTP/1.1 503") and b'"shutting_down"' in reply and b"retry-after: 1" in reply, reply[:300]
    assert "Traceback" not in server.log()
