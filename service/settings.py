"""Service configuration: one pydantic-settings `Settings`, read from `OODGUARD_*` environment variables.

Built explicitly (`Settings()` in `oodguard serve`, or by a test) and passed to `create_app(settings)`;
never constructed at import time. `oodguard serve` flags override the environment field by field.
Every limit that protects the service from its clients lives here, with its default.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .store import TarLimits

_MIB = 1 << 20
_WEAK_TOKENS = {"change-me", "changeme", "change-me-to-a-long-random-string", "secret", "password", "token", "admin"}
MIN_ADMIN_TOKEN_LENGTH = 16

LogLevel = Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"]


class Settings(BaseSettings):
    """Everything `oodguard serve` can be told. Env: `OODGUARD_<FIELD>` (e.g. `OODGUARD_MAX_BATCH=16`)."""

    model_config = SettingsConfigDict(env_prefix="OODGUARD_", extra="ignore", validate_default=True)

    # -- network --------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface to bind. Loopback by default; put a TLS proxy in front.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")

    # -- models ---------------------------------------------------------------------------------
    bundle: Path | None = Field(None, description="Bundle directory to serve (or to seed the models directory).")
    models_dir: Path | None = Field(None, description="Versioned bundle store <dir>/<name>/<version>/ (hot-swap).")
    keep_versions: int = Field(5, ge=1, le=1000, description="Versions kept per model for rollback.")
    watch_interval_s: float = Field(0.0, ge=0.0, le=3600.0, description="Poll models_dir's ACTIVE pointer (0 = off).")
    admin_token: SecretStr | None = Field(None, description="Bearer token enabling /admin (off when unset).")
    validate_timeout_s: float = Field(
        120.0, gt=0.0, le=3600.0,
        description="Longest a bundle from the models directory or /admin may take to verify and warm up "
        "(in a child process, killed after it; 422 check `timeout`).",
    )

    # -- inference ------------------------------------------------------------------------------
    batching: bool = Field(True, description="Group concurrent requests into one onnxruntime call.")
    max_batch: int = Field(32, ge=1, le=4096, description="Images per batch at most.")
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="Longest a request waits for its batch to fill.")
    max_queue_images: int = Field(1024, ge=1, description="Images waiting for inference before 503 queue_full.")
    intra_op_threads: int = Field(1, ge=0, le=256, description="onnxruntime intra-op threads (0 = onnxruntime default).")
    fast_predict: bool = Field(
        True,
        description="Serve POST /v1/predict with a plain ASGI endpoint (same contract, less per-request "
        "work); off: through FastAPI's routing, as documented in OpenAPI.",
    )
    decode_threads: int = Field(2, ge=1, le=64, description="Threads decoding images off the event loop.")
    inline_decode_max_bytes: int = Field(
        32768, ge=0, le=1 << 20,
        description="Requests whose images total at most this many bytes are decoded on the event loop "
        "(cheaper than a thread hand-off) if they also declare at most inline_decode_max_pixels; 0 = always the pool.",
    )
    inline_decode_max_pixels: int = Field(
        65536, ge=0, le=1 << 20, description="Declared pixels (all images of a request) at most decoded on the event loop.",
    )
    heavy_decode_processes: int = Field(
        1, ge=0, le=64,
        description="Worker processes (at niceness 10) decoding the requests whose images declare at least heavy_decode_min_pixels "
        "(a long decode in a thread holds the server's GIL for milliseconds at a time; a crashing decoder ends a "
        "worker, not the server); 0 = decode them in the decode threads.",
    )
    heavy_decode_min_pixels: int = Field(
        4_194_304, ge=1, le=1 << 30,
        description="Declared pixels (all images of a request) from which decoding goes to the worker processes.",
    )
    request_timeout_s: float = Field(30.0, gt=0.0, le=600.0, description="Longest a request waits for inference.")
    retry_after_s: int = Field(1, ge=0, le=3600, description="Retry-After header value on 503 responses.")

    # -- drift alarm ----------------------------------------------------------------------------
    drift_alpha: float = Field(
        0.01, gt=0.0, lt=1.0,
        description="Drift alarm level: the p-value test martingale of the active model alarms at 1/alpha "
        "(false-alarm probability <= alpha per model, by Ville's inequality).",
    )
    drift_jump: float = Field(
        1e-4, gt=0.0, lt=1.0,
        description="Share of the drift martingale's capital re-spread over its bets per image; smaller waits "
        "better through long in-distribution streams, larger reacts sooner after short ones.",
    )

    # -- input limits ---------------------------------------------------------------------------
    max_body_bytes: int = Field(16 * _MIB, ge=1024, description="Largest request body (413 above).")
    max_upload_bytes: int = Field(
        512 * _MIB, ge=1024, description="Largest body on /admin (bundle uploads; 413 upload_too_large above)."
    )
    max_bundle_bytes: int = Field(
        TarLimits.max_total_bytes, ge=1024, description="Largest unpacked size of an uploaded bundle archive (422 above)."
    )
    max_bundle_files: int = Field(
        TarLimits.max_members, ge=1, description="Files and directories in an uploaded or registered bundle at most (422 above)."
    )
    max_images_per_request: int = Field(64, ge=1, le=4096, description="Images in one request at most (422 above).")
    max_pixels: int = Field(
        16_777_216, ge=1, description="Largest width*height, checked from the header before decoding (413 above)."
    )
    max_image_side: int = Field(8192, ge=1, description="Largest width or height in pixels (413 above).")
    max_request_pixels: int = Field(
        67_108_864, ge=1,
        description="Largest sum of width*height over a request's images, from the headers before decoding (413 above); "
        "default 4 x max_pixels.",
    )

    # -- HTTP server (uvicorn) ------------------------------------------------------------------
    http: Literal["auto", "h11", "httptools"] = Field("auto", description="uvicorn HTTP parser implementation.")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="Largest request head: request line + headers (431).")
    keep_alive_timeout_s: float = Field(5.0, gt=0.0, description="Idle keep-alive connections close after this.")
    client_timeout_s: float = Field(
        15.0, gt=0.0, le=600.0, description="Longest wait for a request head, or between body chunks (408 after)."
    )
    limit_concurrency: int | None = Field(1024, ge=1, description="Open connections at most; more get 503 at once.")
    graceful_shutdown_s: float = Field(30.0, gt=0.0, description="Longest wait for in-flight requests on shutdown.")
    access_log: bool = Field(False, description="Log every request (uvicorn access log); off: it costs throughput.")
    malloc_mmap_threshold_bytes: int = Field(
        131072, ge=0, le=1 << 30,
        description="oodguard serve pins glibc's mmap threshold here, so large transient buffers (bodies, images) "
        "return to the OS when freed (0 = glibc's dynamic threshold).",
    )

    malloc_arenas: int = Field(
        2, ge=0, le=1024,
        description="oodguard serve caps glibc's malloc arenas here (MALLOC_ARENA_MAX), so memory freed by one "
        "thread is not stranded in its own arena (0 = glibc's default, 8 per core).",
    )

    log_level: LogLevel = Field("INFO", description="Python logging level.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return None
        token = v.get_secret_value()
        if token == "":
            return None  # OODGUARD_ADMIN_TOKEN= (empty) means "admin API off"
        # A guessable token on an API that swaps models is worse than no admin API at all.
        if len(token) < MIN_ADMIN_TOKEN_LENGTH or token.lower() in _WEAK_TOKENS:
            raise ValueError(
                f"admin_token must be at least {MIN_ADMIN_TOKEN_LENGTH} characters and not a placeholder "
                "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return v

    @field_validator("bundle", "models_dir")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser()

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.max_upload_bytes < self.max_body_bytes:
            raise ValueError("max_upload_bytes must be >= max_body_bytes")
        return self

    @property
    def log_level_number(self) -> int:
        return logging.getLevelName(self.log_level)
