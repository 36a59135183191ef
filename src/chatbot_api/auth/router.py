"""Admin endpoints for API keys: create (the secret is in this response only), list, revoke.
Every route needs an admin-scoped key."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response, status

from chatbot_api.auth import keys, service
from chatbot_api.auth.dependencies import AdminPrincipal, SettingsDep
from chatbot_api.auth.models import ApiKey, KeyScope, Principal
from chatbot_api.auth.schemas import KeyCreate, KeyCreated, KeyLimitsOut, KeyList, KeyOut
from chatbot_api.db import SessionDep
from chatbot_api.errors import error_envelope

router = APIRouter(prefix="/api/v1/admin/keys", tags=["admin"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {
        "description": "No such key.",
        "content": {
            "application/json": {"example": error_envelope("not_found", "API key not found.")}
        },
    }
}


async def parse_key_id(key_id: str) -> uuid.UUID:
    """A malformed id names no key: 404, the same answer as an unknown one."""
    try:
        return uuid.UUID(key_id)
    except ValueError:
        raise service.key_not_found() from None


KeyIdDep = Annotated[uuid.UUID, Depends(parse_key_id)]


def key_out(key: ApiKey, principal: Principal) -> KeyOut:
    return KeyOut(
        id=key.id,
        name=key.name,
        user=principal.name,
        scope=KeyScope(key.scope),
        hint=keys.display_hint(key.hint),
        created_at=key.created_at,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        limits=KeyLimitsOut(
            requests_per_minute=key.requests_per_minute,
            concurrent_streams=key.concurrent_streams,
            tokens_per_day=key.tokens_per_day,
        ),
    )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
async def create_key(
    session: SessionDep, _admin: AdminPrincipal, body: KeyCreate, settings: SettingsDep
) -> KeyCreated:
    """Create a key. Its secret is in this response and nowhere else: store it now."""
    issued = await service.create_key(
        session,
        user=body.user or body.name,
        name=body.name,
        scope=body.scope,
        server_secret=settings.auth.server_secret.get_secret_value(),
        expires_in=None if body.expires_in is None else service.parse_expires_in(body.expires_in),
        requests_per_minute=body.limits.requests_per_minute,
        concurrent_streams=body.limits.concurrent_streams,
        tokens_per_day=body.limits.tokens_per_day,
    )
    return KeyCreated(**key_out(issued.key, issued.principal).model_dump(), key=issued.secret)


@router.get("", response_model=KeyList)
async def list_keys(session: SessionDep, _admin: AdminPrincipal) -> KeyList:
    """Every key, oldest first, without secrets."""
    return KeyList(data=[key_out(k, p) for k, p in await service.list_keys(session)])


@router.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
async def revoke_key(session: SessionDep, _admin: AdminPrincipal, key_id: KeyIdDep) -> Response:
    """Revoke a key: it stops working at once. Revoking a revoked key changes nothing."""
    await service.revoke_key(session, key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
