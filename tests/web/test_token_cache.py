"""Cached bearer tokens stop working at once when revoked, on every replica."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from sdapi.contract.names import USERS_CHANGED_CHANNEL
from sdapi.db.models import ApiToken, utcnow
from sdapi.devtools.accounts import auth, make_user
from sdapi.infra.pubsub import Listener
from tests.support import until
from web.app import create_app
from web.appkeys import redis_key
from web.settings import WebSettings
from web.token_cache import TokenCache, token_cache_key
from web.tokens import find_token, hash_secret

ME = "/api/v1/me"


async def _replicas(
    aiohttp_client: Any, settings: WebSettings, count: int = 2
) -> list[TestClient]:
    clients = [await aiohttp_client(create_app(settings)) for _ in range(count)]
    for client in clients:
        cache = client.server.app[token_cache_key]
        await until(lambda cache=cache: cache.ready, what="the cache subscribed")
    return clients


def _cached(client: TestClient) -> int:
    return len(client.server.app[token_cache_key])


async def test_a_token_revoked_on_one_replica_stops_at_once_on_the_other(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    one, two = await _replicas(aiohttp_client, web_settings)
    _, secret = await make_user()
    for client in (one, two):
        assert (await client.get(ME, headers=auth(secret))).status == 200
        assert _cached(client) == 1
    [token] = await ApiToken.filter(token_hash=hash_secret(secret))
    # A second token of the same user stays cached and working.
    _, other = await make_user()
    assert (await two.get(ME, headers=auth(other))).status == 200
    revoked = await one.delete(f"/api/v1/tokens/{token.id}", headers=auth(secret))
    assert revoked.status == 204
    for client in (one, two):
        answer = await client.get(ME, headers=auth(secret))
        assert answer.status == 401
        assert (await answer.json())["error"]["code"] == "unauthorized"
    assert (await two.get(ME, headers=auth(other))).status == 200


async def test_a_signout_on_one_replica_stops_the_token_on_the_other(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    one, two = await _replicas(aiohttp_client, web_settings)
    _, secret = await make_user()
    assert (await two.get(ME, headers=auth(secret))).status == 200
    assert (await one.post("/api/v1/auth/signout", headers=auth(secret))).status == 204
    assert (await two.get(ME, headers=auth(secret))).status == 401


async def test_premium_redeemed_on_one_replica_shows_on_the_other(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    one, two = await _replicas(aiohttp_client, web_settings)
    user, secret = await make_user(premium=False)
    before = await (await two.get(ME, headers=auth(secret))).json()
    assert before["tier"] == "normal" and _cached(two) == 1
    # As the redeem route does after it changed the row.
    user.premium_until = utcnow().replace(year=utcnow().year + 1)
    await user.save(update_fields=["premium_until"])
    await one.server.app[redis_key].publish(
        USERS_CHANGED_CHANNEL, str(user.id).encode()
    )
    await until(lambda: _cached(two) == 0, what="the user's tokens dropped")
    after = await (await two.get(ME, headers=auth(secret))).json()
    assert after["tier"] == "premium"


async def test_a_lookup_that_raced_a_revocation_is_not_kept(
    client: TestClient, web_settings: WebSettings
) -> None:
    assert web_settings.redis_url
    redis = Redis.from_url(web_settings.redis_url)
    listener = Listener(redis, {})
    cache = TokenCache(listener, size=2, ttl_s=60)
    # Not subscribed: nothing is kept or served (a revocation could be missed).
    _, secret = await make_user()
    token = await find_token(secret)
    assert token is not None
    cache.put("a", token, cache.mark())
    assert len(cache) == 0 and cache.get("a") is None
    listener.subscriptions += 1
    listener.subscribed.set()
    # Read before a revocation was heard, stored after it: not kept.
    mark = cache.mark()
    cache.forget_token("some other token")
    cache.put("a", token, mark)
    assert cache.get("a") is None
    cache.put("a", token, cache.mark())
    assert cache.get("a") is token
    # Bounded: the least recently used goes first.
    cache.put("b", token, cache.mark())
    cache.get("a")
    cache.put("c", token, cache.mark())
    assert cache.get("b") is None and cache.get("a") is token
    # A resubscription (broadcasts lost in between) empties it.
    listener.subscriptions += 1
    assert cache.get("a") is None and len(cache) == 0
    await redis.aclose()


async def test_an_entry_outlives_neither_its_age_nor_its_token(
    client: TestClient, web_settings: WebSettings
) -> None:
    assert web_settings.redis_url
    redis = Redis.from_url(web_settings.redis_url)
    listener = Listener(redis, {})
    listener.subscribed.set()
    _, secret = await make_user()
    token = await find_token(secret)
    assert token is not None
    aged = TokenCache(listener, size=10, ttl_s=0.05)
    aged.put("a", token, aged.mark())
    assert aged.get("a") is token
    await until(lambda: aged.get("a") is None, what="the entry aged out")
    fresh = TokenCache(listener, size=10, ttl_s=60)
    fresh.put("a", token, fresh.mark())
    token.expires_at = utcnow()
    assert fresh.get("a") is None
    await redis.aclose()
