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
from sdapi.db.models import (
    ApiToken,
    EmailLink,
    LinkPurpose,
    User,
    email_key_of,
    utcnow,
)
from sdapi.db.outbox import queue_email, render_email
from web.appkeys import (
    background_key,
    clock_key,
    mail_templates_key,
    passwords_key,
    redis_key,
    settings_key,
)
from web.errors import Gone
from web.openapi import ApiRoutes, ErrorBody, Response, json_response
from web.routes.verification import prove_address
from web.schemas.password_reset import ForgotRequest, ResetRequest, ResetRequested
from web.throttle import (
    client_address,
    count_today,
    lift,
    reserve,
    reserve_or_refuse,
    reset_client_limit,
    reset_token_limit,
    signup_limit,
)
from web.token_cache import revoked_everywhere
from web.tokens import hash_secret, live_tokens

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
    auth=False,
    responses=[
        Response(202, "Sent if the address has an account", ResetRequested),
    ],
)
async def forgot_password(
    request: web.Request, *, body: ForgotRequest
) -> web.StreamResponse:
    """Always 202: nobody learns which addresses have accounts."""
    settings = request.app[settings_key]
    redis = request.app[redis_key]
    address = client_address(request, trust_forwarded=settings.trust_forwarded)
    # Counted with sign-ups: each may send an email to any address.
    limit = signup_limit(
        address,
        max_signups=settings.signup_max_per_client,
        window_s=settings.signup_window,
    )
    attempt = await reserve(redis, [limit])
    if attempt.granted:
        # Answered before the address is even looked up: the lookup, the
        # daily cap and the outbox write take longer for an address with an
        # account, and a client timing the answer would learn which have one.
        request.app[background_key].spawn(
            _reset_if_known(request.app, email_key_of(str(body.email))),
            name="password-reset-mail",
        )
    return json_response(ResetRequested(), status=202)


async def _reset_if_known(app: web.Application, email_key: str) -> None:
    user = await User.get_or_none(email_key=email_key)
    if user is not None and await _under_daily_cap(app, user):
        await _send_reset(app, user)


async def _under_daily_cap(app: web.Application, user: User) -> bool:
    redis = app[redis_key]
    key = f"{PASSWORD_RESETS_PREFIX}:{user.id}"
    return await count_today(redis, key) <= RESETS_PER_DAY


async def _send_reset(app: web.Application, user: User) -> None:
    settings = app[settings_key]
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
        app[mail_templates_key], "password_reset", context
    )
    async with in_transaction():
        reset = await EmailLink.create(
            purpose=LinkPurpose.RESET,
            user=user,
            token_hash=hash_secret(token),
            expires_at=expires_at,
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
    auth=False,
    responses=[
        Response(204, "Set; every session and token of the account is revoked"),
        Response(410, "The link is invalid, used or expired", ErrorBody),
        Response(422, "The new password is not acceptable", ErrorBody),
        Response(
            429, "Too many attempts from this client or with this link", ErrorBody
        ),
    ],
)
async def reset_password(
    request: web.Request, *, body: ResetRequest
) -> web.StreamResponse:
    """The link works once; the account's email counts as verified after it,
    and every sign-in limit of the account is lifted."""
    settings = request.app[settings_key]
    redis = request.app[redis_key]
    clock = request.app[clock_key]
    address = client_address(request, trust_forwarded=settings.trust_forwarded)
    # Every attempt counts, before any work: junk tokens cost a lookup each,
    # and many posts of one real token cannot all reach bcrypt.
    await reserve_or_refuse(
        redis,
        [
            reset_client_limit(
                address,
                max_attempts=settings.password_reset_max_per_client,
                window_s=settings.password_reset_window,
            ),
            reset_token_limit(
                body.token,
                max_attempts=settings.password_reset_max_per_token,
                window_s=settings.password_reset_window,
            ),
        ],
        "Too many password reset attempts",
        now=clock.now(),
    )
    # The token is checked before bcrypt: an invalid, used or expired one
    # costs one indexed lookup, not a hash. The claim below decides races.
    if not await EmailLink.exists(
        purpose=LinkPurpose.RESET,
        token_hash=hash_secret(body.token),
        used_at=None,
        expires_at__gt=utcnow(),
    ):
        raise Gone(INVALID_LINK)
    password_hash = await request.app[passwords_key].hash(body.password)
    now = utcnow()
    async with in_transaction():
        # Claimed by a conditional update: two uses of one link, one wins.
        claimed = await EmailLink.filter(
            purpose=LinkPurpose.RESET,
            token_hash=hash_secret(body.token),
            used_at=None,
            expires_at__gt=now,
        ).update(used_at=now)
        if not claimed:
            raise Gone(INVALID_LINK)
        [user_id] = await EmailLink.filter(
            purpose=LinkPurpose.RESET, token_hash=hash_secret(body.token)
        ).values_list("user_id", flat=True)
        # The user row alone: Postgres refuses to lock a join's outer side.
        user = await User.select_for_update().get(id=user_id)
        user.password_hash = password_hash
        proven = prove_address(user, now, takeover=True)
        await user.save(update_fields=["password_hash", *proven])
        revoked = [
            str(token_id)
            for token_id in await live_tokens(now)
            .filter(user_id=user.id)
            .values_list("id", flat=True)
        ]
        await ApiToken.filter(id__in=revoked).update(revoked_at=now)
        # Other links of the account stop working too, and an address change
        # whoever held the account asked for (its link went to their address).
        await EmailLink.filter(
            purpose=LinkPurpose.RESET, user_id=user.id, used_at=None
        ).update(used_at=now)
        await EmailLink.filter(
            purpose=LinkPurpose.VERIFY,
            user_id=user.id,
            used_at=None,
            email__isnull=False,
        ).delete()
    # The owner proved control of the address: whatever was guessed before,
    # the new password works at once, from anywhere.
    windows = (settings.signin_global_failure_window, settings.signin_failure_window)
    await lift(redis, user.email_key, now=clock.now(), keep_s=max(windows) + 1)
    for token_id in revoked:
        await revoked_everywhere(request.app, token_id)
    log.info("password reset for user %s; %d tokens revoked", user.id, len(revoked))
    return web.Response(status=204)
