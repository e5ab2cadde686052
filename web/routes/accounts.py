"""Accounts: sign-up, email verification, sign-in and -out, `/me`, premium codes."""

from __future__ import annotations

import logging
import secrets
import uuid
from datetime import datetime

from aiohttp import web
from aiohttp_session import get_session, new_session
from redis.asyncio import Redis
from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from sdapi.contract.names import SIGNUP_NOTICES_PREFIX as SIGNUP_NOTICE_PREFIX
from sdapi.contract.status import Tier
from sdapi.db.models import (
    ApiToken,
    EmailLink,
    LinkPurpose,
    PremiumCode,
    TokenKind,
    email_key_of,
    utcnow,
)
from sdapi.db.models import User as UserRow
from sdapi.db.outbox import queue_email, render_email
from sdapi.db.premium import add_premium_days, canonical_code, code_hash
from web.appkeys import (
    clock_key,
    mail_templates_key,
    passwords_key,
    redis_key,
    settings_key,
)
from web.auth import Principal
from web.devices import (
    DEVICE_COOKIE,
    Device,
    device_cookie_value,
    new_device,
    read_device,
    set_device_cookie,
)
from web.errors import (
    Conflict,
    EmailNotVerified,
    NotFound,
    RateLimited,
    Unauthorized,
)
from web.openapi import (
    ApiRoutes,
    ErrorBody,
    Response,
    json_response,
)
from web.quota import usage
from web.routes.verification import resend_wait, send_verification
from web.schemas.accounts import (
    Me,
    MeUpdate,
    Quota,
    RedeemRequest,
    SigninRequest,
    SigninResponse,
    SignupRequest,
    SignupResponse,
    UserView,
)
from web.sessions import SESSION_COOKIE, delete_session
from web.settings import WebSettings
from web.throttle import (
    Backoff,
    Limit,
    clear,
    client_address,
    client_email_limit,
    client_limit,
    count_today,
    device_limit,
    email_limit,
    release,
    reserve_or_refuse,
    signup_limit,
)
from web.token_cache import announce_user_changed, revoked_everywhere
from web.tokens import issue_token, revoke_token

log = logging.getLogger(__name__)

routes = ApiRoutes(tags=["accounts"])

# Emails one address may get a day saying someone tried to sign up with it.
SIGNUP_NOTICES_PER_DAY = 3
WRONG_CREDENTIALS = "Wrong email or password."
UNKNOWN_CODE = "This premium code does not exist; check how it is typed."
USED_CODE = "This premium code has already been redeemed."


def _abandoned(user: UserRow, after_s: int) -> bool:
    """An unverified account old enough for a new sign-up to take its address."""
    return (
        user.email_verified_at is None
        and (utcnow() - user.created_at).total_seconds() > after_s
    )


# --- sign-up and verification ---------------------------------------------


@routes.route(
    "POST",
    "/api/v1/auth/signup",
    summary="Create an account",
    auth=False,
    responses=[
        Response(
            201,
            "Created; a verification email is on its way. The same answer when "
            "the address already has an account: its owner is emailed instead",
            SignupResponse,
        ),
        Response(
            429, "Too many sign-ups from this address (see Retry-After)", ErrorBody
        ),
    ],
)
async def signup(request: web.Request, *, body: SignupRequest) -> web.StreamResponse:
    """Creates the account and emails a link that verifies the address. An
    address that already has an account gets the same answer (nobody learns
    which addresses have one); its owner is told by email instead."""
    settings = request.app[settings_key]
    address = client_address(request, trust_forwarded=settings.trust_forwarded)
    by_client = signup_limit(
        address,
        max_signups=settings.signup_max_per_client,
        window_s=settings.signup_window,
    )
    # Every attempt counts, taken emails included: no bcrypt, email or probing
    # of which addresses have accounts beyond the limit.
    await reserve_or_refuse(
        request.app[redis_key], [by_client], "Too many sign-ups from your address"
    )
    email = str(body.email)
    email_key = email_key_of(email)
    # Hashed whether or not the address is free: the answer's time would
    # otherwise tell a taken address by its missing bcrypt. What is left to
    # differ (a few inserts against one) is well inside bcrypt's own jitter,
    # and the per-client limit above allows too few tries to average it out.
    password_hash = await request.app[passwords_key].hash(body.password)
    now = utcnow()
    holder = await UserRow.get_or_none(email_key=email_key)
    if holder is not None and _abandoned(holder, settings.unverified_takeover_after):
        # Signed up with this address and never proved it: anyone may have
        # done that with anyone's address, so it does not keep the owner out.
        if await UserRow.filter(id=holder.id, email_verified_at=None).delete():
            # Its tokens went with it: no replica may serve them from cache.
            await announce_user_changed(request.app, holder.id)
        holder = None
    if holder is None:
        try:
            # The user, its verification and the email exist together or not
            # at all.
            async with in_transaction():
                user = await UserRow.create(
                    email=email,
                    email_key=email_key,
                    name=body.name,
                    password_hash=password_hash,
                )
                await send_verification(request, user, now)
            return json_response(
                SignupResponse(user=UserView.of(user, now)), status=201
            )
        except IntegrityError:
            # A concurrent sign-up of the address won: the unique index decides.
            holder = await UserRow.get_or_none(email_key=email_key)
    if holder is not None:
        await _tell_owner(request, holder)
    return json_response(SignupResponse(user=_stand_in(body, email, now)), status=201)


def _stand_in(body: SignupRequest, email: str, now: datetime) -> UserView:
    """What a new account would look like, for an address that has one: it
    says nothing of the real account (not its id, name, tier or age)."""
    return UserView(
        id=uuid.uuid4(),
        email=email,
        name=body.name,
        tier=Tier.NORMAL,
        premium_until=None,
        email_verified=False,
        created_at=now,
    )


async def _tell_owner(request: web.Request, holder: UserRow) -> None:
    """Email the address's owner that someone tried to sign up with it, at
    most `SIGNUP_NOTICES_PER_DAY` times a day, whoever keeps trying."""
    redis = request.app[redis_key]
    key = f"{SIGNUP_NOTICE_PREFIX}:{holder.email_key}"
    if await count_today(redis, key) > SIGNUP_NOTICES_PER_DAY:
        return
    base = request.app[settings_key].base_url
    # Nothing the person signing up chose (the name) goes into this mail:
    # it would let anyone write to any address through us.
    context = {
        "email": holder.email,
        "signin": f"{base}/signin",
        "forgot": f"{base}/forgot-password",
    }
    text_body, html_body = render_email(
        request.app[mail_templates_key], "signup_attempt", context
    )
    await queue_email(
        dedupe_key=f"signup-attempt:{holder.id}:{uuid.uuid4()}",
        to_address=holder.email,
        subject="Someone tried to sign up for sdapi with your address",
        text_body=text_body,
        html_body=html_body,
    )
    log.info("told user %s of a sign-up attempt with their address", holder.id)


# --- sign-in and sign-out --------------------------------------------------


@routes.route(
    "POST",
    "/api/v1/auth/signin",
    summary="Sign in: get a bearer token",
    auth=False,
    responses=[
        Response(200, "Signed in", SigninResponse),
        Response(401, "Wrong email or password", ErrorBody),
        Response(429, "Too many failed sign-ins (see Retry-After)", ErrorBody),
    ],
)
async def signin(request: web.Request, *, body: SigninRequest) -> web.StreamResponse:
    """Returns a bearer token. With `session: true` it also starts a playground
    session (HttpOnly cookie), returns its CSRF token, and the token returned
    is the session's own: signing out with either ends both. Every sign-in
    also sets a device cookie: the browser's later sign-ins to the account
    are counted on their own (docs/SIGN_IN.md)."""
    settings = request.app[settings_key]
    redis = request.app[redis_key]
    passwords = request.app[passwords_key]
    now = request.app[clock_key].now()
    email_key = email_key_of(str(body.email))
    device = read_device(
        request.cookies.get(DEVICE_COOKIE),
        secret_key=settings.secret(),
        email_key=email_key,
        now=now,
    )
    user: UserRow | None = None
    if device is not None:
        # A signed cookie of an account since replaced (a squat taken over)
        # is no longer that account's device.
        user = await UserRow.get_or_none(email_key=email_key)
        if user is None or user.id != device.user_id:
            device = None
    limits, to_release, to_clear = _signin_limits(request, settings, email_key, device)
    # Counted as a failure before the password is looked at, atomically: of
    # many concurrent guesses only as many as the limits allow are checked;
    # the rest learn nothing and cost no bcrypt.
    attempt = await reserve_or_refuse(
        redis, limits, "Too many failed sign-ins", now=now, email_key=email_key
    )
    try:
        if device is None:
            user = await UserRow.get_or_none(email_key=email_key)
        ok = await passwords.verify(
            body.password, user.password_hash if user is not None else None
        )
    except Exception:
        # Not a wrong guess (the database failed, say): give the attempt back.
        await release(redis, attempt, limits)
        raise
    if user is None or not ok:
        raise Unauthorized(WRONG_CREDENTIALS)  # the attempt stays counted
    await release(redis, attempt, to_release)
    for limit in to_clear:
        await clear(redis, limit)

    if passwords.needs_rehash(user.password_hash):
        upgraded = await passwords.hash(body.password)
        await UserRow.filter(id=user.id).update(password_hash=upgraded)

    csrf_token = None
    if body.session:
        secret, token, csrf_token = await _start_session(request, user, settings)
    else:
        secret, token = await issue_token(
            user, kind=TokenKind.BEARER, ttl_s=settings.token_ttl
        )
    response = json_response(
        SigninResponse(
            token=secret,
            expires_at=token.expires_at,
            user=UserView.of(user, utcnow()),
            csrf_token=csrf_token,
        )
    )
    # The same device keeps its id (and its count); its expiry moves on.
    known = device or new_device(user.id)
    set_device_cookie(
        response,
        device_cookie_value(
            settings.secret(),
            email_key,
            known,
            int(now) + settings.signin_device_ttl,
        ),
        max_age=settings.signin_device_ttl,
        secure=settings.secure_cookies,
    )
    return response


def _signin_limits(
    request: web.Request,
    settings: WebSettings,
    email_key: str,
    device: Device | None,
) -> tuple[list[Limit], list[Limit], list[Limit]]:
    """The limits a sign-in counts against; those a success releases its
    attempt from, and those it clears."""
    if device is not None:
        # A browser that signed in before is counted on its own: nothing a
        # guesser elsewhere does holds it back, and it cannot guess for long.
        by_device = device_limit(
            device.device_id,
            max_failures=settings.signin_max_failures_per_email,
            window_s=settings.signin_failure_window,
        )
        return [by_device], [], [by_device]
    address = client_address(request, trust_forwarded=settings.trust_forwarded)
    # OWASP's layers: one client guessing one account is stopped soon, one
    # client guessing many a little later, and many clients guessing one
    # account are only slowed down (short, growing delays), so nobody
    # elsewhere can lock its owner out.
    by_pair = client_email_limit(
        address,
        email_key,
        max_failures=settings.signin_max_failures_per_email,
        window_s=settings.signin_failure_window,
    )
    by_client = client_limit(
        address,
        max_failures=settings.signin_max_failures_per_client,
        window_s=settings.signin_failure_window,
    )
    by_email = email_limit(
        email_key,
        free_failures=settings.signin_max_failures_per_email_global,
        window_s=settings.signin_global_failure_window,
        backoff=Backoff(
            delay_s=settings.signin_backoff_delay, cap_s=settings.signin_backoff_cap
        ),
    )
    return [by_pair, by_client, by_email], [by_client, by_email], [by_pair]


async def _start_session(
    request: web.Request, user: UserRow, settings: WebSettings
) -> tuple[str, ApiToken, str]:
    """A brand-new session for `user`: its token's secret, the token, and its
    CSRF token. The secret also works as a bearer token (one credential).

    Never reuse the identity the browser came with (session fixation): the old
    session, if any, is deleted server-side and its token revoked.
    """
    redis = request.app[redis_key]
    old = await get_session(request)
    if old.identity is not None:
        await _end_session(redis, str(old.identity), old.get("token_id"))
    session = await new_session(request)
    secret, token = await issue_token(
        user, kind=TokenKind.SESSION, ttl_s=settings.session_ttl
    )
    csrf_token = secrets.token_urlsafe(32)
    session["token_id"] = str(token.id)
    session["csrf"] = csrf_token
    return secret, token, csrf_token


async def _end_session(redis: Redis, session_id: str, token_id: object) -> None:
    await delete_session(redis, session_id)
    if isinstance(token_id, str):
        await revoke_token(token_id, kind=TokenKind.SESSION)


@routes.route(
    "POST",
    "/api/v1/auth/signout",
    summary="Sign out: the token (or session) stops working at once",
    responses=[Response(204, "Signed out")],
)
async def signout(request: web.Request, *, principal: Principal) -> web.StreamResponse:
    """Revokes the bearer token used, or ends the cookie session server-side.
    A session and the token its sign-in returned are one credential: either
    way, both stop working."""
    await revoke_token(principal.token.id)
    await revoked_everywhere(request.app, principal.token.id)
    response = web.Response(status=204)
    if principal.via == "session":
        session = await get_session(request)
        if session.identity is not None:
            await delete_session(request.app[redis_key], str(session.identity))
        response.del_cookie(SESSION_COOKIE, path="/")
    return response


# --- the caller's account --------------------------------------------------


@routes.route(
    "GET",
    "/api/v1/me",
    summary="The caller's account and quota",
    responses=[Response(200, "The account with its quota", Me)],
)
async def me(request: web.Request, *, principal: Principal) -> web.StreamResponse:
    """The account, its tier, and what the tier allows today."""
    return json_response(await _me_view(request, principal.user))


@routes.route(
    "PATCH",
    "/api/v1/me",
    summary="Change your name or email address",
    responses=[
        Response(200, "The account as it is now", Me),
        Response(
            429,
            "A verification email was sent a moment ago, or today's are used up "
            "(see Retry-After)",
            ErrorBody,
        ),
    ],
)
async def update_me(
    request: web.Request, *, principal: Principal, body: MeUpdate
) -> web.StreamResponse:
    """Only the fields sent change. A new `email` is sent a verification link
    and becomes the account's address when the link is opened (shown as
    `pending_email` until then); until then the old address keeps working."""
    user = principal.user
    # The address first: a change refused (429) leaves the name as it was too.
    if body.email is not None:
        await _change_address(request, user, str(body.email))
    if "name" in body.model_fields_set:
        await UserRow.filter(id=user.id).update(name=body.name)
        user.name = body.name
    return json_response(await _me_view(request, user))


async def _change_address(request: web.Request, user: UserRow, email: str) -> None:
    """Start moving `user` to `email`.

    The address changes only once the new one is proven, not at once with the
    account unverified meanwhile: a typo, or someone holding a session for a
    moment, would otherwise lock the owner out of their own mail (sign-in,
    password resets, emailed images) and hand the account to an address
    nobody has proven. The old address keeps working until the link is
    opened, and nothing here says whether the new one has an account (that is
    checked when the link is opened, by whoever controls it)."""
    if email == user.email:
        return
    if email_key_of(email) == user.email_key:
        # Another spelling of the same address (case): nothing to prove.
        await UserRow.filter(id=user.id).update(email=email)
        user.email = email
        return
    # The same allowance as resent links: each change mails any address.
    wait = await resend_wait(request, user)
    if wait is not None:
        raise RateLimited(
            f"A verification email was sent a moment ago, or today's are used "
            f"up; you can change your address again in {wait} seconds.",
            retry_after=wait,
        )
    async with in_transaction():
        # One change at a time: an earlier one's link stops working.
        await EmailLink.filter(
            purpose=LinkPurpose.VERIFY,
            user_id=user.id,
            used_at=None,
            email__isnull=False,
        ).delete()
        await send_verification(request, user, utcnow(), email=email)
    log.info("user %s asked to change their email address", user.id)


async def _me_view(request: web.Request, user: UserRow) -> Me:
    settings = request.app[settings_key]
    now = utcnow()
    used = await usage(user, now)
    quota = Quota.of(
        settings.limits(user.tier_at(now)),
        images_today=used.images_today,
        in_flight=used.in_flight,
    )
    pending = (
        await EmailLink.filter(
            purpose=LinkPurpose.VERIFY,
            user_id=user.id,
            used_at=None,
            expires_at__gt=now,
            email__isnull=False,
        )
        .order_by("-created_at")
        .first()
    )
    return Me(
        **UserView.of(user, now).model_dump(),
        quota=quota,
        pending_email=pending.email if pending is not None else None,
    )


@routes.route(
    "POST",
    "/api/v1/premium/redeem",
    summary="Redeem a premium code",
    responses=[
        Response(200, "Premium time added", UserView),
        Response(404, "Unknown code", ErrorBody),
        Response(409, "The code was already redeemed", ErrorBody),
    ],
    tags=["premium"],
)
async def redeem_code(
    request: web.Request, *, principal: Principal, body: RedeemRequest
) -> web.StreamResponse:
    """Adds the code's days to any premium time left. Each code works once.
    Needs a verified email address: an account anyone could have made with
    someone else's address gets nothing that costs."""
    if principal.user.email_verified_at is None:
        raise EmailNotVerified(
            "Verify your email address before redeeming a premium code."
        )
    canonical = canonical_code(body.code)
    if canonical is None:
        raise NotFound(UNKNOWN_CODE)
    now = utcnow()
    async with in_transaction():
        # The code row is locked: of two concurrent redeems, the second waits
        # here and then sees it redeemed.
        code = await PremiumCode.select_for_update().get_or_none(
            code_hash=code_hash(canonical)
        )
        if code is None:
            raise NotFound(UNKNOWN_CODE)
        if code.redeemed_at is not None:
            raise Conflict(USED_CODE)
        user = await add_premium_days(principal.user.id, code.days, now)
        code.redeemed_by = user
        code.redeemed_at = now
        await code.save(update_fields=["redeemed_by_id", "redeemed_at"])
    await announce_user_changed(request.app, user.id)
    log.info("user %s redeemed a %d-day premium code", user.id, code.days)
    return json_response(UserView.of(user, now))
