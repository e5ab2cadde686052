"""Email verification: the emailed link, resending it, the landing page."""

from __future__ import annotations

import logging
import secrets
import uuid
from datetime import datetime, timedelta

import aiohttp_jinja2
from aiohttp import web
from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from sdapi.contract.names import VERIFY_RESEND_PREFIX as RESEND_KEY_PREFIX
from sdapi.db.models import EmailLink, LinkPurpose, email_key_of, utcnow
from sdapi.db.models import User as UserRow
from sdapi.db.outbox import queue_email, render_email
from web.appkeys import mail_templates_key, redis_key, settings_key
from web.auth import Principal, check_csrf
from web.errors import (
    AppError,
    Conflict,
    Gone,
    NotFound,
    RateLimited,
    Unauthorized,
    ValidationFailed,
)
from web.openapi import (
    ApiRoutes,
    ErrorBody,
    Response,
    json_response,
)
from web.schemas.accounts import (
    ResendRequest,
    UserView,
    VerificationSent,
    VerifyQuery,
    VerifyResponse,
)
from web.settings import WebSettings
from web.throttle import (
    client_address,
    count_today,
    reserve_or_refuse,
    signup_limit,
)
from web.token_cache import announce_user_changed
from web.tokens import hash_secret

log = logging.getLogger(__name__)

routes = ApiRoutes(tags=["accounts"])

VERIFY_PATH = "/api/v1/auth/verify"
ADDRESS_TAKEN = (
    "This email address belongs to another account now; sign in to that one, "
    "or change your address to another."
)


async def send_verification(
    request: web.Request, user: UserRow, now: datetime, *, email: str | None = None
) -> datetime:
    """A new verification link for `user`'s address (or the new address
    `email`), emailed through the outbox; returns when it expires. Call it
    inside the transaction that makes it true."""
    settings = request.app[settings_key]
    token = secrets.token_urlsafe(32)
    expires_at = now + timedelta(seconds=settings.verify_ttl)
    verification = await EmailLink.create(
        purpose=LinkPurpose.VERIFY,
        user=user,
        token_hash=hash_secret(token),
        expires_at=expires_at,
        email=email,
    )
    to_address = email or user.email
    link = f"{settings.base_url}{VERIFY_PATH}?token={token}"
    # No user-chosen text (the name) in mail to an address not yet proven:
    # anyone can sign up with anyone's address.
    text_body, html_body = render_email(
        request.app[mail_templates_key],
        "verify_email",
        {"email": to_address, "link": link, "expires": f"{expires_at:%Y-%m-%d %H:%M}"},
    )
    await queue_email(
        dedupe_key=f"verify:{verification.id}",
        to_address=to_address,
        subject="Verify your email address for sdapi",
        text_body=text_body,
        html_body=html_body,
    )
    return expires_at


def prove_address(user: UserRow, now: datetime, *, takeover: bool) -> list[str]:
    """Mark `user`'s address proven (a no-op once it is); returns the fields
    changed, for the caller's save.

    Until the first proof, anyone could have signed up with the address and
    chosen the name, which mail to the address shows from then on: it goes.
    A takeover (a password reset: the address's owner replaces the unknown
    signer-up's credentials) also drops premium time, which only an operator
    can have granted an unverified account, maybe to a squatter."""
    if user.email_verified_at is not None:
        return []
    user.email_verified_at = now
    user.name = None
    changed = ["email_verified_at", "name"]
    if takeover:
        user.premium_until = None
        changed.append("premium_until")
    return changed


@routes.route(
    "POST",
    VERIFY_PATH + "/resend",
    summary="Send the verification email again",
    auth="optional",
    responses=[
        Response(202, "A new verification email is on its way", VerificationSent),
        Response(409, "The email address is already verified", ErrorBody),
        Response(
            429, "One was sent less than a minute ago (see Retry-After)", ErrorBody
        ),
    ],
)
async def resend_verification(
    request: web.Request,
    *,
    principal: Principal | None,
    body: ResendRequest | None,
) -> web.StreamResponse:
    """Signed in: emails a new link to the account's address (409 once
    verified, 429 within a minute of the last). With `{"email"}` and no
    credentials: 202 whether or not the address has an unverified account, so
    nobody learns which addresses have one. Links sent before keep working;
    an address gets at most `verify_resend_per_day` of them a day."""
    body = body or ResendRequest()
    if principal is None:
        if body.email is None:
            raise Unauthorized()
        await _resend_quietly(request, body.email)
        return json_response(VerificationSent(), status=202)
    if principal.via == "session":
        await check_csrf(request)
    user = principal.user
    if user.email_verified_at is not None:
        raise Conflict("Your email address is already verified.")
    wait = await resend_wait(request, user)
    if wait is not None:
        raise RateLimited(
            f"A verification email was sent a moment ago, or today's are used up; "
            f"you can ask for another in {wait} seconds.",
            retry_after=wait,
        )
    expires_at = await _resend(request, user)
    return json_response(
        VerificationSent(email=user.email, expires_at=expires_at), status=202
    )


async def resend_wait(request: web.Request, user: UserRow) -> int | None:
    """Seconds to wait before `user` may get another link; None: send now
    (counted as sent)."""
    settings = request.app[settings_key]
    redis = request.app[redis_key]
    key = f"{RESEND_KEY_PREFIX}:{user.id}"
    daily = f"{RESEND_KEY_PREFIX}:day:{user.id}"
    if not await redis.set(key, b"1", nx=True, ex=settings.verify_resend_interval):
        return max(1, int(await redis.ttl(key)))
    if await count_today(redis, daily) > settings.verify_resend_per_day:
        return max(1, int(await redis.ttl(daily)))
    return None


async def _resend(request: web.Request, user: UserRow) -> datetime:
    now = utcnow()
    try:
        async with in_transaction():
            expires_at = await send_verification(request, user, now)
    except Exception:
        # Nothing was sent: do not make the user wait for it.
        await request.app[redis_key].delete(f"{RESEND_KEY_PREFIX}:{user.id}")
        raise
    log.info("verification email re-sent for user %s", user.id)
    return expires_at


async def _resend_quietly(request: web.Request, email: str) -> None:
    """Send a new link if `email` has an unverified account and may get one."""
    settings = request.app[settings_key]
    address = client_address(request, trust_forwarded=settings.trust_forwarded)
    # Counted with sign-ups: each may send an email to any address.
    by_client = signup_limit(
        address,
        max_signups=settings.signup_max_per_client,
        window_s=settings.signup_window,
    )
    await reserve_or_refuse(
        request.app[redis_key], [by_client], "Too many requests from your address"
    )
    user = await UserRow.get_or_none(email_key=email_key_of(email))
    if user is None or user.email_verified_at is not None:
        return
    if await resend_wait(request, user) is None:
        await _resend(request, user)


def prefers_json(request: web.Request) -> bool:
    """Whether the Accept header ranks application/json at least as high as HTML."""
    weights: dict[str, float] = {}
    for item in request.headers.get("Accept", "").split(","):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        weights[media.lower()] = max(weights.get(media.lower(), 0.0), quality)
    json_weight = weights.get("application/json", 0.0)
    return json_weight > 0 and json_weight >= weights.get("text/html", 0.0)


async def _use_verification(
    token: str, now: datetime
) -> tuple[UserRow, uuid.UUID | None]:
    """The verified user, and the unproven account it took the address from."""
    async with in_transaction():
        # Locked: two clicks at once verify once; the second sees it used.
        verification = await EmailLink.select_for_update().get_or_none(
            purpose=LinkPurpose.VERIFY, token_hash=hash_secret(token)
        )
        if verification is None:
            raise NotFound(
                "This verification link is not valid: open the complete link "
                "from the email."
            )
        if verification.used_at is not None:
            raise Conflict(
                "This verification link has already been used; the email address "
                "is verified."
            )
        if verification.expires_at <= now:
            raise Gone("This verification link has expired.")
        verification.used_at = now
        await verification.save(update_fields=["used_at"])
        # The user row alone: Postgres refuses to lock a join's outer side.
        user = await UserRow.select_for_update().get(id=verification.user_id)  # type: ignore[attr-defined]
        changed: list[str] = []
        squatter: uuid.UUID | None = None
        if verification.email is not None and verification.email != user.email:
            squatter = await _move_address(user, verification.email)
            changed += ["email", "email_key"]
        changed += prove_address(user, now, takeover=False)
        if changed:
            try:
                await user.save(update_fields=changed)
            except IntegrityError:
                raise Conflict(ADDRESS_TAKEN) from None
        return user, squatter


async def _move_address(user: UserRow, email: str) -> uuid.UUID | None:
    """Give `user` the address `email` its link just proved; the id of the
    unproven account that held it (now deleted), if any."""
    email_key = email_key_of(email)
    squatter: uuid.UUID | None = None
    if email_key != user.email_key:
        holder = await UserRow.get_or_none(email_key=email_key)
        if holder is not None:
            if holder.email_verified_at is not None:
                raise Conflict(ADDRESS_TAKEN)
            # Proven here, never proven there: as at a sign-up's takeover, an
            # account anyone could have made does not keep the owner out.
            await UserRow.filter(id=holder.id, email_verified_at=None).delete()
            squatter = holder.id
    # The old address's links, and other changes asked for, prove nothing now.
    await EmailLink.filter(
        purpose=LinkPurpose.VERIFY, user_id=user.id, used_at=None
    ).delete()
    user.email = email
    user.email_key = email_key
    return squatter


async def _verify_error_page(
    request: web.Request, exc: AppError
) -> web.StreamResponse | None:
    """A failed verification as a page for a browser; JSON clients get the
    error in the usual format."""
    if prefers_json(request):
        return None
    message = exc.message
    if isinstance(exc, ValidationFailed):
        message = "This verification link is incomplete: open the complete link "
        message += "from the email."
    settings = request.app[settings_key]
    return _verify_page(request, settings, ok=False, message=message, exc=exc)


@routes.route(
    "GET",
    VERIFY_PATH,
    summary="Verify an email address (the link in the email)",
    auth=False,
    on_error=_verify_error_page,
    pages=True,
    responses=[
        Response(
            200,
            "Verified: an HTML page, or JSON with `Accept: application/json`",
            VerifyResponse,
        ),
        Response(404, "Unknown token", ErrorBody),
        Response(409, "The link was already used", ErrorBody),
        Response(410, "The link has expired", ErrorBody),
    ],
)
async def verify_email(
    request: web.Request, *, query: VerifyQuery
) -> web.StreamResponse:
    """Marks the address verified. Browsers get a page; API clients that send
    `Accept: application/json` get JSON (and errors in the usual format)."""
    settings = request.app[settings_key]
    now = utcnow()
    user, squatter = await _use_verification(query.token, now)
    # The deleted squatter's tokens too: no replica may serve them from cache.
    for changed in (user.id, squatter):
        if changed is not None:
            await announce_user_changed(request.app, changed)
    if prefers_json(request):
        return json_response(VerifyResponse(user=UserView.of(user, now)))
    return _verify_page(
        request,
        settings,
        ok=True,
        message="Thank you: your email address is verified.",
        email=user.email,
    )


_PAGE_TITLES = {
    404: "Invalid verification link",
    409: "Link already used",
    410: "Verification link expired",
    422: "Incomplete verification link",
}


def _verify_page(
    request: web.Request,
    settings: WebSettings,
    *,
    ok: bool,
    message: str,
    exc: AppError | None = None,
    email: str | None = None,
) -> web.Response:
    return aiohttp_jinja2.render_template(
        "verify.html.j2",
        request,
        {
            "ok": ok,
            "title": "Email address verified"
            if ok
            else _PAGE_TITLES.get(exc.status if exc else 0, "Verification failed"),
            "message": message,
            "email": email,
            "base_url": settings.base_url,
        },
        status=exc.status if exc is not None else 200,
    )
