"""A real `oodguard serve` subprocess on a loopback port, for the reliability tests.

    from .serve_process import start_serve

    server = start_serve(["--bundle", str(bundle)], tmp_path / "serve.log")
    httpx.get(f"{server.base}/readyz")
    server.vm_kb("VmHWM")          # peak resident memory of the server process, in KiB
    code = server.stop()           # SIGTERM, wait, return the exit status

The server's output goes to a log file (never an unread pipe that could fill up and block it);
`server.log()` reads it. The environment is the test's minus every `OODGUARD_*` variable, plus
`env` (e.g. the admin token) - a developer's settings never leak into a test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def read_http_response(sock: socket.socket) -> bytes:
    """One complete response (head + Content-Length body) from a raw socket that may stay open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a complete response head: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of a response body")
        body += chunk
    return head + b"\r\n\r\n" + body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def vm_kb(self, field: str = "VmRSS") -> int:
        """A memory field of /proc/<pid>/status (VmRSS: resident now, VmHWM: peak resident), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` (SIGTERM: graceful) and wait; SIGKILL if it does not end in `timeout`. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_serve(
    args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    ready_timeout: float = 60.0,
    python_code: str | None = None,
) -> ServeProcess:
    """Start `oodguard serve ARGS --port <free>` and wait until /readyz answers 200.

    `python_code`: run `python -c CODE serve ARGS ...` instead of `python -m oodguard.cli` - a
    test wrapper that patches something (a fault to inject) and then calls `oodguard.cli.main()`.
    """
    port = free_port()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("OODGUARD_")}
    child_env.setdefault("OMP_NUM_THREADS", "1")
    child_env.update(env or {})
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, *(["-c", python_code] if python_code else ["-m", "oodguard.cli"]), "serve", *args, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=child_env,
    )
    log.close()  # the child holds its own descriptor
    server = ServeProcess(proc, port, log_path)
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"oodguard serve exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=10)
            raise RuntimeError(f"oodguard serve was not ready within {ready_timeout:g} s:\n{server.log()}")
        time.sleep(0.05)
