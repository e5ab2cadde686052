"""Attacker text in our emails, and resends that cannot be repeated forever."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.web.test_accounts import PASSWORD, RESEND, SIGNIN, SIGNUP, signup
from web.app import create_app
from web.appkeys import redis_key
from web.models import OutboxEmail, User
from web.routes.accounts import RESEND_KEY_PREFIX
from web.schemas.accounts import plain_name


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


async def test_many_clients_guessing_one_account_meet_a_slower_limit(
    aiohttp_client: Any, web_settings: Any
) -> None:
    settings = web_settings.model_copy(
        update={"trust_forwarded": True, "signin_max_failures_per_email_global": 12}
    )
    client = await aiohttp_client(create_app(settings))
    await signup(client, "target@example.org")
    wrong = {"email": "target@example.org", "password": "not the password"}
    answers = [
        (
            await client.post(
                SIGNIN, json=wrong, headers={"X-Forwarded-For": f"203.0.113.{n}"}
            )
        ).status
        for n in range(14)
    ]
    assert answers == [401] * 12 + [429] * 2
