"""Personal API tokens: list, create (the secret shown once), revoke."""

from __future__ import annotations

import uuid
from datetime import timedelta

from aiohttp import web

from sdapi.db.models import ApiToken, TokenKind, utcnow
from web.auth import Principal
from web.errors import NotFound, ValidationFailed
from web.openapi import ApiRoutes, ErrorBody, Response, json_response
from web.schemas.tokens import NewToken, Token, TokenCreate, TokenList
from web.token_cache import revoked_everywhere
from web.tokens import issue_token, live_tokens, revoke_token

routes = ApiRoutes(tags=["tokens"])

# A token made without `expires_at` works this long; none may outlive the
# longest (days).
DEFAULT_TTL_DAYS = 365
MAX_TTL_DAYS = 5 * 365
SIGNIN_NAME = "sign-in"


def _public(token: ApiToken) -> Token:
    return Token(
        id=str(token.id),
        name=token.name or SIGNIN_NAME,
        created_at=token.created_at,
        last_used_at=token.last_used_at,
        expires_at=token.expires_at,
    )


@routes.route(
    "GET",
    "/api/v1/tokens",
    summary="Your API tokens (never their secrets)",
    responses=[Response(200, "Live bearer tokens, newest first", TokenList)],
)
async def list_tokens(
    request: web.Request, *, principal: Principal
) -> web.StreamResponse:
    """Personal tokens and the tokens sign-ins returned, while they work."""
    tokens = await (
        live_tokens()
        .filter(user_id=principal.user.id, kind=TokenKind.BEARER)
        .order_by("-created_at")
    )
    return json_response(TokenList(items=[_public(t) for t in tokens]))


@routes.route(
    "POST",
    "/api/v1/tokens",
    summary="Make a personal API token",
    responses=[
        Response(201, "The token, with its secret shown this once", NewToken),
        Response(422, "Invalid name or expiry", ErrorBody),
    ],
)
async def create_token(
    request: web.Request, *, principal: Principal, body: TokenCreate
) -> web.StreamResponse:
    """For scripts and the OpenAI SDK: `Authorization: Bearer <token>`."""
    now = utcnow()
    expires_at = body.expires_at or now + timedelta(days=DEFAULT_TTL_DAYS)
    if expires_at.tzinfo is None:
        raise ValidationFailed(
            details=[{"field": "expires_at", "message": "Give a time zone (Z)."}]
        )
    if not now < expires_at <= now + timedelta(days=MAX_TTL_DAYS):
        raise ValidationFailed(
            details=[
                {
                    "field": "expires_at",
                    "message": "Must be in the future and at most "
                    f"{MAX_TTL_DAYS // 365} years ahead.",
                }
            ]
        )
    secret, token = await issue_token(
        principal.user,
        kind=TokenKind.BEARER,
        expires_at=expires_at,
        name=body.name,
        now=now,
    )
    created = NewToken(**_public(token).model_dump(), token=secret)
    return json_response(created, status=201)


@routes.route(
    "DELETE",
    "/api/v1/tokens/{id}",
    summary="Revoke a token: it stops working at once",
    responses=[
        Response(204, "Revoked"),
        Response(404, "No such token of yours", ErrorBody),
    ],
)
async def delete_token(
    request: web.Request, *, principal: Principal
) -> web.StreamResponse:
    """Its open WebSockets close too, on every web replica."""
    try:
        token_id = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound("No such token.") from None
    owned = (
        await live_tokens()
        .filter(id=token_id, user_id=principal.user.id, kind=TokenKind.BEARER)
        .exists()
    )
    if not owned:
        raise NotFound("No such token.")
    await revoke_token(token_id)
    await revoked_everywhere(request.app, token_id)
    return web.Response(status=204)
