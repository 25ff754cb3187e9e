"""Mutation testing (`make mutation`): mutmut 3 over the code that decides outcomes, with fast tests only.

    python scripts/mutation.py [--max-children 2] [--keep] [--json build/mutation/report.json]

What is mutated (`TARGETS`): the OOD scores, the detection metrics, the attacks, the losses and
calibration (training/), and on the service side the decision path (postprocess, conformal p-values,
operating-point lookup, the label/threshold choice in /v1/predict and /v2 infer) and the registry's
swap (switch, activate, rollback). Each target names the test files that exercise it; only those run,
and mutmut runs, for each mutant, only the tests that called the mutated function (`-x`: the first
failure kills it). See docs/testing.md for the last run's kill rate, run time and every survivor.

Why a staging copy (build/mutation/): mutmut imports the mutated code from `mutants/<source path>`,
so the source paths must be the import paths. Here `oodguard.training` lives in `training/` and
`oodguard.service` in `service/` (setuptools' package-dir), so the script lays the package out as it
is installed (build/mutation/oodguard/{training,service}) together with tests/ and pyproject.toml
plus a [tool.mutmut] section, then runs `mutmut run` there. Functions of a target file that are not
listed are marked `# pragma: no mutate block` in the copy only; the sources are never touched.

The report lists per module: mutants, killed (a test failed, or the mutant timed out), survived,
and every survivor's diff (`mutmut show`). Exit status 1 when the kill rate of all targets together
is below --min-kill-rate (default 85). Threads: OMP/MKL 1 per worker, --max-children workers.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "build" / "mutation"
# Where each top-level folder sits in the installed package (pyproject.toml's package-dir).
PACKAGE_DIRS = {"oodguard": "oodguard", "training": "oodguard/training", "service": "oodguard/service"}
KILLED = {"killed", "timeout"}
HYPOTHESIS_PROFILE = """

# -- added by scripts/mutation.py ------------------------------------------------------------------
from hypothesis import Phase as _Phase, settings as _settings  # noqa: E402

_settings.register_profile("mutation", phases=[_Phase.explicit, _Phase.reuse, _Phase.generate], database=None)
_settings.load_profile("mutation")

# Every test process here has mutmut's launcher script as __main__. A multiprocessing child re-runs a
# script __main__ (Python < 3.13.8: the fork server's "__main__" preload is a no-op, CPython gh-126631),
# and this one imports mutmut's CLI in each registry validation child: the registry target took ~16
# minutes instead of 2.6. Named as a package's __main__, it is not re-run (nothing in a test needs it).
import importlib.machinery as _machinery  # noqa: E402
import sys as _sys  # noqa: E402

_main = _sys.modules.get("__main__")
if getattr(_main, "__spec__", None) is None and getattr(_main, "__file__", "").endswith("mutmut"):
    _main.__spec__ = _machinery.ModuleSpec("mutmut.__main__", None)
"""


@dataclass
class Target:
    """One source file, the functions to mutate (None: all), its tests."""

    path: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] | None = None  # "func" or "Class.method"
    found: list[str] = field(default_factory=list)


def test_function_names(path: str) -> list[str]:
    """The module-level test functions of a test file, in file order."""
    tree = ast.parse((ROOT / path).read_text())
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")]


DECISION_TESTS = ("tests/service/test_decision_semantics.py", "tests/service/test_verdict_rules.py",
                  "tests/service/test_hotswap_labels.py")
# Only fast tests: each mutant runs every selected test that called the mutated function, in a fresh
# process (module fixtures included). calibrate.py: the rules, not `calibrate_run` / `_select_score`,
# whose end-to-end tests need a 40 s fixture per mutant (see docs/testing.md).
CALIBRATE_PURE = tuple(
    f"tests/training/test_calibrate.py::{name}" for name in (
        "test_threshold_rule_by_hand", "test_threshold_equals_the_conformal_p_value_rule_with_ties",
        "test_coverage_on_fresh_in_distribution_draws", "test_marginal_guarantee_over_many_calibration_sets",
        "test_in_distribution_p_values_are_uniform_and_ood_ones_small",
    )
)
# The registry's swap: every test of test_registry.py but the two that kill a child process mid-swap
# (~2.5 s a mutant; the child imports the staged, unmutated package, so only their parent-side restart,
# which the restart tests cover, can see a mutant).
REGISTRY_CHILD_KILL_TESTS = ("test_killed_process_leaves_a_consistent_state",)
REGISTRY_SWAP = (
    *(f"tests/service/test_registry.py::{name}" for name in test_function_names("tests/service/test_registry.py")
      if name not in REGISTRY_CHILD_KILL_TESTS),
    "tests/service/test_swap_location.py", "tests/service/test_hotswap_labels.py",
)
TARGETS = [
    Target("training/scores.py", ("tests/training/test_scores.py",)),
    Target("training/ood_metrics.py", ("tests/training/test_ood_metrics.py",)),
    # (test_attack_semantics, which trains, checks the trainer's use of these: too slow per mutant)
    Target("training/attacks.py", ("tests/training/test_attacks.py", "tests/training/test_worst_case.py",
                                  "tests/training/test_attacks_worst_case.py")),
    Target("training/losses.py", ("tests/training/test_losses.py",)),
    Target(
        "training/calibrate.py",
        ("tests/training/test_calibrate_rules.py", *CALIBRATE_PURE),
        ("threshold_for_tpr", "operating_point_name", "CalibrateConfig.validate", "_accept_rate", "_operating_points",
         "_per_form"),
    ),
    # the decision path: scoring, p-values, operating points, which model labels the answer
    Target("service/postprocess.py", ("tests/service/test_decision_semantics.py", "tests/service/test_verdict_rules.py",
                                      "tests/service/test_predict.py")),
    Target("service/bundle.py", DECISION_TESTS, ("conformal_p_values",)),
    Target("service/manifest.py", DECISION_TESTS, ("BundleManifest.operating_point",)),
    Target("service/inference.py", DECISION_TESTS,  # the one inference layer every route calls
           ("InferenceService.predict", "InferenceService.score", "InferenceService.verdict", "InferenceService._score",
            "resolve_operating_point")),
    # the registry's swap
    Target(
        "service/registry.py",
        REGISTRY_SWAP,
        ("ModelRegistry._switch", "ModelRegistry._swap_to"),  # activate / rollback: argument checks, then _swap_to
    ),
]


def staged(path: str) -> str:
    top, _, rest = path.partition("/")
    return f"{PACKAGE_DIRS[top]}/{rest}"


class _Exclude(cst.CSTTransformer):
    """Marks every function not in `keep` (qualified "Class.method") `# pragma: no mutate block`."""

    def __init__(self, keep: set[str]):
        self.keep = keep
        self.found: list[str] = []
        self._classes: list[str] = []

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        self._classes.append(node.name.value)
        return True

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        self._classes.pop()
        return updated

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return False  # nested functions go with their outer function

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        name = ".".join([*self._classes, original.name.value])
        if name in self.keep:
            self.found.append(name)
            return updated
        if not isinstance(updated.body, cst.IndentedBlock):
            return updated
        header = updated.body.header.with_changes(
            whitespace=cst.SimpleWhitespace("  "), comment=cst.Comment("# pragma: no mutate block")
        )
        return updated.with_changes(body=updated.body.with_changes(header=header))


def stage(targets: list[Target], rev: str | None) -> list[str]:
    """Lay the package out as installed under STAGE (the working tree, or commit `rev`); returns the paths to mutate."""
    if STAGE.exists():
        shutil.rmtree(STAGE)
    STAGE.mkdir(parents=True)
    src = ROOT
    if rev is not None:  # a commit's files only: others' uncommitted edits stay out
        src = STAGE / ".rev"
        src.mkdir()
        archive = subprocess.run(["git", "archive", rev, *PACKAGE_DIRS, "tests", "pyproject.toml"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    for top, dest in PACKAGE_DIRS.items():
        shutil.copytree(src / top, STAGE / dest, ignore=ignore, dirs_exist_ok=True)
    shutil.copytree(src / "tests", STAGE / "tests", ignore=ignore)
    with open(STAGE / "tests" / "conftest.py", "a") as fh:  # staged copy only: a failing example kills, unshrunk
        fh.write(HYPOTHESIS_PROFILE)
    mutate, tests = [], []
    for t in targets:
        if not (src / t.path).is_file():  # (with --rev: an older commit)
            print(f"warning: {t.path} does not exist: not mutated", file=sys.stderr)
            continue
        mutate.append(staged(t.path))
        tests += [p for p in t.tests if (STAGE / p.split("::")[0]).is_file() and p not in tests]
        if t.functions is None:
            continue
        path = STAGE / staged(t.path)
        transformer = _Exclude(set(t.functions))
        path.write_text(cst.parse_module(path.read_text()).visit(transformer).code)
        t.found = transformer.found
        for missing in sorted(set(t.functions) - set(t.found)):
            print(f"warning: {t.path} has no function {missing}: not mutated (renamed? update TARGETS)", file=sys.stderr)
    config = {
        "source_paths": ["oodguard"],
        "only_mutate": mutate,
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
        # torch and onnxruntime are not fork-safe once their thread pools ran: fork workers from a clean server.
        "process_isolation": "forkserver",
        # Log messages decide nothing; their text is not asserted.
        "do_not_mutate_patterns": [r"\blog\.(debug|info|warning|error|exception)\("],
        "use_git_change_detection": False,
        "timeout_multiplier": 10.0,
        "timeout_constant": 5.0,
    }
    pyproject = (src / "pyproject.toml").read_text()
    if src != ROOT:
        shutil.rmtree(src)
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in config.items()]
    (STAGE / "pyproject.toml").write_text(pyproject + "\n".join(lines) + "\n")
    return mutate


def results(mutated: list[str]) -> dict:
    """Per staged file: counts and survivors (with diffs), from mutmut's .meta files."""
    from mutmut.stats import status_by_exit_code  # the venv's mutmut, the one `mutmut run` was

    mutmut = str(Path(sys.executable).parent / "mutmut")
    report = {}
    for path in mutated:
        meta = STAGE / "mutants" / (path + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.is_file() else {}
        statuses = {k: status_by_exit_code[v] for k, v in codes.items()}
        survivors = []
        for name, status in sorted(statuses.items()):
            if status in KILLED:
                continue
            diff = subprocess.run([mutmut, "show", name], cwd=STAGE, capture_output=True, text=True).stdout
            survivors.append({"name": name, "status": status, "diff": diff.strip()})
        killed = sum(s in KILLED for s in statuses.values())
        report[path] = {
            "mutants": len(statuses),
            "killed": killed,
            "timeouts": sum(s == "timeout" for s in statuses.values()),
            "kill_rate": round(100.0 * killed / len(statuses), 1) if statuses else None,
            "survivors": survivors,
        }
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel (one core each)")
    ap.add_argument("--keep", action="store_true", help="reuse build/mutation's results (re-test only what changed)")
    ap.add_argument("--json", type=Path, default=STAGE.parent / "mutation-report.json", help="where the report goes")
    ap.add_argument("--min-kill-rate", type=float, default=85.0)
    ap.add_argument("--only", action="append", help="targets whose path contains this (repeatable; default: all)")
    ap.add_argument("--rev", help="mutate and test this commit's files instead of the working tree")
    args = ap.parse_args()
    targets = [t for t in TARGETS if not args.only or any(o in t.path for o in args.only)]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env = {k: v for k, v in env.items() if not k.startswith("OODGUARD_") or k == "OODGUARD_CACHE_DIR"}
    t0 = time.monotonic()
    if args.keep and (STAGE / "mutants").is_dir():
        mutated = [staged(t.path) for t in targets if (ROOT / t.path).is_file()]
    else:
        mutated = stage(targets, args.rev)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mutmut"), "run", "--max-children", str(args.max_children)], cwd=STAGE, env=env
    )
    elapsed = time.monotonic() - t0
    report = results(mutated)
    total = sum(r["mutants"] for r in report.values())
    killed = sum(r["killed"] for r in report.values())
    rate = 100.0 * killed / total if total else 0.0
    summary = {
        "elapsed_s": round(elapsed, 1),
        "max_children": args.max_children,
        "mutants": total,
        "killed": killed,
        "kill_rate": round(rate, 1),
        "mutmut_exit": proc.returncode,
        "modules": report,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))

    print(f"\n{'module':40} {'mutants':>7} {'killed':>7} {'rate':>6}")
    for path, r in report.items():
        print(f"{path:40} {r['mutants']:7d} {r['killed']:7d} {r['kill_rate'] if r['kill_rate'] is not None else '-':>6}")
    print(f"{'all':40} {total:7d} {killed:7d} {rate:6.1f}   ({elapsed / 60:.1f} min, {args.max_children} workers)")
    for path, r in report.items():
        for s in r["survivors"]:
            print(f"\n--- {s['name']} ({s['status']})\n{s['diff']}")
    print(f"\nreport: {args.json}")
    return 0 if total and rate >= args.min_kill_rate else 1


if __name__ == "__main__":
    sys.exit(main())
