"""Load a file of scripts/ as a module, for tests of the scripts' functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str):
    """Execute scripts/<name>.py as a fresh module named `scripts_<name>`.

    It is registered in sys.modules while it runs (dataclasses look their module up while being defined), and
    scripts/ is on sys.path meanwhile, so a script can import its sibling scripts as it does when run."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module
