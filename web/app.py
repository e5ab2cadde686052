"""The web application factory and the resources it opens and closes."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.resources
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp_jinja2
import jinja2
import swagger_ui_bundle
from aiohttp import web
from aiohttp_session import session_middleware
from prometheus_client import CollectorRegistry
from redis.asyncio import BlockingConnectionPool, Redis

from sdapi.contract.names import WEB_SERVICE
from sdapi.db.connection import open_database
from sdapi.db.image_store import ImageStores
from sdapi.db.outbox import mail_templates
from sdapi.infra.consul import consul_errors, open_consul
from sdapi.infra.deadline import Deadline
from sdapi.infra.queue import create_queue_pool
from sdapi.infra.registry import CONSUL_WAIT_S, NodeRegistry
from web.appkeys import (
    Probes,
    background_key,
    clock_key,
    database_key,
    decoders_key,
    live_redis_key,
    mail_templates_key,
    metrics_key,
    openapi_key,
    passwords_key,
    readiness_key,
    redis_deadline_key,
    redis_key,
    registry_key,
    settings_key,
    stores_key,
)
from web.background import Background
from web.decoders import DecodePool
from web.errors import error_middleware
from web.headers import add_security_headers
from web.live_socket import install_live, revocations_ctx
from web.metrics import install_metrics, metrics_middleware
from web.openapi import ApiRoutes
from web.openapi_document import build_openapi
from web.passwords import Passwords
from web.routes import route_tables
from web.sessions import AppRedisStorage
from web.settings import WebSettings
from web.throttle import Clock

log = logging.getLogger(__name__)

API_DESCRIPTION = (
    "Stable Diffusion as an API. Premium accounts get images at request time "
    "(WebSocket progress, download, email); normal accounts' requests run later "
    "in batches and are emailed. Authenticate with `Authorization: Bearer <token>` "
    "from `POST /api/v1/auth/signin`."
)
# How long a WebSocket relay waits for a free connection of its pool before
# it retries its read (seconds).
LIVE_POOL_WAIT_S = 10
LIVE_CONNECT_TIMEOUT_S = 2
# How long background work may still run when the app stops (seconds).
BACKGROUND_DRAIN_S = 10


def create_app(settings: WebSettings) -> web.Application:
    """Build the app for resolved `settings` (URLs and secret key filled in)."""
    if not settings.database_url or not settings.redis_url or not settings.secret_key:
        raise ValueError(
            "create_app needs resolved settings (see WebSettings.resolved)"
        )
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[settings_key] = settings
    app[metrics_key] = CollectorRegistry()
    app[readiness_key] = Probes()
    app[passwords_key] = Passwords(
        secret_key=settings.secret(),
        rounds=settings.bcrypt_rounds,
        concurrency=settings.bcrypt_concurrency,
    )
    app[clock_key] = Clock()
    install_metrics(app)
    install_live(app)
    app.on_response_prepare.append(add_security_headers)
    app.middlewares.extend(
        [
            # Outermost: it counts the status the client got, errors included.
            metrics_middleware,
            error_middleware,
            redis_deadline_middleware,
            session_middleware(
                AppRedisStorage(
                    app, max_age=settings.session_ttl, secure=settings.secure_cookies
                )
            ),
        ]
    )
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("web", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
    )
    app[mail_templates_key] = mail_templates()
    app.cleanup_ctx.extend(
        [
            database_ctx,
            stores_ctx,
            redis_ctx,
            registry_ctx,
            revocations_ctx,
            decoders_ctx,
            background_ctx,
        ]
    )
    tables: list[ApiRoutes] = route_tables()
    for table in tables:
        table.add_to(app)
    app[openapi_key] = build_openapi(
        tables,
        title="sdapi",
        version=importlib.metadata.version("sdapi"),
        description=API_DESCRIPTION,
        server_url=settings.base_url,
    )
    app.router.add_static("/docs/assets", swagger_ui_bundle.swagger_ui_path)
    # The playground's scripts and stylesheet (package data of `web`).
    app.router.add_static("/static", str(importlib.resources.files("web") / "static"))
    return app


@web.middleware
async def redis_deadline_middleware(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """One budget for all of a request's Redis work, from its start: a stalled
    Redis costs a request SDAPI_REDIS_TIMEOUT, not that per command it makes."""
    request[redis_deadline_key] = Deadline(request.app[settings_key].redis_timeout)
    return await handler(request)


async def decoders_ctx(app: web.Application) -> AsyncIterator[None]:
    """The threads that decode uploads, sized by the settings."""
    settings = app[settings_key]
    pool = DecodePool(
        workers=settings.decode_workers,
        per_user=settings.decode_per_user,
        wait_s=settings.decode_wait,
    )
    app[decoders_key] = pool
    try:
        yield
    finally:
        await pool.close()


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    """Tortoise, initialised once for the process."""
    settings = app[settings_key]
    async with open_database(
        settings.database_url or "", deadline_s=settings.db_timeout
    ) as ctx:
        app[database_key] = ctx
        yield


async def stores_ctx(app: web.Application) -> AsyncIterator[None]:
    """The image stores (opened on first use), closed with the app."""
    settings = app[settings_key]
    stores = ImageStores(settings.storage_url, timeout_s=settings.storage_timeout)
    app[stores_key] = stores
    try:
        yield
    finally:
        await stores.close()


async def background_ctx(app: web.Application) -> AsyncIterator[None]:
    """Tasks requests leave running; last in the list, so they drain while the
    database and Redis are still open."""
    background = Background()
    app[background_key] = background
    yield
    await background.close(drain_s=BACKGROUND_DRAIN_S)


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Redis clients: one for requests (queues, events, sessions,
    throttling), one for the WebSocket relays' blocking reads; both bounded."""
    settings = app[settings_key]
    url = settings.redis_url or ""
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_queue_pool(
            url,
            max_connections=settings.redis_max_connections,
            deadline_s=settings.redis_timeout,
        )
        stack.push_async_callback(pool.aclose)
        live = Redis(
            connection_pool=BlockingConnectionPool.from_url(
                url,
                max_connections=settings.live_redis_connections,
                timeout=LIVE_POOL_WAIT_S,
                socket_connect_timeout=LIVE_CONNECT_TIMEOUT_S,
            )
        )
        stack.push_async_callback(live.aclose)
        app[redis_key] = pool
        app[live_redis_key] = live
        yield


async def registry_ctx(app: web.Application) -> AsyncIterator[None]:
    """Where healthy GPU nodes are found (watched in the background); registers
    this replica in Consul."""
    settings = app[settings_key]
    async with contextlib.AsyncExitStack() as stack:
        consul = watch = None
        if settings.consul_url:
            consul = await stack.enter_async_context(
                open_consul(settings.consul_url, timeout_s=settings.consul_timeout)
            )
            # A blocking query holds its call open for up to `wait` (+1/16).
            watch = await stack.enter_async_context(
                open_consul(settings.consul_url, timeout_s=CONSUL_WAIT_S * 1.25 + 5)
            )
        registry = NodeRegistry(
            app[redis_key],
            consul,
            configured_models=settings.models,
            known_for_s=settings.known_model_ttl,
        )
        await stack.enter_async_context(registry.watching(watch))
        app[registry_key] = registry
        if consul is not None:
            await stack.enter_async_context(_registered(consul, settings))
        yield


@contextlib.asynccontextmanager
async def _registered(consul: object, settings: WebSettings) -> AsyncIterator[None]:
    import consul as consul_module

    host = settings.advertised_host
    service_id = f"{WEB_SERVICE}-{host}-{settings.port}"
    check = consul_module.Check.http(
        f"http://{host}:{settings.port}/readyz",
        interval="10s",
        timeout="2s",
        deregister="1m",
    )
    agent = consul.agent  # type: ignore[attr-defined]
    await agent.service.register(
        WEB_SERVICE,
        service_id=service_id,
        address=host,
        port=settings.port,
        check=check,
    )
    log.info("registered %s in Consul as %s", WEB_SERVICE, service_id)
    try:
        yield
    finally:
        try:
            await agent.service.deregister(service_id)
        except consul_errors() as exc:
            # Consul reaps it once its check has failed for a minute anyway.
            log.warning("could not deregister %s from Consul: %s", service_id, exc)
