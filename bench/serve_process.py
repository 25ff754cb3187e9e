"""Server processes on a free loopback port, for the benchmarks and the tests alike: start, wait until ready, stop.

The one helper `bench/` and `tests/` share to run a real server:

    from bench.serve_process import start_serve

    server = start_serve(["--bundle", str(bundle)], tmp_path / "serve.log")  # ready once /readyz is 200
    httpx.get(f"{server.base}/readyz")
    server.vm_kb("VmHWM")          # peak resident memory of the server process, in KiB
    code = server.stop()           # SIGTERM, wait, return the exit status

The benchmarks start `oodguard serve` (`start_oodguard`) and the peer servers (`start`, any
`ServerSpec`) in their own process group (TorchServe is a Java frontend plus Python workers), ready
when the benchmark's own upload gets a 200, and stop the whole group (`stop`): SIGTERM, then SIGKILL
after a grace period. CPU time is read from /proc for the whole process tree.

A server's output goes to a log file (never an unread pipe that could fill up and block it). The
environment is the caller's minus every `OODGUARD_*` variable, plus `env` - a developer's settings
never leak into a test or a measurement.
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
from collections.abc import Callable
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


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment minus OODGUARD_* (a stray setting must not change what is measured or tested), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("OODGUARD_")}, **(extra or {})}


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


# -- one server process --------------------------------------------------------------------------------


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

    def tree_pids(self) -> list[int]:
        """The server and every process below it (heavy-decode workers, validation children, the fork server)."""
        return [self.pid, *descendants(self.pid)]

    def tree_vm_kb(self, field: str = "VmHWM") -> dict[int, int]:
        """`field` of each process of the tree, in KiB (0 for one that ended while being read)."""
        return {pid: proc_vm_kb(pid, field) for pid in self.tree_pids()}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` (SIGTERM: graceful) to the server alone and wait; SIGKILL if it does not end in `timeout`.
        Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def wait_ready(self, is_ready: Callable[[], bool], timeout_s: float, poll_s: float, log_lines: int | None = 1) -> None:
        """Poll `is_ready()` until it holds. RuntimeError if the server exits first or `timeout_s` passes, with
        the log's last `log_lines` lines (None: all of it); the caller stops the server."""
        deadline = time.monotonic() + timeout_s
        while not is_ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode} before answering: {self._tail(log_lines)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready within {timeout_s:g} s: {self._tail(log_lines)}")
            time.sleep(poll_s)

    def _tail(self, lines: int | None) -> str:
        """The log's last lines (a traceback's last line names the error), and where the whole log is."""
        try:
            kept = [line.rstrip() for line in self.log().splitlines() if line.strip()]
        except OSError:
            kept = []
        text = "\n".join(kept[-lines:] if lines else kept) or "(empty log)"
        return f"{text[:300] if lines == 1 else text} (log: {_rel(self.log_path)})"

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def launch(argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None, own_group: bool = False,
           cwd: Path | None = None) -> ServeProcess:
    """Start `argv` in `cwd` (the repository) with its output in `log_path` (`own_group`: in a new process group, for `stop`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:  # the child holds its own descriptor
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env or clean_env(), cwd=cwd or REPO,
                                start_new_session=own_group)
    return ServeProcess(proc, port, log_path)


def start_serve(
    args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    ready_timeout: float = 60.0,
    python_code: str | None = None,
) -> ServeProcess:
    """Start `oodguard serve ARGS --port <free>` and wait until /readyz answers 200 (tests; OMP_NUM_THREADS=1 unless set).

    `python_code`: run `python -c CODE serve ARGS ...` instead of `python -m oodguard.cli` - a
    test wrapper that patches something (a fault to inject) and then calls `oodguard.cli.main()`.
    """
    import httpx

    port = free_port()
    entry = ["-c", python_code] if python_code else ["-m", "oodguard.cli"]
    server = launch([sys.executable, *entry, "serve", *args, "--port", str(port)], port, log_path,
                    env=clean_env({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}))

    def ready() -> bool:
        try:
            return httpx.get(f"{server.base}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        server.wait_ready(ready, ready_timeout, poll_s=0.05, log_lines=None)
    except RuntimeError:
        server.__exit__()
        raise
    return server


def start(spec: ServerSpec, port: int, image: bytes, log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start a server in its own process group and wait until the benchmark request gets a 200 (benchmarks)."""
    server = launch(spec.argv, port, log_path, env=spec.env, own_group=True, cwd=cwd)
    request = multipart_request(f"127.0.0.1:{port}", image, spec.path)
    try:
        server.wait_ready(lambda: _probe(port, request) == 200, spec.ready_timeout_s, poll_s=0.25)
    except RuntimeError:
        stop(server.proc)
        raise
    return server.proc


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


def _probe(port: int, request: bytes) -> int | None:
    """Status of one real request (the benchmark's own upload), None when nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request)
            head = s.recv(65536)
        return int(head[9:12])
    except (OSError, ValueError):
        return None


# -- CPU accounting ----------------------------------------------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (0 = state, 1 = parent pid, 11-12 = CPU ticks, 16 = nice);
    None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_table() -> dict[int, list[str]]:
    """`stat_fields` of every running process (Linux /proc)."""
    table = {int(stat.parent.name): stat_fields(int(stat.parent.name)) for stat in Path("/proc").glob("[0-9]*/stat")}
    return {pid: fields for pid, fields in table.items() if fields is not None}


def tree_peak_mib(pid: int, action):
    """(peak resident memory of `pid`'s process tree while `action()` ran, above its level before, in MiB;
    action's result). Per process VmHWM after - VmRSS before (high-water marks reset through
    /proc/<pid>/clear_refs), summed: an upper bound, the peaks need not coincide; a process started
    meanwhile counts whole."""
    pids = [pid, *descendants(pid)]
    for p in pids:
        Path(f"/proc/{p}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = {p: proc_vm_kb(p, "VmRSS") for p in pids}
    result = action()
    return sum(proc_vm_kb(p, "VmHWM") - before.get(p, 0) for p in [pid, *descendants(pid)]) / 1024, result


def proc_vm_kb(pid: int, field: str) -> int:
    """A memory field of /proc/<pid>/status in KiB; 0 when the process has ended."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith(field + ":")), 0)


def descendants(root: int, table: dict[int, list[str]] | None = None) -> list[int]:
    """Every process below `root` (children of children included)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = defaultdict(list)
    for pid, fields in table.items():
        children[int(fields[1])].append(pid)
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux /proc)."""
    table = process_table()
    ticks = sum(int(table[pid][11]) + int(table[pid][12]) for pid in [root, *descendants(root, table)] if pid in table)
    return ticks / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
