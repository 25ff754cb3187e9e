"""Lock files (locks/*.txt): made from today's pyproject.toml, pinning everything it asks for, with
hashes, and the only source `make install`, `make serve`, the Dockerfiles and CI install from. Offline."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lockfile", ROOT / "locks" / "lockfile.py")
lockfile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lockfile)


def _entries(text: str) -> list[tuple[Requirement, list[str]]]:
    """(requirement 'name==version ; marker', its hashes) for every entry of a pip lock file."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        req_text, *hashes = line.split("--hash=")
        out.append((Requirement(req_text.strip()), [h.strip() for h in hashes]))
    return out


def _pins(text: str, env: dict) -> dict[str, str]:
    """name -> pinned version of the entries that apply in `env`."""
    pins = {}
    for req, _ in _entries(text):
        if req.marker is None or req.marker.evaluate(env):
            (spec,) = req.specifier
            pins[canonicalize_name(req.name)] = spec.version
    return pins


@pytest.mark.parametrize("name", list(lockfile.SETS))
def test_lock_was_made_from_this_pyproject(name):
    assert lockfile.stale_locks() == [], "pyproject.toml and the locks disagree: run `make lock`"
    assert lockfile.recorded_sha256(lockfile.lock_path(name).read_text()) == lockfile.declaration_sha256(
        lockfile.read_pyproject(), lockfile.SETS[name]
    )


def test_editing_a_dependency_makes_the_lock_stale():
    pyproject = lockfile.read_pyproject()
    serve, dev = (lockfile.declaration_sha256(pyproject, lockfile.SETS[n]) for n in ("serve", "dev"))
    pyproject["project"]["optional-dependencies"]["dev"].append("requests>=2")
    assert lockfile.declaration_sha256(pyproject, lockfile.SETS["dev"]) != dev
    assert lockfile.declaration_sha256(pyproject, lockfile.SETS["serve"]) == serve  # a set without `dev` is unaffected
    pyproject["project"]["optional-dependencies"]["serve"][0] += ",<99"
    assert lockfile.declaration_sha256(pyproject, lockfile.SETS["serve"]) != serve


@pytest.mark.parametrize("name", list(lockfile.SETS))
@pytest.mark.parametrize(
    "platform",
    [
        {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
        {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
        {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
    ],
    ids=["linux-x86_64", "linux-aarch64", "macos-arm64"],
)
@pytest.mark.parametrize("python", ["3.11.7", "3.12.3"])
def test_every_declared_requirement_is_pinned_and_hashed(name, platform, python):
    text = lockfile.lock_path(name).read_text()
    entries = _entries(text)
    assert entries and all(hashes for _, hashes in entries), "every entry carries --hash"
    assert all(str(req.specifier).startswith("==") for req, _ in entries), "every entry is pinned with =="
    env = {**default_environment(), **platform, "python_version": python[:4], "python_full_version": python}
    pins = _pins(text, env)
    pyproject = lockfile.read_pyproject()
    project = pyproject["project"]
    wanted = list(project["dependencies"]) + list(pyproject["build-system"]["requires"])
    for extra in lockfile.SETS[name]:
        wanted += project["optional-dependencies"][extra]
    for line in wanted:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        key = canonicalize_name(req.name)
        assert key in pins, f"{name}: {req.name} is declared but not locked"
        assert req.specifier.contains(pins[key], prereleases=True), f"{name}: {req.name}{req.specifier} vs locked {pins[key]}"


def test_torch_pins_are_exact():
    for name in ("train", "dev"):
        pins = _pins(lockfile.lock_path(name).read_text(), default_environment())
        assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert "torch" not in _pins(lockfile.lock_path("serve").read_text(), default_environment())


def test_every_install_path_uses_the_locks():
    make = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps -r" in make
    assert "LOCK_DEV := locks/dev.txt" in make and "LOCK_SERVE := locks/serve.txt" in make
    assert re.search(r"^\$\(STAMP\): pyproject.toml \$\(LOCK_DEV\)$", make, re.M)
    assert re.search(r"^\$\(SERVE_STAMP\): pyproject.toml \$\(LOCK_SERVE\)$", make, re.M)
    assert re.search(r"^lock:", make, re.M)
    # No install line in the Makefile may resolve dependencies on its own.
    for line in re.findall(r"pip install[^\n]*", make):
        assert "--no-deps" in line or "uv==" in line, line
    for dockerfile, lock in (("service.Dockerfile", "locks/serve.txt"), ("trainer.Dockerfile", "locks/train.txt")):
        text = (ROOT / "docker" / dockerfile).read_text()
        installs = re.findall(r"pip install[^\n]*", text)
        assert installs[0].endswith(f"--require-hashes --no-deps -r {lock}"), installs
        assert all("--no-deps" in line for line in installs), installs
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI installs through the Makefile
