"""The service never imports torch (nor oodguard.training), not even transitively."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def _run_without(package: str, code: str) -> subprocess.CompletedProcess:
    """`code` run with `package` (and its submodules) unimportable, as if it were not installed."""
    blocker = f"""
import importlib.abc, sys

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {package!r} or name.startswith({package + "."!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Missing())
"""
    return _run(blocker + textwrap.dedent(code))


def test_service_app_and_cli_leave_torch_out(tiny_bundle):
    r = _run(
        f"""
        import sys
        from oodguard.service.app import create_app
        from oodguard.service.settings import Settings
        import oodguard.service.cli
        from fastapi.testclient import TestClient
        app = create_app(Settings(bundle={str(tiny_bundle)!r}))
        with TestClient(app) as c:
            import io
            from PIL import Image
            buf = io.BytesIO(); Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, "PNG")
            r = c.post("/v1/predict", content=buf.getvalue(), headers={{"content-type": "image/png"}})
            assert r.status_code == 200, r.text
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "oodguard.training")))
        print("LOADED", bad)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout, r.stdout


def test_oodguard_serve_works_without_torch_installed():
    """With torch made unimportable (the `serve` extra only), the CLI still offers `serve`."""
    r = _run_without(
        "torch",
        """
        from typer.testing import CliRunner
        from oodguard.cli import app
        result = CliRunner().invoke(app, ["serve", "--help"])
        print("EXIT", result.exit_code)
        print(result.output)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "EXIT 0" in r.stdout and "--max-batch" in r.stdout, r.stdout + r.stderr


def test_oodguard_serve_without_the_serve_extra_names_the_extra():
    """With a package of the `serve` extra missing, `oodguard serve` says which extra to install: exit 2, no
    traceback (the except clause's name is gone once the clause ends, so the command must keep its own)."""
    r = _run_without(
        "pydantic_settings",
        """
        import sys
        sys.argv = ["oodguard", "serve"]
        from oodguard.cli import main
        main()
        """
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "needs the 'serve' extra (pydantic_settings is not installed)" in r.stderr
    assert "Traceback" not in r.stderr
