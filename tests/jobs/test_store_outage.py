"""An S3 image store that stalls or goes away while jobs stores a batch's
results: the results wait (in Redis, retried like a database outage) and are
stored once the store is back, none lost, none stored twice.

moto's S3 server, behind a TCP proxy the test pauses (a store answering
slowly) and stops (a store that is down)."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from arq.worker import Retry

from jobs.email_sender import send_due_emails
from jobs.resources import resources_of
from jobs.results import store_result
from sdapi.contract.names import IMAGE_TTL_S, image_key
from sdapi.contract.payloads import GenerationParams
from sdapi.contract.status import Status, Tier
from sdapi.db.connection import open_database
from sdapi.db.models import (
    GeneratedImage,
    Generation,
    OutboxEmail,
    OutboxStatus,
    utcnow,
)
from sdapi.devtools.accounts import make_user
from sdapi.devtools.mailsink import mail_sink, read_messages
from sdapi.devtools.s3_server import S3_ENV, MotoServer
from sdapi.infra.object_store import result_object_key
from tests.image_support import stored_bytes
from tests.jobs.conftest import queued_job
from tests.node_double import NodeDouble, jobs_context
from tests.pausable_proxy import TcpProxy
from tests.support import until

# The store's deadline in these tests: a stalled store costs each try this.
STORE_TIMEOUT_S = 2.0
PARAMS = GenerationParams(
    prompt="a lighthouse",
    width=64,
    height=64,
    steps=2,
    guidance_scale=7.0,
    seed=99,
    num_images=1,
    scheduler="euler",
)


@dataclass
class Outage:
    node: NodeDouble
    proxy: TcpProxy
    bucket: str
    server: MotoServer


@pytest.fixture
async def outage(
    clean_db: str,
    clean_redis: str,
    s3_server: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Outage]:
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    proxy = TcpProxy("127.0.0.1", s3_server.port)
    await proxy.start()
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/images?endpoint=http://{proxy.address}&region=us-east-1"
    try:
        async with (
            open_database(clean_db),
            jobs_context(
                clean_redis,
                clean_db,
                storage_url=url,
                storage_timeout=STORE_TIMEOUT_S,
            ) as ctx,
        ):
            yield Outage(NodeDouble(ctx), proxy, bucket, s3_server)
    finally:
        proxy.resume()
        await proxy.stop()


async def refused_within(outage: Outage, payload: dict[str, object]) -> float:
    """store_result asks arq to retry; how long it took to find out."""
    started = time.monotonic()
    with pytest.raises(Retry):
        await store_result(outage.node.ctx, payload)
    return time.monotonic() - started


async def test_a_batch_stored_while_the_store_stalls_then_stops_waits_for_it(
    outage: Outage,
) -> None:
    node = outage.node
    user = (await make_user(premium=False)).user
    jobs = [
        await queued_job(user, PARAMS, tier=Tier.NORMAL, deadline_s=3600)
        for _ in range(3)
    ]
    made = {job.generation_id: await node.images(job) for job in jobs}
    payloads = [
        node.result(
            job, Status.SUCCEEDED, [info for info, _ in made[job.generation_id]]
        )
        for job in jobs
    ]
    # The first result of the batch goes in while the store answers.
    assert await store_result(node.ctx, payloads[0]) == "succeeded"

    # The store stalls: each try gives up at its deadline, nothing is marked
    # succeeded without its image, and the node's PNG keeps its full TTL
    # (shortened here to see it renewed).
    second = image_key(jobs[1].generation_id, 0)
    await node.redis.expire(second, 60)
    outage.proxy.pause()
    assert await refused_within(outage, payloads[1]) < STORE_TIMEOUT_S * 3 + 2
    assert (await Generation.get(id=jobs[1].generation_id)).status is Status.QUEUED
    assert await node.redis.ttl(second) > IMAGE_TTL_S - 60

    # The store is down: refused at once.
    outage.proxy.resume()
    await outage.proxy.stop()
    assert await refused_within(outage, payloads[2]) < STORE_TIMEOUT_S * 3 + 2
    assert not await GeneratedImage.filter(
        generation_id__in=[job.generation_id for job in jobs[1:]]
    ).exists()
    assert await OutboxEmail.all().count() == 1

    # Back: the retries store everything once, from the copies Redis kept.
    await outage.proxy.start()
    for payload in payloads[1:]:
        assert await store_result(node.ctx, payload) == "succeeded"
    assert await store_result(node.ctx, payloads[1]) == "already final"
    keys = outage.server.keys(outage.bucket)
    assert keys == sorted(
        f"images/{result_object_key(job.generation_id, 0)}" for job in jobs
    )
    for job in jobs:
        row = await GeneratedImage.get(generation_id=job.generation_id, index=0)
        assert row.store.startswith(f"s3://{outage.bucket}/images/")
        assert await stored_bytes(row) == made[job.generation_id][0][1]
        generation = await Generation.get(id=job.generation_id)
        assert generation.status is Status.SUCCEEDED
    assert await OutboxEmail.all().count() == 3


async def test_a_stalled_store_never_holds_the_generation_row_lock(
    outage: Outage,
) -> None:
    """While a write waits on the store, the row is not locked: a cancel (or
    any other writer) goes through at once."""
    node = outage.node
    user = (await make_user(premium=False)).user
    job = await queued_job(user, PARAMS, tier=Tier.NORMAL, deadline_s=3600)
    made = await node.images(job)
    payload = node.result(job, Status.SUCCEEDED, [info for info, _ in made])
    outage.proxy.pause()
    storing = asyncio.create_task(store_result(node.ctx, payload))
    await until(lambda: outage.proxy.connections > 0, 10, "the write to reach S3")
    async with asyncio.timeout(STORE_TIMEOUT_S / 2):
        await Generation.filter(id=job.generation_id).update(deadline=utcnow())
    assert not storing.done()
    with pytest.raises(Retry):
        await storing


async def test_an_email_whose_images_cannot_be_read_waits_for_the_store(
    outage: Outage, tmp_path: Path
) -> None:
    """The email of a stored result, sent while the store is down, goes back
    to the outbox untried (not a failed attempt) and goes out with its PNG
    once the store answers."""
    node = outage.node
    user = (await make_user(premium=False)).user
    job = await queued_job(user, PARAMS, tier=Tier.NORMAL, deadline_s=3600)
    made = await node.images(job)
    payload = node.result(job, Status.SUCCEEDED, [info for info, _ in made])
    assert await store_result(node.ctx, payload) == "succeeded"
    [email_row] = await OutboxEmail.all()
    folder = tmp_path / "mail"
    with mail_sink(folder) as smtp_url:
        resources = resources_of(node.ctx)
        resources = dataclasses.replace(
            resources,
            settings=resources.settings.model_copy(update={"smtp_url": smtp_url}),
        )
        await outage.proxy.stop()
        await send_due_emails(resources)
        row = await OutboxEmail.get(id=email_row.id)
        assert (row.status, row.attempts) == (OutboxStatus.PENDING, 0)
        assert row.last_error and "image store" in row.last_error
        assert read_messages(folder) == []

        await outage.proxy.start()
        await send_due_emails(resources)
        assert (await OutboxEmail.get(id=email_row.id)).status is OutboxStatus.SENT
        [raw] = read_messages(folder)
    message = email.message_from_bytes(
        raw.replace(b"\r\n", b"\n"), policy=email.policy.default
    )
    [png] = [part.get_content() for part in message.iter_attachments()]
    assert png == made[0][1]
