"""Attacker text in our emails, and resends that cannot be repeated forever."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import timedelta
from typing import Any

from aiohttp.test_utils import TestClient
from tortoise.transactions import in_transaction

from sdapi.db.models import (
    EmailLink,
    Generation,
    LinkPurpose,
    OutboxEmail,
    User,
    utcnow,
)
from sdapi.devtools.accounts import auth, make_user
from tests.node_double import NodeDouble
from tests.web.accounts_support import (
    JSON,
    LINK,
    ME,
    PASSWORD,
    RESEND,
    SIGNIN,
    SIGNUP,
    VERIFY,
    error_of,
    signin,
    signup,
    verification_token,
)
from web.app import create_app
from web.appkeys import background_key, clock_key, passwords_key, redis_key
from web.devices import DEVICE_COOKIE, Device, device_cookie_value, read_device
from web.passwords import Passwords
from web.routes.accounts import SIGNUP_NOTICES_PER_DAY
from web.routes.verification import RESEND_KEY_PREFIX
from web.schemas.accounts import plain_name
from web.settings import WebSettings
from web.throttle import Clock, client_key

SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}


class ManualClock(Clock):
    """Throttling's time, moved by the test instead of waited for."""

    def __init__(self) -> None:
        self.at = time.time()

    def now(self) -> float:
        return self.at


async def _client_with_clock(
    aiohttp_client: Any, settings: Any
) -> tuple[TestClient, ManualClock]:
    app = create_app(settings)
    clock = ManualClock()
    app[clock_key] = clock
    return await aiohttp_client(app), clock


def _from(address: str) -> dict[str, str]:
    """Headers of a request from `address` (behind our trusted proxy)."""
    return {"X-Forwarded-For": address}


async def test_a_name_never_reaches_mail_to_an_unverified_address(
    client: TestClient,
) -> None:
    name = "Win a prize at http://evil.example now"
    await signup(client, "victim@example.org", name=name)
    [mail] = await OutboxEmail.filter(to_address="victim@example.org")
    assert "evil.example" not in mail.text_body
    assert "evil.example" not in (mail.html_body or "")
    assert "Win a prize" not in mail.text_body


def test_names_lose_control_and_bidi_characters() -> None:
    assert plain_name("Ada\u202eevil\u202c Love\x07lace") == "Adaevil Love lace"
    assert plain_name("  two\nlines\u2028here ") == "two lines here"
    assert plain_name("Zoë 🦊") == "Zoë 🦊"


async def test_a_bidi_override_in_a_sign_up_name_is_stripped(
    client: TestClient,
) -> None:
    await signup(client, "bidi@example.org", name="\u202eevil\u202c")
    user = await User.get(email_key="bidi@example.org")
    assert user.name == "evil"


async def test_resend_by_address_says_the_same_whether_or_not_it_has_an_account(
    client: TestClient,
) -> None:
    await signup(client, "waiting@example.org")
    known = await client.post(RESEND, json={"email": "waiting@example.org"})
    unknown = await client.post(RESEND, json={"email": "nobody@example.org"})
    assert known.status == unknown.status == 202
    assert await known.json() == await unknown.json()


async def test_resends_to_one_address_are_capped_per_day(
    aiohttp_client: Any, web_settings: Any
) -> None:
    settings = web_settings.model_copy(
        update={"verify_resend_interval": 1, "verify_resend_per_day": 2}
    )
    client = await aiohttp_client(create_app(settings))
    response = await client.post(
        SIGNUP, json={"email": "spammed@example.org", "password": PASSWORD}
    )
    assert response.status == 201
    sent = 0
    for _ in range(6):
        answer = await client.post(RESEND, json={"email": "spammed@example.org"})
        assert answer.status == 202
        # The per-minute gap would refuse back-to-back resends: wait it out
        # in the store instead of the clock.
        await _forget_gap(client, "spammed@example.org")
        sent = await OutboxEmail.filter(to_address="spammed@example.org").count()
    # The sign-up's email, then at most two resends a day.
    assert sent == 3


async def _forget_gap(client: TestClient, email: str) -> None:
    user = await User.get(email_key=email)
    await client.app[redis_key].delete(f"{RESEND_KEY_PREFIX}:{user.id}")


async def test_an_attacker_elsewhere_cannot_lock_the_owner_out(
    aiohttp_client: Any, web_settings: Any
) -> None:
    settings = web_settings.model_copy(update={"trust_forwarded": True})
    client = await aiohttp_client(create_app(settings))
    await signup(client, "owner@example.org")
    attacker = {"X-Forwarded-For": "203.0.113.66"}
    wrong = {"email": "owner@example.org", "password": "not the password"}
    answers = [
        (await client.post(SIGNIN, json=wrong, headers=attacker)).status
        for _ in range(15)
    ]
    assert answers == [401] * 10 + [429] * 5  # the attacker is stopped...
    owner = {"X-Forwarded-For": "198.51.100.7"}
    right = {"email": "owner@example.org", "password": PASSWORD}
    signed_in = await client.post(SIGNIN, json=right, headers=owner)
    assert signed_in.status == 200  # ...and the owner is not


async def test_many_clients_guessing_one_account_are_slowed_down_not_locked(
    aiohttp_client: Any, web_settings: Any
) -> None:
    settings = web_settings.model_copy(
        update={"trust_forwarded": True, "signin_max_failures_per_email_global": 12}
    )
    client, clock = await _client_with_clock(aiohttp_client, settings)
    await signup(client, "target@example.org")
    wrong = {"email": "target@example.org", "password": "not the password"}
    answers = [
        await client.post(SIGNIN, json=wrong, headers=_from(f"203.0.113.{n}"))
        for n in range(14)
    ]
    assert [answer.status for answer in answers] == [401] * 12 + [429] * 2
    assert [answer.headers["Retry-After"] for answer in answers[12:]] == ["1", "1"]
    # Each guess past the free ones waits twice as long as the one before...
    waits = []
    for n in range(10):
        clock.at += int(answers[-1].headers["Retry-After"])
        guess = await client.post(SIGNIN, json=wrong, headers=_from(f"192.0.2.{n}"))
        assert guess.status == 401
        answers.append(await client.post(SIGNIN, json=wrong, headers=_from("::1")))
        await error_of(answers[-1], 429, "rate_limited")
        waits.append(int(answers[-1].headers["Retry-After"]))
    # ...up to the cap: slowed down, never locked.
    assert waits == [2, 4, 8, 16, 32, 60, 60, 60, 60, 60]


FORGOT = "/api/v1/auth/password/forgot"
RESET = "/api/v1/auth/password/reset"
NEW_PASSWORD = "a brand new passphrase"


async def _reset_token(email: str) -> str:
    mail = (
        await OutboxEmail.filter(to_address=email, subject__icontains="new password")
        .order_by("-created_at")
        .first()
    )
    assert mail is not None
    found = re.search(r"reset-password\?token=([\w-]+)", mail.text_body)
    assert found, mail.text_body
    return found.group(1)


async def test_a_password_reset_works_once_and_revokes_every_token_and_session(
    client: TestClient,
) -> None:
    await signup(client, "forgetful@example.org")
    old = await signin(client, "forgetful@example.org")
    session = await signin(client, "forgetful@example.org", session=True)
    assert session["csrf_token"]
    unknown = await client.post(FORGOT, json={"email": "nobody@example.org"})
    known = await client.post(FORGOT, json={"email": "forgetful@example.org"})
    assert unknown.status == known.status == 202
    assert await unknown.json() == await known.json()
    await client.app[background_key].idle()
    token = await _reset_token("forgetful@example.org")

    done = await client.post(RESET, json={"token": token, "password": NEW_PASSWORD})
    assert done.status == 204
    # Every token and the cookie session stop working at once.
    me = await client.get(
        "/api/v1/me", headers={"Authorization": f"Bearer {old['token']}"}
    )
    assert me.status == 401
    assert (await client.get("/api/v1/me")).status == 401
    # The old password is gone, the new one works, the link is spent.
    wrong = {"email": "forgetful@example.org", "password": PASSWORD}
    assert (await client.post(SIGNIN, json=wrong)).status == 401
    await signin(client, "forgetful@example.org", NEW_PASSWORD)
    again = await client.post(RESET, json={"token": token, "password": NEW_PASSWORD})
    assert again.status == 410
    # It proved the address: the account counts as verified now.
    user = await User.get(email_key="forgetful@example.org")
    assert user.email_verified_at is not None


async def test_an_expired_reset_link_is_410(client: TestClient) -> None:
    await signup(client, "late@example.org")
    await client.post(FORGOT, json={"email": "late@example.org"})
    await client.app[background_key].idle()
    token = await _reset_token("late@example.org")
    await EmailLink.filter(purpose=LinkPurpose.RESET).update(
        expires_at=utcnow() - timedelta(seconds=1)
    )
    answer = await client.post(RESET, json={"token": token, "password": NEW_PASSWORD})
    assert answer.status == 410
    assert (await answer.json())["error"]["code"] == "gone"


async def test_a_squatter_cannot_keep_the_owner_out(
    aiohttp_client: Any, web_settings: Any
) -> None:
    settings = web_settings.model_copy(update={"unverified_takeover_after": 60})
    client = await aiohttp_client(create_app(settings))
    await signup(client, "owner@example.org", name="Squatter")
    squatter = await signin(client, "owner@example.org")
    headers = {"Authorization": f"Bearer {squatter['token']}"}
    # Nothing that costs before the address is proven.
    redeem = await client.post(
        "/api/v1/premium/redeem", json={"code": "SDAPI-AAAAA-BBBBB"}, headers=headers
    )
    assert redeem.status == 403
    assert (await redeem.json())["error"]["code"] == "email_not_verified"
    generate = await client.post(
        "/api/v1/generations", json={"prompt": "x"}, headers=headers
    )
    assert generate.status == 403
    # Soon after, the address is still taken (the answer does not say so)...
    taken = await client.post(
        SIGNUP, json={"email": "owner@example.org", "password": NEW_PASSWORD}
    )
    assert taken.status == 201
    assert (await client.get("/api/v1/me", headers=headers)).status == 200
    # ...but once the squat is older than the limit, the owner's sign-up
    # takes the address, and the squatter's account is gone.
    await User.filter(email_key="owner@example.org").update(
        created_at=utcnow() - timedelta(seconds=120)
    )
    mine = await client.post(
        SIGNUP, json={"email": "owner@example.org", "password": NEW_PASSWORD}
    )
    assert mine.status == 201
    assert (await client.get("/api/v1/me", headers=headers)).status == 401
    [user] = await User.filter(email_key="owner@example.org")
    assert user.name is None


# --- finding 1: nobody elsewhere can lock an account ------------------------


async def _signin_as(
    client: TestClient,
    password: str,
    address: str,
    device: str | None = None,
) -> Any:
    """A sign-in of owner@example.org from `address`, with `device` as its
    only cookie; the cookies it sets are not kept (the attacker's requests
    come from the same test client)."""
    headers = _from(address)
    if device is not None:
        headers["Cookie"] = f"{DEVICE_COOKIE}={device}"
    body = {"email": "owner@example.org", "password": password}
    response = await client.post(SIGNIN, json=body, headers=headers)
    client.session.cookie_jar.clear()
    return response


async def test_anyone_can_no_longer_lock_an_account_for_a_day(
    aiohttp_client: Any, web_settings: Any
) -> None:
    settings = web_settings.model_copy(update={"trust_forwarded": True})
    client, clock = await _client_with_clock(aiohttp_client, settings)
    await signup(client, "owner@example.org")
    # The owner's browser signed in before: it holds a device cookie.
    first = await _signin_as(client, PASSWORD, "198.51.100.7")
    assert first.status == 200
    device = first.cookies[DEVICE_COOKIE].value

    # The attack: 10 wrong passwords from each of 10 addresses, over 25 s.
    statuses = []
    for n in range(10):
        for _ in range(10):
            guess = await _signin_as(client, "not the password", f"203.0.113.{n}")
            statuses.append(guess.status)
            if guess.status == 429:
                assert int(guess.headers["Retry-After"]) <= 60
            clock.at += 0.25
    assert set(statuses) == {401, 429}
    # Slowed down: the free 20, then a few as the delays allow.
    assert statuses.count(401) < 30
    held_back = await _signin_as(client, "not the password", "203.0.113.99")
    await error_of(held_back, 429, "rate_limited")

    # The owner's browser is not held back at all...
    known = await _signin_as(client, PASSWORD, "198.51.100.7", device=device)
    assert known.status == 200
    # ...and from anywhere else the owner waits a short delay, no more.
    delayed = await _signin_as(client, PASSWORD, "192.0.2.1")
    await error_of(delayed, 429, "rate_limited")
    wait = int(delayed.headers["Retry-After"])
    assert wait <= 60
    clock.at += wait
    assert (await _signin_as(client, PASSWORD, "192.0.2.1")).status == 200

    # More guessing, then the owner resets the password...
    for n in range(10, 15):
        await _signin_as(client, "not the password", f"203.0.113.{n}")
    forgot = await client.post(FORGOT, json={"email": "owner@example.org"})
    assert forgot.status == 202
    await client.app[background_key].idle()
    token = await _reset_token("owner@example.org")
    done = await client.post(RESET, json={"token": token, "password": NEW_PASSWORD})
    assert done.status == 204
    clock.at += 0.001
    # ...which lifts every limit: the new password works at once, even from
    # an address that guessed until it was refused.
    assert (await _signin_as(client, NEW_PASSWORD, "203.0.113.0")).status == 200
    assert (await _signin_as(client, NEW_PASSWORD, "192.0.2.2")).status == 200


async def test_a_device_cookie_that_keeps_failing_is_limited(
    aiohttp_client: Any, web_settings: Any
) -> None:
    settings = web_settings.model_copy(update={"trust_forwarded": True})
    client, _ = await _client_with_clock(aiohttp_client, settings)
    await signup(client, "owner@example.org")
    first = await _signin_as(client, PASSWORD, "198.51.100.7")
    device = first.cookies[DEVICE_COOKIE].value
    statuses = []
    for n in range(12):
        # From ever new addresses: the device is counted, not the address.
        answer = await _signin_as(client, "wrong!", f"203.0.113.{n}", device=device)
        statuses.append(answer.status)
    assert statuses == [401] * 10 + [429] * 2
    refused = await _signin_as(client, PASSWORD, "203.0.113.50", device=device)
    await error_of(refused, 429, "rate_limited")
    # Without the cookie, the account itself is not held back.
    assert (await _signin_as(client, PASSWORD, "192.0.2.1")).status == 200


def test_a_device_cookie_is_good_for_its_account_only_until_it_expires() -> None:
    device = Device(user_id=uuid.uuid4(), device_id="d3v1c3")
    now = time.time()
    value = device_cookie_value("secret", "a@example.org", device, int(now) + 60)
    good = {"secret_key": "secret", "email_key": "a@example.org"}
    assert read_device(value, **good, now=now) == device
    assert read_device(value, **good, now=now + 61) is None
    other = {"secret_key": "secret", "email_key": "b@example.org"}
    assert read_device(value, **other, now=now) is None
    assert read_device(value, secret_key="another", email_key="a", now=now) is None
    forged = value.replace(device.device_id, "stolen")
    assert read_device(forged, **good, now=now) is None
    assert read_device("junk", **good, now=now) is None
    # A forged MAC with characters no MAC has is refused, not an error.
    odd = value.rsplit(".", 1)[0] + ".\u00e9t\u00e9\udcff"
    assert read_device(odd, **good, now=now) is None


def test_an_ipv6_client_is_its_64() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("192.0.2.1") == "192.0.2.1"
    assert client_key("unknown") == "unknown"


async def test_one_ipv6_host_is_not_endless_clients(
    aiohttp_client: Any, web_settings: Any
) -> None:
    settings = web_settings.model_copy(
        update={"trust_forwarded": True, "signin_max_failures_per_client": 3}
    )
    client = await aiohttp_client(create_app(settings))
    statuses = []
    for n in range(1, 6):
        answer = await client.post(
            SIGNIN,
            json={"email": f"spray{n}@example.org", "password": "guess-guess"},
            headers=_from(f"2001:db8:1:2::{n:x}"),
        )
        statuses.append(answer.status)
    assert statuses == [401] * 3 + [429] * 2
    elsewhere = await client.post(
        SIGNIN,
        json={"email": "spray9@example.org", "password": "guess-guess"},
        headers=_from("2001:db8:1:3::1"),
    )
    assert elsewhere.status == 401


# --- finding 3: a reset checks its token before bcrypt ----------------------


async def test_password_reset_checks_the_token_before_bcrypt_and_is_throttled(
    aiohttp_client: Any, web_settings: Any, monkeypatch: Any
) -> None:
    import bcrypt

    settings = web_settings.model_copy(update={"trust_forwarded": True})
    client = await aiohttp_client(create_app(settings))
    await signup(client, "owner@example.org")
    real_hashpw = bcrypt.hashpw
    hashes = 0

    def hashpw(password: bytes, salt: bytes) -> bytes:
        nonlocal hashes
        hashes += 1
        return real_hashpw(password, salt)

    monkeypatch.setattr(bcrypt, "hashpw", hashpw)

    # 8 clients posting junk tokens: refused without a single hash...
    def junk(n: int) -> dict[str, str]:
        return {"token": f"junk-token-{n:04d}-xxxxxxxxxx", "password": NEW_PASSWORD}

    answers = await asyncio.gather(
        *(
            client.post(RESET, json=junk(100 * c + n), headers=_from(f"203.0.113.{c}"))
            for c in range(8)
            for n in range(12)
        )
    )
    statuses = sorted(answer.status for answer in answers)
    # ...and each client only 10 times in the window.
    assert statuses == [410] * 80 + [429] * 16
    assert hashes == 0
    limited = next(answer for answer in answers if answer.status == 429)
    await error_of(limited, 429, "rate_limited")
    assert 0 < int(limited.headers["Retry-After"]) <= 900
    # One token, from anywhere, only a few times.
    same = [
        (await client.post(RESET, json=junk(999), headers=_from(f"192.0.2.{n}"))).status
        for n in range(5)
    ]
    assert same == [410] * 3 + [429] * 2

    # A real link still works, with one hash; used, it costs none.
    await client.post(FORGOT, json={"email": "owner@example.org"})
    await client.app[background_key].idle()
    token = await _reset_token("owner@example.org")
    real = {"token": token, "password": NEW_PASSWORD}
    assert (
        await client.post(RESET, json=real, headers=_from("198.51.100.1"))
    ).status == 204
    assert hashes == 1
    again = await client.post(RESET, json=real, headers=_from("198.51.100.2"))
    await error_of(again, 410, "gone")
    assert hashes == 1


async def test_premium_granted_to_an_unverified_account_does_not_generate(
    client: TestClient, node: NodeDouble
) -> None:
    # What an operator's grant to a squatted address looks like.
    _, secret = await make_user(premium=True, verified=False)
    rest = await client.post("/api/v1/generations", json=SMALL, headers=auth(secret))
    assert (await error_of(rest, 403, "email_not_verified"))["message"]
    openai = await client.post(
        "/v1/images/generations",
        json={"prompt": "a red fox", "size": "64x64", "model": "tiny"},
        headers=auth(secret),
    )
    assert openai.status == 403
    assert (await openai.json())["error"]["code"] == "email_not_verified"
    async with client.ws_connect("/api/v1/ws", headers=auth(secret)) as ws:
        await ws.send_json({"type": "generate", "request": SMALL})
        refused = await ws.receive_json(timeout=15)
    assert refused["type"] == "error"
    assert refused["code"] == "email_not_verified"
    assert await Generation.all().count() == 0


async def test_forgot_password_timing_shows_no_address(client: TestClient) -> None:
    await signup(client, "known@example.org")
    # While the users table is locked nothing can read it: answers that come
    # back anyway did not wait for the lookup, the cap or the mail, which is
    # all the work that differs between an address with an account and one
    # without. The client's answer costs the same either way.
    async with in_transaction() as connection:
        await connection.execute_script("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        known = await client.post(FORGOT, json={"email": "known@example.org"})
        unknown = await client.post(FORGOT, json={"email": "nobody@example.org"})
        assert known.status == unknown.status == 202
        assert await known.read() == await unknown.read()
        assert _stable(known.headers) == _stable(unknown.headers)
    await client.app[background_key].idle()
    token = await _reset_token("known@example.org")
    assert token
    assert not await OutboxEmail.filter(to_address="nobody@example.org").exists()


def _stable(headers: Any) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name != "Date"}


class CountingPasswords(Passwords):
    """The app's hasher, counting the bcrypt hashes it computes."""

    def __init__(self, *, secret_key: str, rounds: int, concurrency: int) -> None:
        super().__init__(secret_key=secret_key, rounds=rounds, concurrency=concurrency)
        self.hashed = 0

    async def hash(self, password: str) -> str:
        self.hashed += 1
        return await super().hash(password)


async def test_signup_shows_no_address(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    app = create_app(web_settings)
    passwords = CountingPasswords(
        secret_key=web_settings.secret(), rounds=4, concurrency=2
    )
    app[passwords_key] = passwords
    client = await aiohttp_client(app)
    owner = (await signup(client, "owner@example.org", name="Owner"))["user"]
    await User.filter(id=owner["id"]).update(
        email_verified_at=utcnow(), premium_until=utcnow() + timedelta(days=9)
    )

    async def attempt(email: str) -> tuple[int, dict[str, Any], int]:
        before = passwords.hashed
        answer = await client.post(
            SIGNUP, json={"email": email, "password": PASSWORD, "name": "Mallory"}
        )
        body = await answer.json()
        return answer.status, body, passwords.hashed - before

    taken_status, taken, taken_hashes = await attempt("Owner@Example.org")
    free_status, free, free_hashes = await attempt("Free@Example.org")
    # The same answer, costing the same bcrypt, whether or not the address
    # has an account: only the id and the time differ, as between any two.
    assert taken_status == free_status == 201
    assert taken_hashes == free_hashes == 1
    assert set(taken) == set(free) == {"user"}
    assert set(taken["user"]) == set(free["user"])
    for field in ("name", "tier", "premium_until", "email_verified"):
        assert taken["user"][field] == free["user"][field], field
    assert taken["user"]["email"] == "Owner@example.org"
    assert taken["user"]["id"] != owner["id"]
    assert taken["user"]["created_at"] != owner["created_at"]
    # Nothing changed for the owner, who is told of the attempt without the
    # name the stranger chose; at most a few such notes a day.
    [row] = await User.filter(email_key="owner@example.org")
    assert row.name == "Owner"
    for _ in range(5):
        assert (await attempt("owner@example.org"))[0] == 201
    notices = await OutboxEmail.filter(
        to_address="owner@example.org", subject__icontains="tried to sign up"
    )
    assert len(notices) == SIGNUP_NOTICES_PER_DAY
    assert all("Mallory" not in f"{n.text_body}{n.html_body}" for n in notices)
    assert "http://testserver.local/forgot-password" in notices[0].text_body


async def test_a_squatters_name_and_premium_do_not_survive_the_owners_takeover(
    client: TestClient,
) -> None:
    # A stranger signs up with the owner's address and a name of their
    # choosing; an operator is talked into making that account premium.
    await signup(client, "owner@example.org", name="Call +1 555 0100 now")
    await User.filter(email_key="owner@example.org").update(
        premium_until=utcnow() + timedelta(days=30)
    )
    # The owner takes the account over with a password reset...
    await client.post(FORGOT, json={"email": "owner@example.org"})
    await client.app[background_key].idle()
    token = await _reset_token("owner@example.org")
    done = await client.post(RESET, json={"token": token, "password": NEW_PASSWORD})
    assert done.status == 204
    user = await User.get(email_key="owner@example.org")
    assert user.email_verified_at is not None
    assert user.name is None
    assert user.premium_until is None
    # ...and a first verification by the emailed link clears the name too.
    await signup(client, "second@example.org", name="Stranger's name")
    token = await verification_token("second@example.org")
    opened = await client.get(VERIFY, params={"token": token}, headers=JSON)
    assert opened.status == 200
    assert (await opened.json())["user"]["name"] is None
    # From then on the owner names the account.
    session = await signin(client, "owner@example.org", NEW_PASSWORD, session=True)
    named = await client.patch(
        ME,
        json={"name": "Ada\u202e Lovelace"},
        headers={"X-CSRF-Token": session["csrf_token"]},
    )
    assert named.status == 200, await named.text()
    assert (await named.json())["name"] == "Ada Lovelace"


async def test_patch_me_changes_the_address_once_the_new_one_is_verified(
    client: TestClient,
) -> None:
    await signup(client, "old@example.org")
    await User.filter(email_key="old@example.org").update(email_verified_at=utcnow())
    headers = auth((await signin(client, "old@example.org"))["token"])
    changed = await client.patch(ME, json={"email": "New@Example.org"}, headers=headers)
    assert changed.status == 200, await changed.text()
    body = await changed.json()
    assert body["email"] == "old@example.org"
    assert body["pending_email"] == "New@example.org"
    assert body["email_verified"] is True
    # Until the new address is proven, the old one is the account's.
    await signin(client, "old@example.org")
    wrong = {"email": "new@example.org", "password": PASSWORD}
    assert (await client.post(SIGNIN, json=wrong)).status == 401
    token = await verification_token("New@example.org")
    opened = await client.get(VERIFY, params={"token": token}, headers=JSON)
    assert opened.status == 200, await opened.text()
    me = await (await client.get(ME, headers=headers)).json()
    assert me["email"] == "New@example.org"
    assert me["pending_email"] is None
    assert me["email_verified"] is True
    await signin(client, "new@example.org")
    gone = {"email": "old@example.org", "password": PASSWORD}
    assert (await client.post(SIGNIN, json=gone)).status == 401


async def test_patch_me_refuses_bad_fields_in_the_error_format(
    client: TestClient,
) -> None:
    await signup(client, "fields@example.org", name="Kept")
    session = await signin(client, "fields@example.org", session=True)
    csrf = {"X-CSRF-Token": session["csrf_token"]}
    for body, field in [
        ({"name": "n" * 101}, "name"),
        ({"email": "not an address"}, "email"),
        ({"tier": "premium"}, "tier"),
    ]:
        answer = await client.patch(ME, json=body, headers=csrf)
        error = await error_of(answer, 422, "validation_error")
        assert [detail["field"] for detail in error["details"]] == [field]
    # The cookie session needs its CSRF token, as for every unsafe method.
    refused = await client.patch(ME, json={"name": "Other"})
    await error_of(refused, 403, "forbidden")
    assert (await User.get(email_key="fields@example.org")).name == "Kept"
    # An address that has an account gets the same answer as any other: the
    # link to it is refused only when its owner opens it.
    await signup(client, "taken@example.org")
    await User.filter(email_key="taken@example.org").update(email_verified_at=utcnow())
    moved = await client.patch(ME, json={"email": "taken@example.org"}, headers=csrf)
    assert moved.status == 200
    token = await _latest_verification_token("taken@example.org")
    opened = await client.get(VERIFY, params={"token": token}, headers=JSON)
    await error_of(opened, 409, "conflict")
    assert (await User.get(id=session["user"]["id"])).email == "fields@example.org"


async def _latest_verification_token(email: str) -> str:
    mail = (
        await OutboxEmail.filter(to_address=email, subject__startswith="Verify")
        .order_by("-created_at")
        .first()
    )
    assert mail is not None
    found = LINK.search(mail.text_body)
    assert found, mail.text_body
    return found.group(1)


async def test_a_link_does_only_what_it_was_sent_for(client: TestClient) -> None:
    """Verifications and resets share one table: a verification link must not
    set a password, nor a reset link verify an address."""
    await signup(client, "owner@example.org")
    verify = await verification_token("owner@example.org")
    answer = await client.post(RESET, json={"token": verify, "password": NEW_PASSWORD})
    await error_of(answer, 410, "gone")
    await client.post(FORGOT, json={"email": "owner@example.org"})
    await client.app[background_key].idle()
    reset = await _reset_token("owner@example.org")
    opened = await client.get(VERIFY, params={"token": reset}, headers=JSON)
    assert opened.status == 404
    user = await User.get(email_key="owner@example.org")
    assert user.email_verified_at is None
    # Each still does its own job.
    done = await client.post(RESET, json={"token": reset, "password": NEW_PASSWORD})
    assert done.status == 204
