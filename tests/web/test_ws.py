"""The live WebSocket: auth on the upgrade, generate/subscribe/cancel, relays."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient
from redis.exceptions import ConnectionError as RedisConnectionError

from sdapi.contract.events import LoadingModelEvent
from sdapi.contract.names import events_key, image_key
from sdapi.contract.status import Status
from sdapi.db.models import ApiToken, GeneratedImage, Generation, utcnow
from sdapi.devtools.accounts import auth, make_user
from sdapi.infra.registry import NodeRegistry
from sdapi.infra.streams import append_event
from tests.image_support import stored_bytes
from tests.node_double import NodeDouble, jobs_context
from tests.support import until
from web import live_socket
from web.app import create_app
from web.appkeys import live_redis_key, redis_key
from web.live_socket import live_sockets_key, live_users_key
from web.passwords import hash_password
from web.settings import WebSettings

WS = "/api/v1/ws"
SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}
OUR_ORIGIN = "http://testserver.local"


async def frame(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = 15
) -> dict[str, Any]:
    message = await ws.receive(timeout=timeout)
    assert message.type is WSMsgType.TEXT, message
    data: dict[str, Any] = message.json()
    return data


async def until_done(
    ws: aiohttp.ClientWebSocketResponse, ident: str | None = None
) -> list[dict[str, Any]]:
    """Frames up to and including the `done` of `ident` (any id when None)."""
    frames = []
    while True:
        data = await frame(ws)
        frames.append(data)
        if data["type"] == "done" and (ident is None or data["id"] == ident):
            return frames


async def generate(ws: aiohttp.ClientWebSocketResponse, **change: Any) -> str:
    await ws.send_json({"type": "generate", "request": {**SMALL, **change}})
    accepted = await frame(ws)
    assert accepted["type"] == "accepted", accepted
    assert accepted["generation"]["id"] == accepted["id"]
    ident: str = accepted["id"]
    return ident


async def test_premium_client_gets_every_event_in_order(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        await ws.send_json({"type": "generate", "request": SMALL})
        accepted = await frame(ws)
        assert accepted["type"] == "accepted"
        assert accepted["generation"]["status"] == "queued"
        ident = accepted["id"]
        job = await node.claim()
        made = (await asyncio.gather(node.run(job), until_done(ws, ident)))[1]
    assert [f["type"] for f in made] == [
        "queued",
        "started",
        "progress",
        "progress",
        "progress",
        "progress",
        "image",
        "done",
    ]
    assert all(f["id"] == ident for f in made)
    # The node double publishes no speed: nothing learned, no estimate.
    assert made[0] == {
        "type": "queued",
        "id": ident,
        "position": 0,
        "eta_s": None,
        "eta": None,
    }
    assert made[1] == {"type": "started", "id": ident, "load_s": None, "eta_s": None}
    progress = made[2:6]
    assert [(p["step"], p["total"]) for p in progress] == [
        (1, 4),
        (2, 4),
        (3, 4),
        (4, 4),
    ]
    assert progress[0]["preview"] is None
    assert progress[1]["preview"].startswith("data:image/jpeg;base64,")
    image = made[6]
    assert set(image) == {"type", "id", "index", "seed", "url", "data"}
    assert image["index"] == 0
    assert image["seed"] == accepted["generation"]["request"]["seed"]
    assert image["url"] == f"{OUR_ORIGIN}/api/v1/generations/{ident}/images/0"
    png = base64.b64decode(image["data"])
    assert png.startswith(b"\x89PNG")
    download = await client.get(
        f"/api/v1/generations/{ident}/images/0", headers=auth(secret)
    )
    assert await download.read() == png
    assert made[7] == {"type": "done", "id": ident, "status": "succeeded"}


async def test_a_model_load_is_relayed_as_a_loading_model_frame(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        ident = await generate(ws)
        assert (await frame(ws))["type"] == "queued"
        job = await node.claim()
        await append_event(
            node.redis, job.generation_id, LoadingModelEvent(model=job.model)
        )
        assert await frame(ws) == {
            "type": "loading_model",
            "id": ident,
            "model": job.model,
        }
        await node.start(job, load_s=2.5)
        assert await frame(ws) == {
            "type": "started",
            "id": ident,
            "load_s": 2.5,
            "eta_s": None,
        }


async def test_late_subscriber_gets_the_replay_including_image_and_done(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        ident = await generate(ws)
        await node.run(await node.claim())
        live = await until_done(ws, ident)
    async with client.ws_connect(WS, params={"token": secret}) as ws:
        await ws.send_json({"type": "subscribe", "id": ident})
        replay = await until_done(ws, ident)
    assert replay == live


async def test_subscriber_after_the_stream_expired_is_told_from_the_database(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        ident = await generate(ws, num_images=2)
        await node.run(await node.claim())
        live = await until_done(ws, ident)
    await node.redis.delete(events_key(ident))
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        await ws.send_json({"type": "subscribe", "id": ident})
        told = await until_done(ws, ident)
    assert told == [f for f in live if f["type"] in ("image", "done")]


async def test_failed_generation_done_carries_the_error(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        ident = await generate(ws)
        await node.fail(await node.claim(), "the GPU ran out of memory")
        frames = await until_done(ws, ident)
    assert frames[-1] == {
        "type": "done",
        "id": ident,
        "status": "failed",
        "error": {"code": "out_of_memory", "message": "the GPU ran out of memory"},
    }


async def test_many_generations_on_one_socket(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        for seed in (1, 2, 3):
            await ws.send_json({"type": "generate", "request": {**SMALL, "seed": seed}})
        for _ in range(3):
            await node.run(await node.claim())
        seen: dict[str, list[str]] = {}
        accepted: list[int] = []
        while sum("done" in kinds for kinds in seen.values()) < 3:
            data = await frame(ws)
            if data["type"] == "accepted":
                accepted.append(data["generation"]["request"]["seed"])
            seen.setdefault(data["id"], []).append(data["type"])
    # Messages are answered in order; each generation's frames are in order.
    assert accepted == [1, 2, 3]
    assert len(seen) == 3
    for kinds in seen.values():
        assert kinds[:2] == ["accepted", "queued"]
        assert kinds[-2:] == ["image", "done"]


async def test_cancel_mid_run_ends_cancelled(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        ident = await generate(ws)
        job = await node.claim()
        await node.start(job)
        await node.progress(job, 1)
        assert [(await frame(ws))["type"] for _ in range(3)] == [
            "queued",
            "started",
            "progress",
        ]
        await ws.send_json({"type": "cancel", "id": ident})
        assert await frame(ws) == {"type": "done", "id": ident, "status": "cancelled"}
        # The node finishes its step and reports; nothing changes, no second done.
        assert await node.run(job) == "already final"
        await ws.send_json({"type": "subscribe", "id": str(uuid.uuid4())})
        after = await frame(ws)
        assert after["type"] == "error"  # the next frame: no events after `done`
    row = await Generation.get(id=ident)
    assert row.status is Status.CANCELLED


async def test_cancel_without_subscription_answers_done(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    created = await client.post("/api/v1/generations", json=SMALL, headers=auth(secret))
    ident = (await created.json())["id"]
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        await ws.send_json({"type": "cancel", "id": ident})
        assert await frame(ws) == {"type": "done", "id": ident, "status": "cancelled"}


async def test_normal_user_cannot_generate_but_can_subscribe(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user(premium=False)
    created = await client.post(
        "/api/v1/generations", json={**SMALL, "delivery": "email"}, headers=auth(secret)
    )
    ident = (await created.json())["id"]
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        await ws.send_json({"type": "generate", "request": SMALL})
        error = await frame(ws)
        assert error["type"] == "error"
        assert error["id"] is None
        assert error["code"] == "premium_required"
        await ws.send_json({"type": "subscribe", "id": ident})
        await ws.send_json({"type": "cancel", "id": ident})
        assert await frame(ws) == {"type": "done", "id": ident, "status": "cancelled"}


async def test_other_users_ids_are_not_found(
    client: TestClient, node: NodeDouble
) -> None:
    _, owner = await make_user()
    _, other = await make_user()
    created = await client.post("/api/v1/generations", json=SMALL, headers=auth(owner))
    ident = (await created.json())["id"]
    async with client.ws_connect(WS, headers=auth(other)) as ws:
        for kind in ("subscribe", "cancel"):
            await ws.send_json({"type": kind, "id": ident})
            error = await frame(ws)
            assert error == {
                "type": "error",
                "id": ident,
                "code": "not_found",
                "message": "No such generation.",
                "details": [],
            }
    assert (await Generation.get(id=ident)).status is Status.QUEUED


async def test_bad_messages_get_error_frames_and_the_socket_stays_open(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        cases: list[tuple[Any, str]] = [
            ("not json at all", "bad_request"),
            ("[1, 2, 3]", "bad_request"),
            ('{"type": "dance"}', "bad_request"),
            ('{"id": "x"}', "bad_request"),
            ('{"type": "subscribe"}', "validation_error"),
            ('{"type": "generate"}', "validation_error"),
            ('{"type": "subscribe", "id": "x", "extra": 1}', "validation_error"),
            ("[" * 30_000 + "]" * 30_000, "bad_request"),
            (b"\x00\x01binary", "bad_request"),
        ]
        for message, code in cases:
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            else:
                await ws.send_str(message)
            error = await frame(ws)
            assert error["type"] == "error", message
            assert error["code"] == code, message
        await ws.send_json(
            {
                "type": "generate",
                "request": {**SMALL, "width": 100, "guidance_scale": -1},
            }
        )
        error = await frame(ws)
        assert error["code"] == "validation_error"
        fields = {d["field"] for d in error["details"]}
        assert fields == {"request.width", "request.guidance_scale"}
        await ws.send_str(
            '{"type": "generate", "request": {"prompt": "x", "guidance_scale": NaN}}'
        )
        assert (await frame(ws))["code"] == "validation_error"
        await ws.send_json({"type": "generate", "request": {**SMALL, "steps": 10_000}})
        error = await frame(ws)
        assert error["code"] == "validation_error"
        assert error["details"] == [
            {"field": "steps", "message": "At most 150 for your tier."}
        ]
        # Still open and working.
        ident = await generate(ws)
        assert ident


# A lone surrogate, as the JSON escape a client can send: Python reads it,
# but no frame can carry it back.
LONE = "\\ud800"


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(f'{{"type": "subscribe", "id": "{LONE}"}}', id="subscribe"),
        pytest.param(f'{{"type": "cancel", "id": "{LONE}"}}', id="cancel"),
        pytest.param(f'{{"type": "dance", "id": "{LONE}"}}', id="unknown-type"),
        pytest.param(f'{{"type": "{LONE}", "id": "x"}}', id="surrogate-type"),
        pytest.param(
            f'{{"type": "generate", "id": "{LONE}", "request": {{"prompt": "a"}}}}',
            id="generate",
        ),
        pytest.param(
            f'{{"type": "generate", "request": {{"prompt": "{LONE}"}}}}',
            id="generate-prompt",
        ),
        pytest.param(
            f'{{"type": "subscribe", "id": "x", "{LONE}": 1}}', id="unknown-field"
        ),
        pytest.param(
            f'{{"type": "generate", "request": {{"prompt": "a", "{LONE}": 1}}}}',
            id="unknown-request-field",
        ),
    ],
)
async def test_ws_lone_surrogate_gets_an_error_frame_and_the_socket_stays_open(
    client: TestClient, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        await ws.send_str(message)
        error = await frame(ws)
        assert error["type"] == "error"
        # Only a well-formed id is quoted back.
        assert error["id"] in {None, "x"}
        assert error["code"] in {"bad_request", "validation_error", "not_found"}
        # Still open and answering.
        missing = str(uuid.uuid4())
        await ws.send_json({"type": "subscribe", "id": missing})
        assert await frame(ws) == {
            "type": "error",
            "id": missing,
            "code": "not_found",
            "message": "No such generation.",
            "details": [],
        }
    assert not [r for r in caplog.records if r.exc_info]


async def test_oversize_message_closes_with_1009_and_a_reason(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        # The server stops reading at the frame header and drops the rest, so
        # this send may fail; the answer was sent before that.
        with contextlib.suppress(ConnectionError):
            await ws.send_str('{"type": "subscribe", "id": "' + "x" * 10_000_000 + '"}')
        error = await frame(ws)
        assert error["type"] == "error"
        assert error["code"] == "payload_too_large"
        closing = await ws.receive(timeout=5)
        assert closing.type is WSMsgType.CLOSE
        assert closing.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        assert "at most 65536 bytes" in closing.extra


async def test_upgrade_without_auth_is_401_json(client: TestClient) -> None:
    response = await client.get(WS)
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "unauthorized"
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect(WS)
    assert caught.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect(WS, params={"token": "sdapi_wrong"})
    assert caught.value.status == 401


async def test_plain_get_with_a_token_is_400(client: TestClient) -> None:
    _, secret = await make_user()
    response = await client.get(WS, headers=auth(secret))
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "bad_request"


async def _signed_in_with_cookie(client: TestClient) -> None:
    user, _ = await make_user()
    user.password_hash = await hash_password(
        "correct horse battery", secret_key="test-secret-key", rounds=4
    )
    await user.save(update_fields=["password_hash"])
    response = await client.post(
        "/api/v1/auth/signin",
        json={
            "email": user.email,
            "password": "correct horse battery",
            "session": True,
        },
    )
    assert response.status == 200, await response.text()


async def test_cookie_needs_one_of_our_origins(
    client: TestClient, node: NodeDouble
) -> None:
    await _signed_in_with_cookie(client)
    for origin in ("http://evil.example", None):
        headers = {"Origin": origin} if origin else {}
        response = await client.get(
            WS,
            headers={
                **headers,
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
            },
        )
        assert response.status == 403, origin
        body = await response.json()
        assert body["error"]["code"] == "forbidden"
    async with client.ws_connect(WS, origin=OUR_ORIGIN) as ws:
        ident = await generate(ws)
        assert ident


async def test_bearer_token_works_from_any_origin(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(
        WS, headers=auth(secret), origin="http://elsewhere.example"
    ) as ws:
        assert await generate(ws)


async def test_revoked_token_ends_the_socket(
    client: TestClient, node: NodeDouble
) -> None:
    user, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        await ApiToken.filter(user_id=user.id).update(revoked_at=utcnow())
        await ws.send_json({"type": "generate", "request": SMALL})
        error = await frame(ws)
        assert error["code"] == "unauthorized"
        closing = await ws.receive(timeout=5)
        assert closing.type is WSMsgType.CLOSE
        assert closing.data == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert await Generation.filter(user_id=user.id).count() == 0


async def test_a_token_revoked_after_a_generation_submits_nothing_more(
    client: TestClient, node: NodeDouble
) -> None:
    # The second message's token is checked under the submit's user lock,
    # not re-read first: revoked without a broadcast, it still stores nothing.
    user, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        await generate(ws)
        await ApiToken.filter(user_id=user.id).update(revoked_at=utcnow())
        await ws.send_json({"type": "generate", "request": SMALL})
        frames = [await frame(ws)]
        while frames[-1]["type"] != "error":
            frames.append(await frame(ws))
        assert frames[-1]["code"] == "unauthorized"
        assert "accepted" not in {f["type"] for f in frames}
    assert await Generation.filter(user_id=user.id).count() == 1


@pytest.mark.parametrize("invalid", [False, True])
async def test_a_lapsed_premium_after_a_generation_submits_nothing_more(
    client: TestClient, node: NodeDouble, invalid: bool
) -> None:
    user, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        await generate(ws)
        user.premium_until = utcnow()
        await user.save(update_fields=["premium_until"])
        # An invalid request is refused for the lapsed premium too, not for
        # its fields by the premium limits read before.
        request = {**SMALL, "steps": 10_000} if invalid else SMALL
        await ws.send_json({"type": "generate", "request": request})
        frames = [await frame(ws)]
        while frames[-1]["type"] != "error":
            frames.append(await frame(ws))
        assert frames[-1]["code"] == "premium_required"
        assert "accepted" not in {f["type"] for f in frames}
    assert await Generation.filter(user_id=user.id).count() == 1


def relay_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("sdapi-relay-")]


async def test_client_leaving_mid_run_stops_relays_and_the_work_finishes(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    ws = await client.ws_connect(WS, headers=auth(secret))
    ident = await generate(ws)
    job = await node.claim()
    await node.start(job)
    assert len(relay_tasks()) == 1
    await ws.close()
    await until(lambda: not relay_tasks(), 5, "the relays to stop")
    assert await node.run(job) == "succeeded"
    assert (await Generation.get(id=ident)).status is Status.SUCCEEDED
    gc.collect()
    assert len(client.app[live_sockets_key]) == 0  # type: ignore[index]


async def test_one_dead_socket_does_not_hurt_another(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    first = await client.ws_connect(WS, headers=auth(secret))
    ident = await generate(first)
    async with client.ws_connect(WS, headers=auth(secret)) as second:
        await second.send_json({"type": "subscribe", "id": ident})
        assert (await frame(second))["type"] == "queued"
        # The first client vanishes without a close handshake.
        first._response.connection.transport.abort()  # type: ignore[union-attr]
        job = await node.claim()
        await node.run(job)
        frames = await until_done(second, ident)
    assert frames[-1]["status"] == "succeeded"
    await first.close()


async def test_silent_client_is_dropped_by_the_heartbeat(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(update={"ws_heartbeat": 0.2})
    client = await aiohttp_client(create_app(settings))
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret), autoping=False) as ws:
        messages = []
        async with asyncio.timeout(5):
            while True:
                message = await ws.receive()
                messages.append(message.type)
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED):
                    break
    assert WSMsgType.PING in messages


async def test_server_shutdown_says_going_away(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    client = await aiohttp_client(create_app(web_settings))
    _, secret = await make_user()
    ws = await client.ws_connect(WS, headers=auth(secret))
    await client.app.shutdown()  # type: ignore[union-attr]
    closing = await ws.receive(timeout=5)
    assert closing.type is WSMsgType.CLOSE
    assert closing.data == aiohttp.WSCloseCode.GOING_AWAY
    await ws.close()


async def test_unreachable_redis_is_an_unavailable_frame(
    client: TestClient, node: NodeDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = await make_user()

    async def down(self: object) -> None:
        raise RedisConnectionError("Connection refused")

    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        with monkeypatch.context() as patch:
            patch.setattr(NodeRegistry, "offers", down)
            await ws.send_json({"type": "generate", "request": SMALL})
            error = await frame(ws)
        assert (error["type"], error["code"]) == ("error", "unavailable")
        assert await generate(ws)  # back to normal on the same socket


# --- regression tests of the review ---------------------------------------


@contextlib.asynccontextmanager
async def app_with(
    aiohttp_client: Any, web_settings: WebSettings, **changes: Any
) -> AsyncIterator[tuple[TestClient, NodeDouble]]:
    """A client of an app with changed settings, and a node double for it."""
    settings = web_settings.model_copy(update=changes)
    client = await aiohttp_client(create_app(settings))
    assert settings.redis_url and settings.database_url
    async with jobs_context(settings.redis_url, settings.database_url) as ctx:
        node = NodeDouble(ctx)
        await node.announce()
        yield client, node


async def next_of(
    ws: aiohttp.ClientWebSocketResponse, kind: str, ident: str | None = None
) -> dict[str, Any]:
    """The next frame of type `kind` (and id `ident`), skipping relayed events."""
    while True:
        data = await frame(ws)
        if data["type"] == kind and (ident is None or data["id"] == ident):
            return data


async def test_relays_per_socket_are_capped(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    async with app_with(aiohttp_client, web_settings, ws_max_relays=2) as (
        client,
        _,
    ):
        _, secret = await make_user()
        async with client.ws_connect(WS, headers=auth(secret)) as ws:
            for _ in range(2):
                await ws.send_json({"type": "generate", "request": SMALL})
                first = (await next_of(ws, "accepted"))["id"]
            # A third would need a third relay: refused before it is stored.
            await ws.send_json({"type": "generate", "request": SMALL})
            error = await next_of(ws, "error")
            assert error["code"] == "rate_limited"
            assert await Generation.all().count() == 2
            extra = await client.post(
                "/api/v1/generations", json=SMALL, headers=auth(secret)
            )
            assert extra.status == 202
            ident = (await extra.json())["id"]
            await ws.send_json({"type": "subscribe", "id": ident})
            error = await next_of(ws, "error", ident)
            assert error["code"] == "rate_limited"
            # The socket stays usable: a cancel ends a relay, making room.
            await ws.send_json({"type": "cancel", "id": first})
            done = await next_of(ws, "done", first)
            assert done["status"] == "cancelled"

            async def subscribed() -> dict[str, Any] | None:
                # The cancelled relay's slot frees once its task has ended.
                await ws.send_json({"type": "subscribe", "id": ident})
                answer = await frame(ws)
                return None if answer["type"] == "error" else answer

            answer = await until(subscribed, 5, "a relay slot")
            assert answer == {
                "type": "queued",
                "id": ident,
                "position": 2,
                "eta_s": None,
                "eta": None,
            }


async def test_sockets_per_user_are_capped_with_a_json_429(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    async with app_with(aiohttp_client, web_settings, ws_max_sockets_per_user=2) as (
        client,
        _,
    ):
        user, secret = await make_user()
        _, other = await make_user()
        first = await client.ws_connect(WS, headers=auth(secret))
        second = await client.ws_connect(WS, headers=auth(secret))
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await client.ws_connect(WS, headers=auth(secret))
        assert caught.value.status == 429
        assert int((caught.value.headers or {})["Retry-After"]) > 0
        refused = await client.get(
            WS,
            headers={
                **auth(secret),
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
            },
        )
        assert refused.status == 429
        assert (await refused.json())["error"]["code"] == "rate_limited"
        # Per user: someone else still gets in.
        async with client.ws_connect(WS, headers=auth(other)) as ws:
            assert await generate(ws)
        # A closed socket gives its slot back.
        await first.close()
        await until(
            lambda: client.app[live_users_key][user.id] < 2,  # type: ignore[index]
            5,
            "the closed socket's slot",
        )
        third = await client.ws_connect(WS, headers=auth(secret))
        await third.close()
        await second.close()


async def test_a_silent_socket_is_closed_once_its_token_is_revoked(
    aiohttp_client: Any, web_settings: WebSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find = live_socket.find_token_by_id
    lookups = []

    async def find(*args: Any, **kwargs: Any) -> Any:
        found = await real_find(*args, **kwargs)
        lookups.append(found)
        return found

    monkeypatch.setattr(live_socket, "find_token_by_id", find)
    async with app_with(aiohttp_client, web_settings, ws_recheck_s=0.2) as (
        client,
        _,
    ):
        user, secret = await make_user()
        async with client.ws_connect(WS, headers=auth(secret)) as ws:
            # A few re-checks pass while the token is valid.
            await until(lambda: len(lookups) >= 2, 10, "two re-checks")
            assert all(lookups)
            await ApiToken.filter(user_id=user.id).update(revoked_at=utcnow())
            # The client sends nothing: the re-check alone ends the socket.
            error = await frame(ws, timeout=5)
            assert (error["type"], error["id"], error["code"]) == (
                "error",
                None,
                "unauthorized",
            )
            closing = await ws.receive(timeout=5)
            assert closing.type is WSMsgType.CLOSE
            assert closing.data == aiohttp.WSCloseCode.POLICY_VIOLATION
        await until(
            lambda: not client.app[live_users_key],  # type: ignore[index]
            5,
            "the socket's user to go",
        )


async def test_web_redis_pools_are_bounded(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(
        update={"redis_max_connections": 7, "live_redis_connections": 5}
    )
    client = await aiohttp_client(create_app(settings))
    assert client.app[redis_key].connection_pool.max_connections == 7
    assert client.app[live_redis_key].connection_pool.max_connections == 5


async def test_image_frames_prefer_the_stored_png(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        ident = await generate(ws)
        await node.run(await node.claim())
        await until_done(ws, ident)
    # The node's copy lingers in Redis; the database has the stored one.
    await node.redis.set(image_key(ident, 0), b"not the stored png")
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        await ws.send_json({"type": "subscribe", "id": ident})
        frames = await until_done(ws, ident)
    [image] = [f for f in frames if f["type"] == "image"]
    stored = await GeneratedImage.get(generation_id=ident, index=0)
    assert base64.b64decode(image["data"]) == await stored_bytes(stored)


async def test_subscribing_again_to_a_finished_generation_sends_nothing_twice(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect(WS, headers=auth(secret)) as ws:
        ident = await generate(ws)
        await node.run(await node.claim())
        first = await until_done(ws, ident)
        assert any(f["type"] == "image" for f in first)
        # Thirty repeats would each have sent the images again.
        for _ in range(30):
            await ws.send_json({"type": "subscribe", "id": ident})
        refusals = [await frame(ws) for _ in range(30)]
        assert {(f["type"], f["code"]) for f in refusals} == {("error", "conflict")}


async def test_a_flooding_socket_is_slowed_and_another_is_not(
    aiohttp_client: Any, web_settings: WebSettings, node: NodeDouble
) -> None:
    settings = web_settings.model_copy(
        update={"ws_messages_per_s": 1.0, "ws_message_burst": 5}
    )
    client = await aiohttp_client(create_app(settings))
    _, secret = await make_user()
    async with (
        client.ws_connect(WS, headers=auth(secret)) as noisy,
        client.ws_connect(WS, headers=auth(secret)) as quiet,
    ):
        for _ in range(20):
            await noisy.send_json({"type": "subscribe", "id": str(uuid.uuid4())})
        answers = []
        while len(answers) < 6:
            answers.append(await frame(noisy))
        codes = [a.get("code") for a in answers]
        assert codes[:5] == ["not_found"] * 5  # the burst is handled
        assert codes[5] == "rate_limited"  # then it is told to slow down, once
        # The other socket of the same user is unaffected.
        await quiet.send_json({"type": "subscribe", "id": str(uuid.uuid4())})
        assert (await frame(quiet))["code"] == "not_found"
