"""The jobs worker's resources in-process, on the test database and Redis."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from jobs.resources import JobsResources
from jobs.settings import JobsSettings
from sdapi.contract.nodes import NodeInfo
from sdapi.contract.payloads import GenerationJob, GenerationParams
from sdapi.contract.status import Status, Tier
from sdapi.db.connection import open_database
from sdapi.db.image_store import ImageStores
from sdapi.db.models import Delivery, Generation, User, utcnow
from sdapi.infra import announcements as nodes
from sdapi.infra.queue import create_queue_pool
from sdapi.infra.registry import NodeRegistry
from tests.node_double import node_info

MODEL = "tiny"


@pytest.fixture
def jobs_settings(clean_db: str, clean_redis: str, tmp_path: Path) -> JobsSettings:
    """Settings of an in-process jobs worker (periodic tasks are called by hand)."""
    return JobsSettings(
        database_url=clean_db,
        redis_url=clean_redis,
        data_dir=tmp_path,
        secret_key=SecretStr("test-secret-key"),
        public_url="http://testserver.local",
        dispatch_batches_per_node=2,
        # Whatever is due goes at once (tests of the window set their own).
        dispatch_window=0,
        queued_check_after=30,
        generation_max_attempts=3,
    )


def make_resources(
    settings: JobsSettings, stack: contextlib.AsyncExitStack
) -> Callable[[], Awaitable[JobsResources]]:
    """A factory of resources sharing `stack` (several "processes" in one test)."""

    async def build() -> JobsResources:
        redis = await create_queue_pool(settings.redis_url or "")
        stack.push_async_callback(redis.aclose)
        # No cache: a test announces a node and dispatches right away.
        registry = NodeRegistry(redis, cache_s=0)
        stores = ImageStores(settings.storage_url, timeout_s=settings.storage_timeout)
        stack.push_async_callback(stores.close)
        return JobsResources(
            settings=settings,
            redis=redis,
            registry=registry,
            stack=stack,
            stores=stores,
        )

    return build


@pytest.fixture
async def jobs_resources(jobs_settings: JobsSettings) -> AsyncIterator[JobsResources]:
    """What `jobs.worker.on_startup` builds, without the arq worker around it."""
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(open_database(jobs_settings.database_url or ""))
        yield await make_resources(jobs_settings, stack)()


async def announce_node(
    res: JobsResources, *, max_batch: int, node_id: str = "node-a", model: str = MODEL
) -> NodeInfo:
    """Announce a healthy node in Redis, as a GPU node without Consul does."""
    info = node_info(
        node_id=node_id,
        model=model,
        max_batch=max_batch,
        max_width=128,
        max_height=128,
        schedulers=["euler", "ddim"],
    )
    await nodes.announce_node(res.redis, info)
    return info


async def make_generation(
    user: User,
    *,
    prompt: str = "a lighthouse",
    seed: int = 1,
    width: int = 64,
    height: int = 64,
    steps: int = 2,
    guidance_scale: float = 5.0,
    scheduler: str = "euler",
    num_images: int = 1,
    model: str = MODEL,
    tier: Tier = Tier.NORMAL,
    scheduled_for: datetime | None = None,
    **columns: Any,
) -> Generation:
    """A row as `web.generations.submit_generation` stores it (normal: due now)."""
    request = {
        "prompt": prompt,
        "negative_prompt": "",
        "model": model,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "num_images": num_images,
        "scheduler": scheduler,
        "delivery": "email" if tier is Tier.NORMAL else "download",
    }
    now = utcnow()
    fields: dict[str, Any] = {
        "status": Status.SCHEDULED,
        "scheduled_for": scheduled_for or now - timedelta(seconds=1),
        "attempts": 0,
    }
    if tier is Tier.PREMIUM:
        fields = {
            "status": Status.QUEUED,
            "scheduled_for": None,
            "queued_at": now,
            "attempts": 1,
            "deadline": now + timedelta(seconds=30),
        }
    fields.update(columns)
    return await Generation.create(
        id=uuid.uuid4(),
        user=user,
        tier=tier,
        delivery=Delivery(request["delivery"]),
        model=model,
        request=request,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        num_images=num_images,
        **fields,
    )


async def queued_job(
    user: User,
    params: GenerationParams,
    *,
    tier: Tier = Tier.PREMIUM,
    deadline_s: float = 30.0,
) -> GenerationJob:
    """A queued generation row of `params` and the job a node would have
    claimed for it (a normal one as the dispatcher sent it in a batch)."""
    now = utcnow()
    generation = await make_generation(
        user,
        prompt=params.prompt,
        seed=params.seed,
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        scheduler=params.scheduler,
        num_images=params.num_images,
        tier=tier,
        status=Status.QUEUED,
        queued_at=now,
        attempts=1,
        deadline=now + timedelta(seconds=deadline_s),
    )
    return GenerationJob(
        generation_id=generation.id, model=MODEL, tier=tier, params=params
    )
