"""Forgotten passwords: a single-use link by email, then a new password.

A reset proves control of the address, so it also verifies it; and it ends
every session and token of the account (someone else may have held them).
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta

from aiohttp import web
from tortoise.transactions import in_transaction

from sdapi.contract.names import PASSWORD_RESETS_PREFIX
from sdapi.db.models import ApiToken, PasswordReset, User, email_key_of, utcnow
from sdapi.db.outbox import queue_email, render_email
from web.appkeys import mail_templates_key, passwords_key, redis_key, settings_key
from web.errors import Gone
from web.openapi import ApiRoutes, ErrorBody, Response, json_response, read_body
from web.schemas.password_reset import ForgotRequest, ResetRequest, ResetRequested
from web.throttle import client_address, reserve, signup_limit
from web.tokens import announce_revoked, hash_secret, live_tokens

log = logging.getLogger(__name__)

routes = ApiRoutes(tags=["accounts"])

RESET_PAGE = "/reset-password"
INVALID_LINK = (
    "This password reset link is invalid, used or expired; ask for a new one."
)
# Reset emails one account may get a day, whoever asks.
RESETS_PER_DAY = 5


@routes.route(
    "POST",
    "/api/v1/auth/password/forgot",
    summary="Email a link that sets a new password",
    body=ForgotRequest,
    auth=False,
    responses=[
        Response(202, "Sent if the address has an account", ResetRequested),
        Response(429, "Too many requests from this client", ErrorBody),
    ],
)
async def forgot_password(request: web.Request) -> web.StreamResponse:
    """Always 202: nobody learns which addresses have accounts."""
    settings = request.app[settings_key]
    body = await read_body(request, ForgotRequest)
    redis = request.app[redis_key]
    address = client_address(request, trust_forwarded=settings.trust_forwarded)
    # Counted with sign-ups: each may send an email to any address.
    limit = signup_limit(
        address,
        max_signups=settings.signup_max_per_client,
        window_s=settings.signup_window,
    )
    attempt = await reserve(redis, [limit])
    user = await User.get_or_none(email_key=email_key_of(str(body.email)))
    if attempt.granted and user is not None and await _under_daily_cap(request, user):
        await _send_reset(request, user)
    return json_response(ResetRequested(), status=202)


async def _under_daily_cap(request: web.Request, user: User) -> bool:
    redis = request.app[redis_key]
    key = f"{PASSWORD_RESETS_PREFIX}:{user.id}"
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, 86400, nx=True)
        count, _ = await pipe.execute()
    return int(count) <= RESETS_PER_DAY


async def _send_reset(request: web.Request, user: User) -> None:
    settings = request.app[settings_key]
    token = secrets.token_urlsafe(32)
    now = utcnow()
    expires_at = now + timedelta(seconds=settings.password_reset_ttl)
    link = f"{settings.base_url}{RESET_PAGE}?token={token}"
    context = {
        "email": user.email,
        "link": link,
        "expires": f"{expires_at:%Y-%m-%d %H:%M}",
    }
    text_body, html_body = render_email(
        request.app[mail_templates_key], "password_reset", context
    )
    async with in_transaction():
        reset = await PasswordReset.create(
            user=user, token_hash=hash_secret(token), expires_at=expires_at
        )
        await queue_email(
            dedupe_key=f"password-reset:{reset.id}",
            to_address=user.email,
            subject="Set a new password for sdapi",
            text_body=text_body,
            html_body=html_body,
        )
    log.info("password reset link sent for user %s", user.id)


@routes.route(
    "POST",
    "/api/v1/auth/password/reset",
    summary="Set a new password with an emailed link's token",
    body=ResetRequest,
    auth=False,
    responses=[
        Response(204, "Set; every session and token of the account is revoked"),
        Response(410, "The link is invalid, used or expired", ErrorBody),
        Response(422, "The new password is not acceptable", ErrorBody),
    ],
)
async def reset_password(request: web.Request) -> web.StreamResponse:
    """The link works once; the account's email counts as verified after it."""
    body = await read_body(request, ResetRequest)
    password_hash = await request.app[passwords_key].hash(body.password)
    now = utcnow()
    async with in_transaction():
        # Claimed by a conditional update: two uses of one link, one wins.
        claimed = await PasswordReset.filter(
            token_hash=hash_secret(body.token), used_at=None, expires_at__gt=now
        ).update(used_at=now)
        if not claimed:
            raise Gone(INVALID_LINK)
        [user_id] = await PasswordReset.filter(
            token_hash=hash_secret(body.token)
        ).values_list("user_id", flat=True)
        # The user row alone: Postgres refuses to lock a join's outer side.
        user = await User.select_for_update().get(id=user_id)
        user.password_hash = password_hash
        if user.email_verified_at is None:
            user.email_verified_at = now
        await user.save(update_fields=["password_hash", "email_verified_at"])
        revoked = [
            str(token_id)
            for token_id in await live_tokens(now)
            .filter(user_id=user.id)
            .values_list("id", flat=True)
        ]
        await ApiToken.filter(id__in=revoked).update(revoked_at=now)
        # Other links of the account stop working too.
        await PasswordReset.filter(user_id=user.id, used_at=None).update(used_at=now)
    for token_id in revoked:
        await announce_revoked(request.app[redis_key], token_id)
    log.info("password reset for user %s; %d tokens revoked", user.id, len(revoked))
    return web.Response(status=204)
