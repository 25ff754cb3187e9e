"""One error type, mapped to HTTP in one place.

Domain code (bundle checks, the store, the registry, image decoding, request parsing, batching, the
inference layer) raises `OodguardError(kind, code, message)` and knows nothing of HTTP:

- `kind` says what went wrong for the caller (`invalid_input`, `not_found`, `conflict`,
  `unavailable`, `too_large`, ...); `HTTP_STATUS` below is the only place a kind becomes a status;
- `code` is stable and machine-readable (`invalid_image`, `queue_full`, `version_exists`, ...);
- `message` is for humans; `details` are extra fields of the JSON error (e.g. `check`: which
  validation step refused a bundle).

`render(exc, path)` turns one into (status, headers, body); `install_error_handlers` makes FastAPI
use it, and also turns any other `HTTPException` (404/405 from routing) and request validation
errors into JSON. Unexpected exceptions are caught by the outer middleware (`service.middleware`)
so that no client ever sees an HTML page or a traceback.

The body's shape depends on the protocol the path speaks (`error_body(code, message, path)`):

- everywhere but `/v2`: `{"error": {"code": "...", "message": "...", **details}}`;
- `/v2` (Open Inference Protocol): `{"error": "<message>", "code": "<code>"}` - the OIP / KServe
  shape, whose `error` is a string (tritonclient's `str(exception)` needs it), with this service's
  machine-readable code next to it.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the domain modules import this one; only the handlers need the web framework
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

# kind -> HTTP status: the one place a status is decided for an error oodguard raises.
HTTP_STATUS = {
    "bad_request": 400,  # the request is malformed (not JSON where JSON is needed, a path outside the store)
    "unauthorized": 401,  # no credentials (answered with WWW-Authenticate: Bearer)
    "forbidden": 403,  # wrong credentials
    "not_found": 404,  # no such model / version
    "client_timeout": 408,  # the client stopped sending its request
    "conflict": 409,  # refused in the current state (no models dir, version exists, nothing to roll back to)
    "too_large": 413,  # a body, an image or a request's pixels over a limit
    "unsupported_media": 415,  # a Content-Type, Content-Encoding or image format not served
    "invalid_input": 422,  # well-formed but invalid: a bad image, tensor, parameter, or bundle
    "head_too_large": 431,  # request line + headers over the limit (connection layer)
    "internal": 500,  # the server cannot do its job (no servable model, an unreadable state file)
    "unavailable": 503,  # try again later (answered with Retry-After): not ready, queue full, timeout
}

# status -> code for HTTPExceptions raised without one (routing, framework, other routers).
_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class OodguardError(Exception):
    """What went wrong (`kind`), why in one stable word (`code`), and for humans (`message`)."""

    def __init__(self, kind: str, code: str, message: str, **details: Any):
        if kind not in HTTP_STATUS:
            raise ValueError(f"unknown error kind {kind!r}; one of {sorted(HTTP_STATUS)}")
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.message = message
        self.details = details

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.kind]

    def __repr__(self) -> str:
        return f"OodguardError({self.kind!r}, {self.code!r}, {self.message!r})"


def not_ready() -> OodguardError:
    """The one "not ready" answer (`InferenceService.ready_model` decides; the registry's pin agrees)."""
    return OodguardError("unavailable", "not_ready", "the service is not ready: no warmed model is serving (starting, or shutting down)")


V2_PREFIX = "/v2"


def speaks_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_body(code: str, message: str, path: str = "", details: dict[str, Any] | None = None) -> dict:
    """The JSON error for a request to `path`: the OIP shape on /v2, this service's everywhere else."""
    if speaks_v2(path):
        return {"error": message, "code": code}
    return {"error": {"code": code, "message": message, **(details or {})}}


def render(exc: OodguardError, path: str = "", retry_after_s: int = 1) -> tuple[int, dict[str, str], dict]:
    """(status, headers, JSON body) answering `exc` on `path`."""
    headers = {}
    if exc.kind == "unavailable":
        headers["Retry-After"] = str(retry_after_s)  # the client did nothing wrong and may try again
    elif exc.kind == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    return exc.http_status, headers, error_body(exc.code, exc.message, path, exc.details)


def error_response(exc: OodguardError, path: str = "", retry_after_s: int = 1) -> JSONResponse:
    from starlette.responses import JSONResponse

    status, headers, body = render(exc, path, retry_after_s)
    return JSONResponse(body, status_code=status, headers=headers)


def _oodguard_error(request: Request, exc: OodguardError) -> JSONResponse:
    return error_response(exc, request.url.path, request.app.state.settings.retry_after_s)


def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    from starlette.responses import JSONResponse

    code = _DEFAULT_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else _phrase(exc.status_code)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return JSONResponse(
        error_body(code, message, request.url.path), status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(invalid_request(exc.errors()), request.url.path)


def invalid_request(errors, where: str | None = None) -> OodguardError:
    """pydantic's errors for a request as one 422 `validation_error`, in pydantic's own words.

    `where` ("query", "body"): what the errors' locations are relative to, as FastAPI reports them.
    """
    if where is not None:
        errors = [{**e, "loc": (where, *e.get("loc", ()))} for e in errors]
    return OodguardError("invalid_input", "validation_error", describe_validation_errors(errors))


def describe_validation_errors(errors) -> str:
    """pydantic/FastAPI error list -> one line: 'query.top_k: Input should be ... ; body.inputs: ...'."""
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__") or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def install_error_handlers(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app.add_exception_handler(OodguardError, _oodguard_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
