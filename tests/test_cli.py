"""The root CLI: without an optional extra a command fails with a one-line error naming the extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

_BLOCK_AND_RUN = (
    "import sys; sys.modules[{mod!r}] = None; sys.argv = ['oodguard', *{argv!r}]; "
    "from oodguard.cli import main; main()"
)


@pytest.mark.parametrize("mod,argv,extra", [
    ("torch", ["train", "--out", "unused-run"], "train"),
    ("torch", ["export", "unused-run"], "train"),
    ("torch", ["guard", "--classifier", "a", "--detector", "b", "--out", "c"], "train"),
])
def test_a_missing_extra_is_a_clear_error_not_a_traceback(mod, argv, extra, tmp_path):
    proc = subprocess.run([sys.executable, "-c", _BLOCK_AND_RUN.format(mod=mod, argv=argv)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"needs the '{extra}' extra" in proc.stderr and f"oodguard[{extra}]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_works_without_torch(tmp_path):
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['oodguard', '--help']; from oodguard.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "evaluate", "export", "calibrate", "guard", "serve", "deploy", "rollback", "bundle"):
        assert command in proc.stdout
