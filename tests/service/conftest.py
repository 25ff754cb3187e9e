"""Service test fixtures: tiny bundles (no torch), settings, and apps with their lifespan running.

- `tiny_bundle` / `poison_bundle` (session): bundles from `bundle_factory.make_tiny_bundle`.
- `make_settings(**overrides)`: `Settings` serving `tiny_bundle` with test-friendly defaults.
- `make_client(**overrides)`: a started `TestClient` (lifespan entered); closed at teardown.
- `client`: `make_client()` with default settings.
- `run_app(app, coro_fn)`: run `await coro_fn(httpx.AsyncClient)` against an app inside its
  lifespan, on one event loop (for concurrency tests).
- `serving_shipped(bundle)`: a started `TestClient` serving a bundle of models/ with production settings and
  no OODGUARD_* environment (for module-scoped fixtures); `bundle_verify(bundle)`: `oodguard bundle verify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from oodguard.service.app import create_app
from oodguard.service.settings import Settings

from .bundle_factory import make_tiny_bundle

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx vs httpx2
    from fastapi.testclient import TestClient

@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny", name="tiny", version="1")


@pytest.fixture(scope="session")
def poison_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "poison", name="poison", version="1", poison=True)


@pytest.fixture
def make_settings(tiny_bundle, monkeypatch):
    # Settings must come from the test alone, never from the developer's OODGUARD_* environment.
    for key in [k for k in os.environ if k.startswith("OODGUARD_") and k != "OODGUARD_CACHE_DIR"]:
        monkeypatch.delenv(key)

    def _make(**overrides) -> Settings:
        values = {"bundle": tiny_bundle, "max_wait_ms": 2.0, "decode_threads": 1, "request_timeout_s": 10.0}
        values.update(overrides)
        return Settings(**values)

    return _make


@pytest.fixture
def make_client(make_settings):
    clients = []

    def _make(**overrides) -> TestClient:
        c = TestClient(create_app(make_settings(**overrides)), raise_server_exceptions=False)
        c.__enter__()
        clients.append(c)
        return c

    yield _make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def run_app(app, coro_fn, timeout: float = 60.0):
    """Enter the app's lifespan and run `coro_fn(async_client)` on one event loop; returns its result."""

    async def _main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
                return await asyncio.wait_for(coro_fn(ac), timeout)

    return asyncio.run(_main())


@contextlib.contextmanager
def serving_shipped(bundle: Path) -> Iterator[TestClient]:
    """A started TestClient serving `bundle` as `oodguard serve` would, with the developer's OODGUARD_* environment
    set aside meanwhile (module scope: monkeypatch is per test)."""
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("OODGUARD_") and k != "OODGUARD_CACHE_DIR"]}
    try:
        with TestClient(create_app(Settings(bundle=bundle, decode_threads=1, request_timeout_s=60.0))) as c:
            yield c
    finally:
        os.environ.update(saved)


def bundle_verify(bundle: Path) -> subprocess.CompletedProcess:
    """`oodguard bundle verify BUNDLE` in a subprocess, one thread."""
    return subprocess.run([sys.executable, "-m", "oodguard.cli", "bundle", "verify", str(bundle)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
