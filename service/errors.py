"""One error type mapped to HTTP in one place.

Routes raise `ApiError(status, code, message)`; the handlers installed by `install_error_handlers`
turn it, any other `HTTPException` (404/405 from routing, 401/403 from the admin API), and request
validation errors into JSON. Unexpected exceptions are caught by the outer middleware
(`service.middleware`) so that no client ever sees an HTML page or a traceback.

The body's shape depends on the protocol the path speaks (`error_body(code, message, path)`):

- everywhere but `/v2`: `{"error": {"code": "...", "message": "..."}}`;
- `/v2` (Open Inference Protocol): `{"error": "<message>", "code": "<code>"}` - the OIP / KServe
  shape, whose `error` is a string (tritonclient's `str(exception)` needs it), with this service's
  machine-readable code next to it.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

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


class ApiError(HTTPException):
    """An HTTP error with a stable machine-readable `code` and a human-readable `message`."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code
        self.message = message


def unavailable(code: str, message: str, retry_after_s: int = 1) -> ApiError:
    """503 with Retry-After: the client did nothing wrong and may try again."""
    return ApiError(503, code, message, headers={"Retry-After": str(retry_after_s)})


V2_PREFIX = "/v2"


def speaks_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_body(code: str, message: str, path: str = "") -> dict:
    """The JSON error for a request to `path`: the OIP shape on /v2, this service's everywhere else."""
    if speaks_v2(path):
        return {"error": message, "code": code}
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, path: str = ""
) -> JSONResponse:
    return JSONResponse(error_body(code, message, path), status_code=status, headers=headers)


def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, ApiError):
        code, message = exc.code, exc.message
    elif isinstance(exc.detail, dict) and {"code", "message"} <= exc.detail.keys():
        code, message = str(exc.detail["code"]), str(exc.detail["message"])
    else:
        code = _DEFAULT_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = exc.detail if isinstance(exc.detail, str) else _phrase(exc.status_code)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route for {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None), path=request.url.path)


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "validation_error", describe_validation_errors(exc.errors()), path=request.url.path)


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
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
