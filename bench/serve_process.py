"""Server processes for the serving benchmark: start on a free loopback port, wait for a real 200, stop, CPU.

Each server runs in its own process group (TorchServe is a Java frontend plus Python workers), is
ready when the benchmark's own upload gets a 200, and is stopped with SIGTERM to the group, then
SIGKILL after a grace period. CPU time is read from /proc for the whole process tree.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ServerSpec:
    system: str
    argv: list[str]
    path: str = "/v1/predict"
    env: dict[str, str] | None = None
    settings: dict = field(default_factory=dict)
    ready_timeout_s: float = 120.0
    settings_url: str | None = None  # GET for the server's own report of its thread settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart_request(host: str, image: bytes, path: str = "/v1/predict") -> bytes:
    """One complete keep-alive HTTP/1.1 multipart POST, built once and replayed (load client, readiness probe)."""
    boundary = b"oodguardbenchboundary"
    body = (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="file"; filename="img.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--" + boundary + b"--\r\n"
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary.decode()}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def clean_env() -> dict[str, str]:
    """This environment minus OODGUARD_* (a stray setting must not change what is measured)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OODGUARD_")}


def torch_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for torch-based servers: the short OpenMP spin `oodguard train` uses, unless configured.

    libgomp's default spin-wait collapses when other processes share the cores (here: the load client,
    and anything else on a shared machine): measured on ResNet-18, 2 threads, 1.3 images/s spinning vs
    17 with GOMP_SPINCOUNT=10000. The peers get the same setting as our own torch processes.
    """
    env = dict(base if base is not None else clean_env())
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = "10000"
    return env


def _probe(port: int, request: bytes) -> int | None:
    """Status of one real request (the benchmark's own upload), None when nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request)
            head = s.recv(65536)
        return int(head[9:12])
    except (OSError, ValueError):
        return None


def start(spec: ServerSpec, port: int, image: bytes, log_path: Path) -> subprocess.Popen:
    """Start a server in its own process group and wait until the benchmark request gets a 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(spec.argv, stdout=out, stderr=subprocess.STDOUT, env=spec.env or clean_env(),
                                cwd=REPO, start_new_session=True)
    request = multipart_request(f"127.0.0.1:{port}", image, spec.path)
    deadline = time.monotonic() + spec.ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before answering: {_tail(log_path)}")
        if _probe(port, request) == 200:
            return proc
        time.sleep(0.25)
    stop(proc)
    raise RuntimeError(f"no 200 answer within {spec.ready_timeout_s:.0f} s: {_tail(log_path)}")


def start_oodguard(args: list[str], image: bytes, log_path: Path, env: dict[str, str] | None = None,
                   ready_timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`oodguard serve ARGS` on a free loopback port, ready once `image` gets a 200; returns (process, base URL)."""
    port = free_port()
    spec = ServerSpec("oodguard", [sys.executable, "-m", "oodguard.cli", "serve", *args, "--port", str(port)],
                      env=env, ready_timeout_s=ready_timeout_s)
    return start(spec, port, image, log_path), f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> int:
    """SIGTERM to the server's process group (TorchServe has a Java frontend and Python workers), wait
    `grace_s`, then SIGKILL. Returns the server's exit status (negative: killed by that signal)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # workers that outlived their parent (same group)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def _tail(path: Path, n: int = 300) -> str:
    """The log's last line (a traceback's last line names the error), and where the whole log is."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return f"{(lines[-1] if lines else '(empty log)')[:n]} (log: {_rel(path)})"


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = defaultdict(list)
    stats: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        stats[pid] = fields
        children[int(fields[1])].append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += int(stats[pid][11]) + int(stats[pid][12])
        todo.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime



def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
