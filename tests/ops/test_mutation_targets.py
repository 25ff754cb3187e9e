"""scripts/mutation.py: every test and function its targets name exists, so a rename fails here, not
half-way through a 30-minute `make mutation` (pytest refuses an unknown node ID; a missing function
would only print a warning and silently leave code unmutated)."""

from __future__ import annotations

import ast
from pathlib import Path

from ._scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def _module():
    return load_script("mutation")


def _defined(path: Path) -> set[str]:
    """Qualified names ("f", "Class.method") of the functions defined at module or class level."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{f.name}" for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_every_selected_test_exists():
    mutation = _module()
    for target in mutation.TARGETS:
        assert (ROOT / target.path).is_file(), f"no module {target.path}"
        for selection in target.tests:
            file, _, name = selection.partition("::")
            assert (ROOT / file).is_file(), f"{target.path}: no test file {file}"
            if name:
                assert name in _defined(ROOT / file), f"{target.path}: {file} has no test {name}"


def test_every_listed_function_exists_in_its_module():
    mutation = _module()
    assert {"training/scores.py", "service/registry.py", "service/postprocess.py"} <= {t.path for t in mutation.TARGETS}
    for target in mutation.TARGETS:
        missing = set(target.functions or ()) - _defined(ROOT / target.path)
        assert not missing, f"{target.path}: {sorted(missing)} not defined (renamed? update scripts/mutation.py's TARGETS)"


def test_the_registry_target_leaves_out_only_the_child_process_tests():
    mutation = _module()
    selected = {s.partition("::")[2] for s in mutation.REGISTRY_SWAP if s.startswith("tests/service/test_registry.py::")}
    every = {n for n in _defined(ROOT / "tests/service/test_registry.py") if n.startswith("test_")}
    assert every - selected == {"test_killed_process_leaves_a_consistent_state"}
