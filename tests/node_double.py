"""A GPU node's part, played in-process: what a real node writes to Redis.

It announces a node, claims premium jobs from the arq queue, appends
started/progress/image events, stores PNGs at `image_key`, and hands results
to the real `jobs.results` functions, so the web side (REST, WebSocket,
OpenAI) is tested against the same Redis traffic a node produces.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import deserialize_job
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydantic import SecretStr

from jobs.resources import RESOURCES, JobsResources
from jobs.results import mark_started, store_result
from jobs.settings import JobsSettings
from sdapi.contract.events import DoneEvent, ImageEvent, ProgressEvent, StartedEvent
from sdapi.contract.names import IMAGE_TTL_S, image_key, premium_queue, progress_key
from sdapi.contract.nodes import NodeInfo
from sdapi.contract.payloads import (
    ErrorInfo,
    GenerationJob,
    GenerationResult,
    ImageInfo,
    StartedNotice,
)
from sdapi.contract.status import Status
from sdapi.db.image_store import ImageStores
from sdapi.db.models import utcnow
from sdapi.infra.announcements import announce_node
from sdapi.infra.queue import create_queue_pool, deserialize
from sdapi.infra.registry import NodeRegistry
from sdapi.infra.streams import append_done, append_event
from tests.support import until


def node_info(**changes: Any) -> NodeInfo:
    """What a small CPU node serving `tiny` announces (fields overridable)."""
    values: dict[str, Any] = {
        "node_id": "double-1",
        "model": "tiny",
        "device": "cpu",
        "max_batch": 4,
        "default_steps": 4,
        "default_guidance": 5.0,
        "default_scheduler": "euler",
        "default_width": 64,
        "default_height": 64,
        "max_width": 256,
        "max_height": 256,
        "schedulers": ["ddim", "euler", "euler_a"],
    }
    values.update(changes)
    return NodeInfo(**values)


TINY = node_info()


def png_bytes(seed: int, width: int, height: int, prompt: str) -> bytes:
    """A deterministic noise PNG with its parameters in a text chunk."""
    rng = random.Random(seed)
    image = Image.frombytes(
        "RGB",
        (width, height),
        bytes(rng.getrandbits(8) for _ in range(width * height * 3)),
    )
    info = PngInfo()
    info.add_text("parameters", f"{prompt}\nSeed: {seed}, Size: {width}x{height}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class NodeDouble:
    """Claims premium jobs of one model and runs them the way a node would."""

    def __init__(self, ctx: dict[str, Any], info: NodeInfo = TINY) -> None:
        self.ctx = ctx
        self.info = info
        self.redis = ctx["redis"]

    async def announce(self) -> None:
        """Appear in the registry as a healthy node (a Redis announcement)."""
        await announce_node(self.redis, self.info, ttl_s=60)

    async def claim(self, timeout: float = 5.0) -> GenerationJob:
        """The next premium job of the model, taken off its queue."""
        queue = premium_queue(self.info.model)
        ids = await until(
            lambda: self.redis.zrange(queue, 0, 0), timeout, "a premium job"
        )
        job_id = ids[0].decode()
        data = await self.redis.get(job_key_prefix + job_id)
        await self.redis.zrem(queue, job_id)
        await self.redis.set(in_progress_key_prefix + job_id, b"1", ex=60)
        job = deserialize_job(data, deserializer=deserialize)
        return GenerationJob.model_validate(job.args[0])

    async def start(self, job: GenerationJob, load_s: float | None = None) -> None:
        await append_event(
            self.redis,
            job.generation_id,
            StartedEvent(node_id="double-1", load_s=load_s),
        )
        notice = StartedNotice(
            generation_id=job.generation_id, node_id="double-1", started_at=utcnow()
        )
        await mark_started(self.ctx, notice.model_dump(mode="json"))

    async def progress(self, job: GenerationJob, step: int) -> None:
        preview = "data:image/jpeg;base64,/9j/" if step % 2 == 0 else None
        await self.redis.hset(
            progress_key(job.generation_id),
            mapping={"step": step, "total": job.params.steps},
        )
        await append_event(
            self.redis,
            job.generation_id,
            ProgressEvent(step=step, total=job.params.steps, preview=preview),
        )

    async def images(self, job: GenerationJob) -> list[tuple[ImageInfo, bytes]]:
        """Make, store and announce the job's PNGs."""
        made = []
        for index, seed in enumerate(job.params.image_seeds()):
            png = png_bytes(
                seed, job.params.width, job.params.height, job.params.prompt
            )
            info = ImageInfo(
                index=index,
                seed=seed,
                width=job.params.width,
                height=job.params.height,
                sha256=hashlib.sha256(png).hexdigest(),
                size_bytes=len(png),
            )
            await self.redis.set(
                image_key(job.generation_id, index), png, ex=IMAGE_TTL_S
            )
            await append_event(
                self.redis,
                job.generation_id,
                ImageEvent(
                    index=index,
                    seed=seed,
                    width=info.width,
                    height=info.height,
                    sha256=info.sha256,
                ),
            )
            made.append((info, png))
        return made

    def result(
        self,
        job: GenerationJob,
        status: Status,
        images: list[ImageInfo] | None = None,
        error: ErrorInfo | None = None,
    ) -> dict[str, Any]:
        """A `store_result` payload."""
        return GenerationResult(
            generation_id=job.generation_id,
            status=status,
            images=images or [],
            error=error,
            node_id="double-1",
            model=job.model,
            started_at=utcnow(),
            finished_at=utcnow(),
        ).model_dump(mode="json")

    async def run(self, job: GenerationJob) -> str:
        """The whole life of a successful job; returns store_result's outcome."""
        await self.start(job)
        for step in range(1, job.params.steps + 1):
            await self.progress(job, step)
        return await self.result_stored(job, await self.images(job))

    async def result_stored(
        self, job: GenerationJob, made: list[tuple[ImageInfo, bytes]]
    ) -> str:
        """Hand the made images to `store_result`, as the node does at the end."""
        images = [info for info, _ in made]
        return await store_result(self.ctx, self.result(job, Status.SUCCEEDED, images))

    async def fail(self, job: GenerationJob, message: str = "out of memory") -> str:
        await self.start(job)
        error = ErrorInfo(code="out_of_memory", message=message)
        return await store_result(
            self.ctx, self.result(job, Status.FAILED, error=error)
        )


async def announce_done(redis: Any, generation_id: uuid.UUID, status: Status) -> None:
    """Append a `done` the way `jobs` does (tests that skip the store)."""
    await append_done(redis, generation_id, DoneEvent(status=status))


@contextlib.asynccontextmanager
async def jobs_context(
    redis_url: str,
    database_url: str,
    *,
    public_url: str = "http://testserver.local",
    storage_url: str = "postgres",
    storage_timeout: float = 5.0,
) -> AsyncIterator[dict[str, Any]]:
    """An arq ctx like the jobs worker's (the caller has opened the database)."""
    settings = JobsSettings(
        database_url=database_url,
        redis_url=redis_url,
        secret_key=SecretStr("test-secret-key"),
        public_url=public_url,
        storage_url=storage_url,
        storage_timeout=storage_timeout,
    )
    pool = await create_queue_pool(redis_url)
    async with contextlib.AsyncExitStack() as stack:
        stores = ImageStores(settings.storage_url, timeout_s=settings.storage_timeout)
        stack.push_async_callback(stores.close)
        ctx: dict[str, Any] = {"redis": pool, "job_try": 1}
        ctx[RESOURCES] = JobsResources(
            settings=settings,
            redis=pool,
            registry=NodeRegistry(pool),
            stack=stack,
            stores=stores,
        )
        try:
            yield ctx
        finally:
            await pool.aclose()
