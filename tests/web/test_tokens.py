"""Personal API tokens: listed without secrets, made once, revoked at once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from aiohttp.test_utils import TestClient

from sdapi.db.models import ApiToken
from sdapi.devtools.accounts import auth, make_user
from tests.node_double import NodeDouble

TOKENS = "/api/v1/tokens"


async def test_a_new_token_is_shown_once_listed_without_it_and_works(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    made = await client.post(TOKENS, json={"name": "laptop"}, headers=auth(secret))
    assert made.status == 201
    body = await made.json()
    assert body["name"] == "laptop" and body["token"].startswith("sdapi_")
    expires = datetime.fromisoformat(body["expires_at"])
    assert expires - datetime.now(UTC) > timedelta(days=360)

    listed = await (await client.get(TOKENS, headers=auth(secret))).json()
    names = [item["name"] for item in listed["items"]]
    assert names == ["laptop", "sign-in"]  # newest first; the caller's own too
    assert all("token" not in item for item in listed["items"])
    assert body["token"] not in str(listed)

    me = await client.get("/api/v1/me", headers=auth(body["token"]))
    assert me.status == 200
    [laptop] = [
        i
        for i in (await (await client.get(TOKENS, headers=auth(secret))).json())[
            "items"
        ]
        if i["name"] == "laptop"
    ]
    assert laptop["last_used_at"] is not None


async def test_a_revoked_token_stops_at_once_even_on_an_open_socket(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    made = await (
        await client.post(TOKENS, json={"name": "script"}, headers=auth(secret))
    ).json()
    async with client.ws_connect("/api/v1/ws", headers=auth(made["token"])) as ws:
        gone = await client.delete(f"{TOKENS}/{made['id']}", headers=auth(secret))
        assert gone.status == 204
        # Closed by the revocation itself, long before the periodic re-check.
        frame = await ws.receive_json(timeout=5)
        assert frame["type"] == "error" and frame["code"] == "unauthorized"
        closing = await asyncio.wait_for(ws.receive(), 5)
        assert closing.type.name in {"CLOSE", "CLOSING", "CLOSED"}
    refused = await client.get("/api/v1/me", headers=auth(made["token"]))
    assert refused.status == 401


async def test_other_users_tokens_are_404(client: TestClient) -> None:
    _, mine = await make_user()
    _, theirs = await make_user()
    made = await (
        await client.post(TOKENS, json={"name": "theirs"}, headers=auth(theirs))
    ).json()
    answer = await client.delete(f"{TOKENS}/{made['id']}", headers=auth(mine))
    assert answer.status == 404
    assert (
        await client.delete(f"{TOKENS}/not-a-uuid", headers=auth(mine))
    ).status == 404
    assert await ApiToken.filter(id=made["id"], revoked_at=None).exists()


async def test_bad_names_and_expiries_are_422(client: TestClient) -> None:
    _, secret = await make_user()
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    far = (datetime.now(UTC) + timedelta(days=20 * 365)).isoformat()
    for body, field in (
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "ok", "expires_at": past}, "expires_at"),
        ({"name": "ok", "expires_at": far}, "expires_at"),
        ({"name": "ok", "scope": "all"}, "scope"),
    ):
        answer = await client.post(TOKENS, json=body, headers=auth(secret))
        assert answer.status == 422, body
        fields = [d["field"] for d in (await answer.json())["error"]["details"]]
        assert field in fields, body


async def test_a_token_works_with_the_official_openai_client(
    client: TestClient, node: NodeDouble
) -> None:
    import openai

    _, secret = await make_user()
    made = await (
        await client.post(TOKENS, json={"name": "openai"}, headers=auth(secret))
    ).json()
    api = openai.AsyncOpenAI(
        api_key=made["token"], base_url=str(client.make_url("/v1")), max_retries=0
    )
    call = asyncio.ensure_future(
        api.images.generate(prompt="a fox", model="tiny", size="64x64")
    )
    await node.run(await node.claim())
    response = await call
    assert len(response.data) == 1
    await client.delete(f"{TOKENS}/{made['id']}", headers=auth(secret))
    try:
        await api.images.generate(prompt="a fox", model="tiny", size="64x64")
    except openai.AuthenticationError:
        pass
    else:
        raise AssertionError("a revoked token still worked")
    finally:
        await api.close()
