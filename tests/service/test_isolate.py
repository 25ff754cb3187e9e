"""Bundle validation children (service/isolate.py) do not compete with predictions for the cores.

A hostile admin can keep a validation spinning for `validate_timeout_s` after every upload; on a
2-core host that child would take a core from the requests. It runs at isolate.CHILD_NICENESS (19), and the fork
server imports the main module once so that a child does not execute `oodguard.cli` again.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import threading
import time
import types

import httpx

from bench.serve_process import descendants, start_serve, stat_fields
from oodguard.service import isolate

from .bundle_factory import make_endless_bundle

TOKEN = "isolate-test-admin-token-0123456789"


def _niceness(pid: int) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[16])


def test_a_spinning_validation_runs_below_the_server_priority(tiny_bundle, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(make_endless_bundle(tmp_path / "endless"), arcname="bundle")
    args = ["--bundle", str(tiny_bundle), "--models-dir", str(tmp_path / "models"), "--decode-threads", "1",
            "--validate-timeout", "600"]
    with start_serve(args, tmp_path / "serve.log", env={"OODGUARD_ADMIN_TOKEN": TOKEN, "OODGUARD_GRACEFUL_SHUTDOWN_S": "2"}) as s:
        before = {pid: _niceness(pid) for pid in descendants(s.pid)}
        uploader = threading.Thread(target=lambda: _upload(s.base, buf.getvalue()), daemon=True)
        uploader.start()
        deadline, niced = time.monotonic() + 60, []
        while not niced and time.monotonic() < deadline:  # the child exists once the upload is staged
            time.sleep(0.2)
            niced = [pid for pid in descendants(s.pid) if pid not in before and _niceness(pid) == isolate.CHILD_NICENESS]
        assert niced, (f"no validation child at niceness {isolate.CHILD_NICENESS}", {p: _niceness(p) for p in descendants(s.pid)})
        ours = os.nice(0)  # the server inherits the test's niceness (0, or more under `nice`)
        assert _niceness(s.pid) == ours and all(n == ours for n in before.values())  # only the child is lowered
        assert s.stop(timeout=30) == 0
    assert "RuntimeWarning" not in (tmp_path / "serve.log").read_text()  # the child's start-up warns nothing


def test_a_spinning_validation_ends_itself_when_the_server_is_killed(tiny_bundle, tmp_path):
    """SIGKILL (the OOM killer, an orchestrator's deadline) leaves nobody to stop the child: its alarm does."""
    import signal

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(make_endless_bundle(tmp_path / "endless"), arcname="bundle")
    timeout_s = 2
    args = ["--bundle", str(tiny_bundle), "--models-dir", str(tmp_path / "models"), "--decode-threads", "1",
            "--validate-timeout", str(timeout_s)]
    with start_serve(args, tmp_path / "serve.log", env={"OODGUARD_ADMIN_TOKEN": TOKEN}) as s:
        helpers = set(descendants(s.pid))  # the fork server, before any validation
        threading.Thread(target=lambda: _upload(s.base, buf.getvalue()), daemon=True).start()
        deadline, children = time.monotonic() + 60, []
        while not children and time.monotonic() < deadline:
            time.sleep(0.1)
            children = [pid for pid in descendants(s.pid) if pid not in helpers and _niceness(pid) == isolate.CHILD_NICENESS]
        assert children, "no validation child started"
        os.kill(s.pid, signal.SIGKILL)
        s.proc.wait(timeout=10)
    # the child was started at most ~0.1 s ago; its alarm fires timeout_s + CHILD_GRACE_S after its start
    ends_by = time.monotonic() + timeout_s + isolate.CHILD_GRACE_S + 30  # + 30: a loaded machine
    while time.monotonic() < ends_by and any(_alive(pid) for pid in children):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in children), f"validation children {children} outlived the killed server"
    for pid in helpers:  # the orphaned fork server holds no CPU, but is not left behind by the test either
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as ended)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _upload(base: str, archive: bytes) -> None:
    try:
        httpx.post(base + "/admin/models", content=archive, timeout=120,
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/gzip"})
    except httpx.HTTPError:  # the server is stopped while this upload still validates
        pass


def test_the_fork_server_preloads_the_main_module_but_never_a_package_main(monkeypatch):
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=types.SimpleNamespace(name="oodguard.cli")))
    assert isolate.forkserver_preload()[-1] == "oodguard.cli" and "oodguard.service.bundle" in isolate.forkserver_preload()
    # `python -m pytest`: importing pytest.__main__ in the fork server would run pytest there
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=types.SimpleNamespace(name="pytest.__main__")))
    assert "pytest.__main__" not in isolate.forkserver_preload()
    # a script other than oodguard's: nothing of it is imported by the fork server
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=None, __file__="/x/run.py", run=print))
    assert isolate.forkserver_preload()[0] == "__main__" and len(isolate.forkserver_preload()) == 5
    # the `oodguard` console script (`from oodguard.cli import main`): children re-run it (the "__main__"
    # entry is a no-op before Python 3.13.8, gh-126631), so its CLI import must already be in the fork server
    from oodguard import cli

    script = types.SimpleNamespace(__spec__=None, __file__="/venv/bin/oodguard", sys=sys, main=cli.main)
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert isolate.forkserver_preload()[-1] == "oodguard.cli"
