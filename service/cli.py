"""`oodguard serve`: run the inference service under uvicorn (one worker, programmatic).

Every flag is derived from a `Settings` field (`serve_options`: type, help text and default come
from the field; the flag name is the field's, in kebab case, except three older names kept in
`_FLAG_NAMES`); a flag left out falls back to its `OODGUARD_*` environment variable, then to the
default. Bad values exit with status 2 and a message, never a traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import logging
import signal
import sys
import threading
import types
import typing

import typer
from pydantic import ValidationError

log = logging.getLogger(__name__)
GC_GEN0_THRESHOLD = 10_000  # allocations between young collections (CPython's default: 700)
_M_MMAP_THRESHOLD = -3  # glibc malloc.h
_M_ARENA_MAX = -8  # glibc malloc.h


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        parts.append(f"{field}: {err.get('msg')}")
    return "; ".join(parts)


def build_settings(**overrides):
    """Settings from the environment with the given (non-None) flag values on top. Exits 2 on bad values."""
    from .settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        typer.echo(f"error: invalid settings: {_describe(exc)}", err=True)
        raise typer.Exit(2) from None


def run_server(settings) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit status (0 = clean shutdown)."""
    import uvicorn

    from .app import create_app

    limit_malloc_arenas(settings.malloc_arenas)  # before the app starts its threads
    app = create_app(settings)
    http = _http_protocol(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,  # one process: the model, its threads and the batcher are per process
        http=http,
        lifespan="on",
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        server_header=False,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=max(1, int(round(settings.keep_alive_timeout_s))),
        timeout_graceful_shutdown=max(1, int(round(settings.graceful_shutdown_s))),
        # The guarded httptools protocol limits connections itself (JSON 503); h11 keeps uvicorn's.
        limit_concurrency=settings.limit_concurrency if isinstance(http, str) else None,
    )
    server = uvicorn.Server(config)
    quiet_garbage_collector()  # the server process is ours: after the imports, before the first request
    pin_mmap_threshold(settings.malloc_mmap_threshold_bytes)
    with _signals_end_cleanly():
        try:
            server.run()
        except SystemExit as exc:  # uvicorn exits 3 itself when the lifespan startup fails
            if not server.started:
                return 2
            return int(exc.code or 0)
    if not server.started:
        return 2
    return 0


def quiet_garbage_collector() -> None:
    """Keep the cyclic GC off the latency tail: freeze what the imports built, collect the young less often.

    A running service holds a few hundred thousand long-lived objects (FastAPI, pydantic, onnxruntime,
    numpy); every full collection walked all of them while requests waited: p99 at concurrency 32 was
    52 ms with p50 at 22 ms. After `gc.freeze()` they are never scanned again (p99 31 ms), and a larger
    first-generation threshold makes young collections ~14x rarer (+5-10% throughput at c=32;
    bench/load.py). Most request objects are freed by reference counting anyway; the cycles requests do
    leave (exceptions, task frames) are still collected, in larger batches.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def pin_mmap_threshold(threshold_bytes: int) -> bool:
    """Fix glibc's mmap threshold, so large transient buffers go back to the OS when freed.

    glibc serves allocations above the threshold (128 KiB) with mmap and returns them to the OS on
    free - but after freeing such a chunk it raises the threshold to that chunk's size (up to 32 MiB),
    so later 16 MiB request bodies, decoded images and parsed JSON come from the heap and stay
    resident. Under hostile traffic RSS grew 12% in 30 s and stayed (bench/soak_hostile.py); pinned,
    5%. `mallopt(M_MMAP_THRESHOLD)` pins it (it also turns the dynamic adjustment off). 0, or not
    glibc: left alone. Returns whether it was set.
    """
    return _mallopt(_M_MMAP_THRESHOLD, threshold_bytes)


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX does), so freed memory is not stranded per thread.

    glibc gives each thread that allocates under contention its own arena, up to 8 per core; the
    service's decode, JSON-parsing, onnxruntime and anyio threads each fragment theirs, and an arena
    gives memory back to the OS only from its top. After 2 minutes of hostile traffic
    (bench/soak_hostile.py) RSS settled 10% above its start with glibc's default and 5% with 2 arenas.
    `mallopt(M_ARENA_MAX)` applies to arenas created afterwards, hence before the app starts threads.
    0, or not glibc: left alone. Returns whether it was set.
    """
    return _mallopt(_M_ARENA_MAX, arenas)


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(param, value) when value > 0; False when not set (value 0, or not glibc)."""
    if value <= 0:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, int(value)))
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False


def _http_protocol(settings):
    """httptools (fast) wrapped with our head-size limit and head deadline; h11 when asked or absent."""
    if settings.http == "h11":
        return "h11"
    try:
        import httptools  # noqa: F401
    except ImportError:
        if settings.http == "httptools":
            typer.echo("error: --http httptools needs the httptools package", err=True)
            raise typer.Exit(2) from None
        return "h11"
    from .http_protocol import guarded_httptools_protocol

    return guarded_httptools_protocol(settings.max_header_bytes, settings.client_timeout_s, settings.limit_concurrency)


@contextlib.contextmanager
def _signals_end_cleanly():
    """SIGTERM / SIGINT mean "stop": after uvicorn's graceful shutdown the process exits 0.

    uvicorn re-raises the signal it caught once it has shut down, which would end the process
    "killed by SIGTERM" (exit -15) even though every request completed. The handlers installed
    here receive that re-raised signal instead, so a requested stop is a clean exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _frame: received.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            log.info("stopped by %s", signal.Signals(received[0]).name)


# Flags named before they were derived from the settings, kept as they were: field -> flag.
_FLAG_NAMES = {"intra_op_threads": "--threads", "max_images_per_request": "--max-images", "limit_concurrency": "--max-connections"}
_NOT_FLAGS = {"admin_token"}  # secrets do not belong on command lines: OODGUARD_ADMIN_TOKEN only


def flag_name(field: str) -> str:
    """The `oodguard serve` flag of a Settings field: its name in kebab case, without a seconds suffix."""
    return _FLAG_NAMES.get(field) or "--" + field.removesuffix("_s").replace("_", "-")


def _shown(value: object) -> str:
    return "unset" if value is None else str(value)


def serve_options(settings_cls) -> list[inspect.Parameter]:
    """One typer option per Settings field (but the token): type, help and default from the field itself."""
    params = []
    for name, info in settings_cls.model_fields.items():
        if name in _NOT_FLAGS:
            continue
        kind = info.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `X | None`: the flag is X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        flag = flag_name(name)
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        option = typer.Option(
            None, *decls,
            help=f"{info.description} Env: OODGUARD_{name.upper()}.",
            show_default=_shown(info.default),
            case_sensitive=False,  # a Literal's choices: --log-level info
        )
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None))
    return params


def register(app: typer.Typer) -> None:
    """Add `serve` to the root `oodguard` app, its flags derived from `Settings`."""
    try:
        from .settings import Settings
    except ModuleNotFoundError as exc:  # without the serve extra, running it names the extra (oodguard.cli.main)
        missing = exc  # `exc` itself is unbound when the except clause ends; the command raises it later

        @app.command("serve", help="Serve a bundle over HTTP (needs the 'serve' extra).")
        def serve_unavailable() -> None:
            raise missing

        return

    def serve(**flags) -> None:
        """Serve a bundle over HTTP: /v1/predict, /v1/models, /v2 (Open Inference Protocol), /metrics, /healthz, /readyz.

        Every option can also be set by its OODGUARD_* environment variable (a flag wins); the
        admin token only by OODGUARD_ADMIN_TOKEN (secrets do not belong on command lines).
        """
        settings = build_settings(**flags)
        if settings.bundle is None and settings.models_dir is None:
            typer.echo("error: give --bundle PATH or --models-dir DIR (or OODGUARD_BUNDLE / OODGUARD_MODELS_DIR)", err=True)
            raise typer.Exit(2)
        if settings.bundle is not None and not settings.bundle.is_dir():
            typer.echo(f"error: bundle {settings.bundle} is not a directory", err=True)
            raise typer.Exit(2)
        if settings.models_dir is not None and settings.models_dir.exists() and not settings.models_dir.is_dir():
            typer.echo(f"error: models dir {settings.models_dir} is not a directory", err=True)
            raise typer.Exit(2)
        logging.getLogger().setLevel(settings.log_level)
        code = run_server(settings)
        if code:
            raise typer.Exit(code)
        sys.stdout.flush()

    serve.__signature__ = inspect.Signature(serve_options(Settings))
    app.command("serve")(serve)
