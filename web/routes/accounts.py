"""Accounts: sign-up, email verification, sign-in and -out, `/me`, premium codes."""

from __future__ import annotations

import logging
import secrets
from datetime import datetime, timedelta

import aiohttp_jinja2
from aiohttp import web
from aiohttp_session import get_session, new_session
from redis.asyncio import Redis
from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from web.appkeys import passwords_key, redis_key, settings_key
from web.auth import authenticate, check_csrf, require_user
from web.errors import (
    AppError,
    Conflict,
    EmailNotVerified,
    Gone,
    NotFound,
    RateLimited,
    Unauthorized,
    ValidationFailed,
)
from web.mail_outbox import queue_email
from web.models import ApiToken, EmailVerification, PremiumCode, TokenKind, utcnow
from web.models import User as UserRow
from web.openapi import (
    ApiRoutes,
    ErrorBody,
    Response,
    json_response,
    read_body,
    read_query,
)
from web.premium import add_premium_days, canonical_code, code_hash
from web.quota import usage
from web.schemas.accounts import (
    Me,
    Quota,
    RedeemRequest,
    ResendRequest,
    SigninRequest,
    SigninResponse,
    SignupRequest,
    SignupResponse,
    User,
    VerificationSent,
    VerifyQuery,
    VerifyResponse,
)
from web.sessions import SESSION_COOKIE, delete_session
from web.settings import WebSettings
from web.throttle import (
    Limit,
    Reservation,
    clear,
    client_address,
    client_email_limit,
    client_limit,
    email_limit,
    release,
    reserve,
    signup_limit,
)
from web.tokens import announce_revoked, hash_secret, issue_token, revoke_token

log = logging.getLogger(__name__)

routes = ApiRoutes(tags=["accounts"])

VERIFY_PATH = "/api/v1/auth/verify"
# One key per user while a re-sent verification email holds back the next.
RESEND_KEY_PREFIX = "sdapi:verify-resend"
EMAIL_TAKEN = (
    "An account with this email address already exists. If it is yours, sign "
    "in, or set a new password with POST /api/v1/auth/password/forgot."
)
WRONG_CREDENTIALS = "Wrong email or password."
UNKNOWN_CODE = "This premium code does not exist; check how it is typed."
USED_CODE = "This premium code has already been redeemed."


def _email_key(email: str) -> str:
    return email.lower()


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
    body=SignupRequest,
    auth=False,
    responses=[
        Response(201, "Created; a verification email is on its way", SignupResponse),
        Response(409, "An account with this email exists", ErrorBody),
        Response(
            429, "Too many sign-ups from this address (see Retry-After)", ErrorBody
        ),
    ],
)
async def signup(request: web.Request) -> web.StreamResponse:
    """Creates the account and emails a link that verifies the address."""
    settings = request.app[settings_key]
    body = await read_body(request, SignupRequest)
    address = client_address(request, trust_forwarded=settings.trust_forwarded)
    by_client = signup_limit(
        address,
        max_signups=settings.signup_max_per_client,
        window_s=settings.signup_window,
    )
    # Every attempt counts, taken emails included: no bcrypt, email or probing
    # of which addresses have accounts beyond the limit.
    await _reserve_or_refuse(
        request, [by_client], "Too many sign-ups from your address"
    )
    email = str(body.email)
    email_key = _email_key(email)
    # Checked first so a taken email costs no bcrypt; the unique index decides.
    holder = await UserRow.get_or_none(email_key=email_key)
    if holder is not None:
        if not _abandoned(holder, settings.unverified_takeover_after):
            raise Conflict(EMAIL_TAKEN)
        # Signed up with this address and never proved it: anyone may have
        # done that with anyone's address, so it does not keep the owner out.
        await UserRow.filter(id=holder.id, email_verified_at=None).delete()
    password_hash = await request.app[passwords_key].hash(body.password)
    now = utcnow()
    try:
        # The user, its verification and the email exist together or not at all.
        async with in_transaction():
            user = await UserRow.create(
                email=email,
                email_key=email_key,
                name=body.name,
                password_hash=password_hash,
            )
            await send_verification(request, user, now)
    except IntegrityError:
        raise Conflict(EMAIL_TAKEN) from None
    return json_response(SignupResponse(user=User.of(user, now)), status=201)


async def _reserve_or_refuse(
    request: web.Request, limits: list[Limit], what: str
) -> Reservation:
    """Count one attempt against `limits`, or 429 with Retry-After."""
    attempt = await reserve(request.app[redis_key], limits)
    if not attempt.granted:
        raise RateLimited(
            f"{what}; try again in {attempt.retry_after} seconds.",
            retry_after=attempt.retry_after,
        )
    return attempt


async def send_verification(
    request: web.Request, user: UserRow, now: datetime
) -> datetime:
    """A new verification link for `user`, emailed through the outbox; returns
    when it expires. Call it inside the transaction that makes it true."""
    settings = request.app[settings_key]
    token = secrets.token_urlsafe(32)
    expires_at = now + timedelta(seconds=settings.verify_ttl)
    verification = await EmailVerification.create(
        user=user, token_hash=hash_secret(token), expires_at=expires_at
    )
    link = f"{settings.base_url}{VERIFY_PATH}?token={token}"
    await queue_email(
        dedupe_key=f"verify:{verification.id}",
        to_address=user.email,
        subject="Verify your email address for sdapi",
        # No user-chosen text (the name) in mail to an address not yet proven:
        # anyone can sign up with anyone's address.
        text_body=_verification_text(user.email, link, expires_at),
        html_body=aiohttp_jinja2.render_string(
            "verify_email.html.j2",
            request,
            {
                "email": user.email,
                "link": link,
                "expires": f"{expires_at:%Y-%m-%d %H:%M}",
            },
        ),
    )
    return expires_at


def _verification_text(email: str, link: str, expires_at: datetime) -> str:
    return (
        "Hello,\n\n"
        f"Please confirm that {email} is your email address for sdapi by "
        f"opening this link:\n\n{link}\n\n"
        f"The link works until {expires_at:%Y-%m-%d %H:%M} (UTC). "
        "If you did not sign up, ignore this email.\n"
    )


@routes.route(
    "POST",
    VERIFY_PATH + "/resend",
    summary="Send the verification email again",
    body=ResendRequest,
    responses=[
        Response(202, "A new verification email is on its way", VerificationSent),
        Response(409, "The email address is already verified", ErrorBody),
        Response(
            429, "One was sent less than a minute ago (see Retry-After)", ErrorBody
        ),
    ],
)
async def resend_verification(request: web.Request) -> web.StreamResponse:
    """Signed in: emails a new link to the account's address (409 once
    verified, 429 within a minute of the last). With `{"email"}` and no
    credentials: 202 whether or not the address has an unverified account, so
    nobody learns which addresses have one. Links sent before keep working;
    an address gets at most `verify_resend_per_day` of them a day."""
    principal = await authenticate(request)
    body = (
        await read_body(request, ResendRequest)
        if request.can_read_body
        else ResendRequest()
    )
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
    wait = await _resend_refused(request, user)
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


async def _resend_refused(request: web.Request, user: UserRow) -> int | None:
    """Seconds to wait before `user` may get another link; None: send now."""
    settings = request.app[settings_key]
    redis = request.app[redis_key]
    key = f"{RESEND_KEY_PREFIX}:{user.id}"
    daily = f"{RESEND_KEY_PREFIX}:day:{user.id}"
    if not await redis.set(key, b"1", nx=True, ex=settings.verify_resend_interval):
        return max(1, int(await redis.ttl(key)))
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(daily)
        pipe.expire(daily, 86400, nx=True)
        sent_today, _ = await pipe.execute()
    if int(sent_today) > settings.verify_resend_per_day:
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
    await _reserve_or_refuse(
        request, [by_client], "Too many requests from your address"
    )
    user = await UserRow.get_or_none(email_key=_email_key(email))
    if user is None or user.email_verified_at is not None:
        return
    if await _resend_refused(request, user) is None:
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


async def _use_verification(token: str, now: datetime) -> UserRow:
    async with in_transaction():
        # Locked: two clicks at once verify once; the second sees it used.
        verification = await EmailVerification.select_for_update().get_or_none(
            token_hash=hash_secret(token)
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
        await UserRow.filter(id=verification.user_id, email_verified_at=None).update(  # type: ignore[attr-defined]
            email_verified_at=now
        )
        return await UserRow.get(id=verification.user_id)  # type: ignore[attr-defined]


@routes.route(
    "GET",
    VERIFY_PATH,
    summary="Verify an email address (the link in the email)",
    query=VerifyQuery,
    auth=False,
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
async def verify_email(request: web.Request) -> web.StreamResponse:
    """Marks the address verified. Browsers get a page; API clients that send
    `Accept: application/json` get JSON (and errors in the usual format)."""
    settings = request.app[settings_key]
    now = utcnow()
    wants_json = prefers_json(request)
    try:
        query = read_query(request, VerifyQuery)
        user = await _use_verification(query.token, now)
    except AppError as exc:
        if wants_json:
            raise
        message = exc.message
        if isinstance(exc, ValidationFailed):
            message = "This verification link is incomplete: open the complete link "
            message += "from the email."
        return _verify_page(request, settings, ok=False, message=message, exc=exc)
    if wants_json:
        return json_response(VerifyResponse(user=User.of(user, now)))
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


# --- sign-in and sign-out --------------------------------------------------


@routes.route(
    "POST",
    "/api/v1/auth/signin",
    summary="Sign in: get a bearer token",
    body=SigninRequest,
    auth=False,
    responses=[
        Response(200, "Signed in", SigninResponse),
        Response(401, "Wrong email or password", ErrorBody),
        Response(429, "Too many failed sign-ins (see Retry-After)", ErrorBody),
    ],
)
async def signin(request: web.Request) -> web.StreamResponse:
    """Returns a bearer token. With `session: true` it also starts a playground
    session (HttpOnly cookie), returns its CSRF token, and the token returned
    is the session's own: signing out with either ends both."""
    settings = request.app[settings_key]
    redis = request.app[redis_key]
    passwords = request.app[passwords_key]
    body = await read_body(request, SigninRequest)
    email_key = _email_key(str(body.email))
    address = client_address(request, trust_forwarded=settings.trust_forwarded)
    # OWASP's layers: one client guessing one account is stopped soon, one
    # client guessing many a little later, and many clients guessing one
    # account only slowly, so nobody elsewhere can lock its owner out for long.
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
        max_failures=settings.signin_max_failures_per_email_global,
        window_s=settings.signin_global_failure_window,
    )
    limits = [by_pair, by_client, by_email]
    # Counted as a failure before the password is looked at, atomically: of
    # many concurrent guesses only as many as the limits allow are checked;
    # the rest learn nothing and cost no bcrypt.
    attempt = await _reserve_or_refuse(request, limits, "Too many failed sign-ins")
    try:
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
    await release(redis, attempt, [by_client, by_email])
    await clear(redis, by_pair)

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
    return json_response(
        SigninResponse(
            token=secret,
            expires_at=token.expires_at,
            user=User.of(user, utcnow()),
            csrf_token=csrf_token,
        )
    )


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
async def signout(request: web.Request) -> web.StreamResponse:
    """Revokes the bearer token used, or ends the cookie session server-side.
    A session and the token its sign-in returned are one credential: either
    way, both stop working."""
    principal = await require_user(request)
    await revoke_token(principal.token.id)
    await announce_revoked(request.app[redis_key], principal.token.id)
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
async def me(request: web.Request) -> web.StreamResponse:
    """The account, its tier, and what the tier allows today."""
    principal = await require_user(request)
    settings = request.app[settings_key]
    now = utcnow()
    user = principal.user
    used = await usage(user, now)
    quota = Quota.of(
        settings.limits(user.tier_at(now)),
        images_today=used.images_today,
        in_flight=used.in_flight,
    )
    return json_response(Me(**User.of(user, now).model_dump(), quota=quota))


@routes.route(
    "POST",
    "/api/v1/premium/redeem",
    summary="Redeem a premium code",
    body=RedeemRequest,
    responses=[
        Response(200, "Premium time added", User),
        Response(404, "Unknown code", ErrorBody),
        Response(409, "The code was already redeemed", ErrorBody),
    ],
    tags=["premium"],
)
async def redeem_code(request: web.Request) -> web.StreamResponse:
    """Adds the code's days to any premium time left. Each code works once.
    Needs a verified email address: an account anyone could have made with
    someone else's address gets nothing that costs."""
    principal = await require_user(request)
    if principal.user.email_verified_at is None:
        raise EmailNotVerified(
            "Verify your email address before redeeming a premium code."
        )
    body = await read_body(request, RedeemRequest)
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
    log.info("user %s redeemed a %d-day premium code", user.id, code.days)
    return json_response(User.of(user, now))
