"""`CurrentPrincipal`: who is calling, from `Authorization: Bearer <key>`, and the per-key
request rate. Every API route depends on it (directly or through a dependency that loads
rows), so a route cannot be served to an unknown caller.

In order: a key in the query string is refused; a client with too many recent bad keys gets
429 before its key is even looked at; the key is looked up by its hash, one prepared
statement on a pooled connection given back at once (so a streaming route holds none); a bad
key is counted against the client; then the request counts against the key's per-minute
limit, whose state goes out as `x-ratelimit-*-requests` headers (`security.SecurityHeaders`).

`AUTH_MODE=disabled` serves one built-in local principal, with admin scope, and no key.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from chatbot_api.auth import keys, service
from chatbot_api.auth.models import LOCAL_PRINCIPAL_ID, LOCAL_PRINCIPAL_NAME, KeyScope
from chatbot_api.config import Settings
from chatbot_api.errors import Forbidden, InvalidApiKey, KeyInQuery, Unauthorized
from chatbot_api.limits import service as limits
from chatbot_api.limits.base import Limiter
from chatbot_api.sql import run_transaction

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    bearerFormat="API key",
    description="An API key (`chatbot-api keys create`), sent in the Authorization header.",
)

# Query parameters that name a credential: refused whatever their value.
CREDENTIAL_PARAMETERS = frozenset(
    {"api_key", "apikey", "api-key", "key", "token", "access_token", "auth", "authorization"}
)
RATELIMIT_STATE = "ratelimit_headers"


@dataclass(frozen=True, slots=True)
class Caller:
    principal_id: uuid.UUID
    name: str
    key_id: uuid.UUID | None
    scope: KeyScope
    limits: limits.KeyLimits

    @property
    def subject(self) -> str:
        """What per-key limits are counted against."""
        return f"key:{self.key_id}" if self.key_id else f"principal:{self.principal_id}"

    @property
    def is_admin(self) -> bool:
        return self.scope is KeyScope.ADMIN


def _refuse_key_in_query(request: Request) -> None:
    if not request.scope["query_string"]:
        return  # nearly every API call: no need to parse anything
    for name, value in request.query_params.multi_items():
        if name.lower() in CREDENTIAL_PARAMETERS or keys.KEY_LIKE.search(value):
            raise KeyInQuery(
                "API keys are accepted only in the Authorization header, never in the URL. "
                "A key that was sent in a URL may have been logged: revoke it."
            )


def _key_limits(
    settings: Settings,
    requests_per_minute: int | None = None,
    concurrent_streams: int | None = None,
    tokens_per_day: int | None = None,
) -> limits.KeyLimits:
    defaults = settings.limits
    return limits.KeyLimits(
        requests_per_minute=requests_per_minute or defaults.requests_per_minute,
        concurrent_streams=concurrent_streams or defaults.concurrent_streams,
        tokens_per_day=tokens_per_day or defaults.tokens_per_day,
    )


async def _identify(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None,
    settings: Settings,
    limiter: Limiter,
) -> Caller:
    if settings.auth.mode == "disabled":
        return Caller(
            LOCAL_PRINCIPAL_ID, LOCAL_PRINCIPAL_NAME, None, KeyScope.ADMIN, _key_limits(settings)
        )
    client = request.client.host if request.client else "unknown"
    failures = settings.auth.failed_attempts_per_minute
    await limits.check_auth_throttle(limiter, client=client, limit=failures)
    if credentials is None:
        raise Unauthorized("An API key is required, in the Authorization header (scheme: Bearer).")
    lookup = functools.partial(
        service.authenticate,
        secret=credentials.credentials,
        server_secret=settings.auth.server_secret.get_secret_value(),
    )
    try:
        holder = await run_transaction(request.app.state.engine, lookup, single_statement=True)
    except InvalidApiKey:
        await limits.record_auth_failure(limiter, client=client, limit=failures)
        raise
    return Caller(
        principal_id=holder.principal_id,
        name=holder.principal_name,
        key_id=holder.key_id,
        scope=holder.scope,
        limits=_key_limits(
            settings, holder.requests_per_minute, holder.concurrent_streams, holder.tokens_per_day
        ),
    )


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    settings: Settings = request.app.state.settings
    limiter: Limiter = request.app.state.limiter
    _refuse_key_in_query(request)
    caller = await _identify(request, credentials, settings, limiter)
    decision = await limits.admit_request(limiter, subject=caller.subject, limits=caller.limits)
    setattr(request.state, RATELIMIT_STATE, limits.ratelimit_headers("requests", decision))
    return caller


CurrentPrincipal = Annotated[Caller, Depends(current_principal)]


async def require_admin(caller: CurrentPrincipal) -> Caller:
    if not caller.is_admin:
        raise Forbidden("This endpoint needs an admin key.")
    return caller


AdminPrincipal = Annotated[Caller, Depends(require_admin)]


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(_settings)]
