"""Typed keys of what the web app holds (opened in `web.app`'s cleanup contexts)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import jinja2
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from tortoise.context import TortoiseContext

from sdapi.db.image_store import ImageStores
from sdapi.infra.deadline import Deadline
from sdapi.infra.queue import QueuePool
from sdapi.infra.registry import NodeRegistry
from web.background import Background
from web.decoders import DecodePool
from web.passwords import Passwords
from web.settings import WebSettings
from web.throttle import Clock

settings_key = web.AppKey("settings", WebSettings)


@dataclass
class Probes:
    """/readyz's dependency probes: the last outcome each, and any still
    running (a stalled dependency's probe ends in the background)."""

    last: dict[str, bool] = field(default_factory=dict)
    pending: dict[str, asyncio.Future[object]] = field(default_factory=dict)


readiness_key = web.AppKey("readiness", Probes)
database_key = web.AppKey("database", TortoiseContext)
# One Redis client (a queue pool) for queues, events, sessions and throttling.
redis_key = web.AppKey("redis", QueuePool)
# A second, bounded client for the WebSocket relays' blocking stream reads.
live_redis_key = web.AppKey("live_redis", Redis)
# Password hashing with the deployment's key, bounded in concurrency.
passwords_key = web.AppKey("passwords", Passwords)
registry_key = web.AppKey("registry", NodeRegistry)
# Where image bytes are (SDAPI_STORAGE_URL, and any store a row still names).
stores_key = web.AppKey("stores", ImageStores)
# The time that throttling counts by (tests move it instead of waiting).
clock_key = web.AppKey("clock", Clock)
metrics_key = web.AppKey("metrics", CollectorRegistry)
# The OpenAPI document, generated once from the route tables.
openapi_key = web.AppKey("openapi", dict[str, Any])
# Every email web writes to the outbox (verification, password reset).
mail_templates_key = web.AppKey("mail_templates", jinja2.Environment)
# Threads that decode uploaded images, with a share per user.
decoders_key = web.AppKey("decoders", DecodePool)
# The request's budget for all its Redis work (SDAPI_REDIS_TIMEOUT in all).
redis_deadline_key = web.RequestKey("redis_deadline", Deadline)
# Work answered before it is done (e.g. the mail a forgotten password asks for).
background_key = web.AppKey("background", Background)
