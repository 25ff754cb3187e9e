"""Admin authentication: a bearer token from `OODGUARD_ADMIN_TOKEN`, compared in constant time.

No token configured -> the admin API does not exist (404, as for any unknown path), so a service
started without thinking about it can never be reconfigured over HTTP. With a token: no or
malformed credentials -> 401 (kind `unauthorized`, with `WWW-Authenticate: Bearer`); a wrong token -> 403. The token is
never logged; only the fact that a request was refused, and from where.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import OodguardError
from .settings import Settings

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="Admin token (OODGUARD_ADMIN_TOKEN) as `Authorization: Bearer <token>`.")


def configured_token(settings: Settings) -> str | None:
    token = settings.admin_token
    return token.get_secret_value() or None if token is not None else None


def token_matches(presented: str, expected: str) -> bool:
    # Hash both sides first so the comparison time depends on neither the content nor the length.
    a = hashlib.sha256(presented.encode("utf-8")).digest()
    b = hashlib.sha256(expected.encode("utf-8")).digest()
    return hmac.compare_digest(a, b)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """FastAPI dependency guarding every admin route."""
    expected = configured_token(request.app.state.settings)
    if expected is None:
        # Exactly what an unknown path answers: the admin API is indistinguishable from absent.
        raise HTTPException(status.HTTP_404_NOT_FOUND)
    if credentials is None or not credentials.credentials:
        log.warning("admin %s %s from %s refused: no bearer token", request.method, request.url.path, _client(request))
        raise OodguardError("unauthorized", "unauthorized", "admin API needs `Authorization: Bearer <token>`")
    if not token_matches(credentials.credentials, expected):
        log.warning("admin %s %s from %s refused: wrong token", request.method, request.url.path, _client(request))
        raise OodguardError("forbidden", "forbidden", "the admin token is not valid")


AdminAuth = Depends(require_admin)
