"""Storing what GPU nodes report: idempotent, forward-only, email when asked."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from arq.worker import Retry

from jobs import results
from jobs.results import ResultRejected, mark_started, store_result
from jobs.settings import JobsSettings
from jobs.worker import build_worker, job_functions
from sdapi.contract.names import (
    IMAGE_TTL_S,
    MARK_STARTED_FUNCTION,
    RESULTS_QUEUE,
    STORE_RESULT_FUNCTION,
    image_key,
    progress_key,
    result_job_id,
    started_job_id,
)
from sdapi.contract.payloads import (
    ErrorInfo,
    GenerationJob,
    GenerationParams,
    GenerationResult,
    StartedNotice,
)
from sdapi.contract.status import Status, Tier
from sdapi.db.connection import open_database
from sdapi.db.models import (
    GeneratedImage,
    Generation,
    OutboxEmail,
    utcnow,
)
from sdapi.devtools.accounts import make_user
from sdapi.infra.queue import create_queue_pool, enqueue, new_worker
from sdapi.infra.streams import read_events
from tests.image_support import stored_bytes
from tests.jobs.conftest import queued_job
from tests.node_double import NodeDouble, jobs_context
from tests.support import until

PARAMS = GenerationParams(
    prompt="a lighthouse at dusk",
    width=64,
    height=64,
    steps=4,
    guidance_scale=5.0,
    seed=1234,
    num_images=2,
    scheduler="euler",
)


@pytest.fixture
async def node(clean_db: str, clean_redis: str) -> AsyncIterator[NodeDouble]:
    async with (
        open_database(clean_db),
        jobs_context(clean_redis, clean_db) as ctx,
    ):
        yield NodeDouble(ctx)


async def dones(node: NodeDouble, job: GenerationJob) -> list[Any]:
    events = await read_events(node.redis, job.generation_id)
    return [event for _, event in events if event.type == "done"]


async def test_a_result_delivered_twice_changes_nothing(node: NodeDouble) -> None:
    user, _ = await make_user()
    job = await queued_job(user, PARAMS)
    made = await node.images(job)
    payload = node.result(job, Status.SUCCEEDED, [info for info, _ in made])
    assert await store_result(node.ctx, payload) == "succeeded"
    first = await Generation.get(id=job.generation_id)
    assert await store_result(node.ctx, payload) == "already final"
    second = await Generation.get(id=job.generation_id)
    assert second.finished_at == first.finished_at
    images = await GeneratedImage.filter(generation_id=job.generation_id).order_by(
        "index"
    )
    assert [(i.index, i.seed) for i in images] == [(0, 1234), (1, 1235)]
    assert [await stored_bytes(i) for i in images] == [png for _, png in made]
    assert len(await dones(node, job)) == 1
    assert await OutboxEmail.all().count() == 0  # delivery is download


async def test_status_only_moves_forward(node: NodeDouble) -> None:
    user, _ = await make_user()
    job = await queued_job(user, PARAMS)
    await node.start(job)
    row = await Generation.get(id=job.generation_id)
    assert row.status is Status.RUNNING
    assert row.started_at is not None
    made = await node.images(job)
    await node.result_stored(job, made)
    # A late or repeated `mark_started` cannot move a finished row back.
    late = StartedNotice(
        generation_id=job.generation_id, node_id="double-1", started_at=utcnow()
    )
    assert await mark_started(node.ctx, late.model_dump(mode="json")) == "unchanged"
    # Nor can a second attempt's different ending.
    error = ErrorInfo(code="out_of_memory", message="no memory")
    failed = node.result(job, Status.FAILED, error=error)
    assert await store_result(node.ctx, failed) == "already final"
    row = await Generation.get(id=job.generation_id)
    assert row.status is Status.SUCCEEDED
    assert row.error_code is None


async def test_a_cancelled_generation_keeps_its_status_and_gets_no_images(
    node: NodeDouble,
) -> None:
    user, _ = await make_user()
    job = await queued_job(user, PARAMS)
    await Generation.filter(id=job.generation_id).update(
        status=Status.CANCELLED, finished_at=utcnow()
    )
    made = await node.images(job)
    assert await node.result_stored(job, made) == "already final"
    row = await Generation.get(id=job.generation_id)
    assert row.status is Status.CANCELLED
    assert await GeneratedImage.filter(generation_id=job.generation_id).count() == 0
    [done] = await dones(node, job)
    assert done.status == "cancelled"


async def test_failure_is_stored_and_announced_with_its_reason(
    node: NodeDouble,
) -> None:
    user, _ = await make_user()
    job = await queued_job(user, PARAMS)
    await node.redis.hset(
        progress_key(job.generation_id), mapping={"step": 2, "total": 4}
    )
    assert await node.fail(job, "the GPU ran out of memory") == "failed"
    row = await Generation.get(id=job.generation_id)
    assert row.status is Status.FAILED
    assert (row.error_code, row.error_message) == (
        "out_of_memory",
        "the GPU ran out of memory",
    )
    [done] = await dones(node, job)
    assert done.status == "failed"
    assert done.error.code == "out_of_memory"
    assert await node.redis.exists(progress_key(job.generation_id)) == 0


async def test_email_delivery_writes_one_email_with_a_signed_link(
    node: NodeDouble,
) -> None:
    user, _ = await make_user(premium=False)
    job = await queued_job(user, PARAMS, tier=Tier.NORMAL)
    made = await node.images(job)
    payload = node.result(job, Status.SUCCEEDED, [info for info, _ in made])
    await store_result(node.ctx, payload)
    await store_result(node.ctx, payload)
    [email] = await OutboxEmail.all()
    assert email.to_address == user.email
    assert email.generation_id == job.generation_id  # type: ignore[attr-defined]
    assert "a lighthouse at dusk" in email.subject
    link = f"http://testserver.local/api/v1/generations/{job.generation_id}/images/0"
    assert link + "?expires=" in email.text_body
    assert "signature=" in email.text_body
    assert email.html_body is not None and "signature=" in email.html_body


async def test_failed_email_delivery_says_why(node: NodeDouble) -> None:
    user, _ = await make_user(premium=False)
    job = await queued_job(user, PARAMS, tier=Tier.NORMAL)
    await node.fail(job, "the prompt could not be encoded")
    [email] = await OutboxEmail.all()
    assert "the prompt could not be encoded" in email.text_body


async def test_cancelled_email_delivery_sends_nothing(node: NodeDouble) -> None:
    user, _ = await make_user(premium=False)
    job = await queued_job(user, PARAMS, tier=Tier.NORMAL)
    assert await store_result(node.ctx, node.result(job, Status.CANCELLED)) == (
        "cancelled"
    )
    assert await OutboxEmail.all().count() == 0


async def test_lost_images_leave_the_row_for_the_reconciler(node: NodeDouble) -> None:
    user, _ = await make_user()
    job = await queued_job(user, PARAMS)
    made = await node.images(job)
    await node.redis.delete(image_key(job.generation_id, 1))
    assert await node.result_stored(job, made) == "images missing"
    row = await Generation.get(id=job.generation_id)
    assert row.status is Status.QUEUED
    assert await dones(node, job) == []


async def test_tampered_images_and_malformed_payloads_are_rejected(
    node: NodeDouble,
) -> None:
    user, _ = await make_user()
    job = await queued_job(user, PARAMS)
    made = await node.images(job)
    await node.redis.set(image_key(job.generation_id, 0), b"not the png")
    with pytest.raises(ResultRejected, match="sha256"):
        await node.result_stored(job, made)
    with pytest.raises(ResultRejected):
        await store_result(node.ctx, {"generation_id": "nope"})
    with pytest.raises(ResultRejected):
        await mark_started(node.ctx, {"generation_id": str(job.generation_id)})
    assert (await Generation.get(id=job.generation_id)).status is Status.QUEUED


async def test_a_result_for_an_unknown_generation_is_dropped(node: NodeDouble) -> None:
    user, _ = await make_user()
    job = await queued_job(user, PARAMS)
    ghost = job.model_copy(update={"generation_id": uuid.uuid4()})
    assert await store_result(node.ctx, node.result(ghost, Status.CANCELLED)) == (
        "unknown generation"
    )


async def test_jobs_enqueued_as_nodes_do_run_on_the_results_queue(
    node: NodeDouble, clean_redis: str
) -> None:
    user, _ = await make_user()
    job = await queued_job(user, PARAMS)
    notice = StartedNotice(
        generation_id=job.generation_id, node_id="double-1", started_at=utcnow()
    )
    made = await node.images(job)
    result = GenerationResult.model_validate(
        node.result(job, Status.SUCCEEDED, [info for info, _ in made])
    )
    pool = node.ctx["redis"]
    # `sdapi.infra.queue.enqueue` is how a node hands work to `jobs`.
    await enqueue(
        pool,
        MARK_STARTED_FUNCTION,
        notice,
        queue=RESULTS_QUEUE,
        job_id=started_job_id(job.generation_id),
    )
    await enqueue(
        pool,
        STORE_RESULT_FUNCTION,
        result,
        queue=RESULTS_QUEUE,
        job_id=result_job_id(job.generation_id),
    )
    worker_pool = await create_queue_pool(clean_redis)
    worker = new_worker(
        job_functions(),
        queue=RESULTS_QUEUE,
        redis_pool=worker_pool,
        ctx=dict(node.ctx),
        burst=True,
        handle_signals=False,
        poll_delay=0.01,
        max_jobs=1,
    )
    try:
        await worker.async_run()
    finally:
        # Not worker.close(): it calls redis-py's deprecated close().
        await worker_pool.aclose()
    assert (worker.jobs_complete, worker.jobs_failed) == (2, 0)
    row = await Generation.get(id=job.generation_id)
    assert row.status is Status.SUCCEEDED


async def terminate_backends(database_url: str, *, pid: int | None = None) -> int:
    """pg_terminate_backend: what a Postgres restart or failover does to sessions.

    Every other session on the test database, or only `pid`.
    """
    admin = await asyncpg.connect(**asyncpg_params(database_url))
    try:
        pids: list[int] = [
            row["pid"]
            for row in await admin.fetch(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND ($1::int IS NULL OR pid = $1::int)",
                pid,
            )
        ]
        for victim in pids:
            await admin.fetchval("SELECT pg_terminate_backend($1)", victim)

        async def gone() -> bool:
            # pg_terminate_backend only signals: the sessions end, and their
            # clients read the news, a moment later. Waiting on the server
            # also lets this loop run, so the pool's connections see it idle,
            # which is the case under test (not a query racing the kill).
            left = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])",
                pids,
            )
            return int(left) == 0

        if pid is None:
            await until(gone, timeout=10, what="the terminated sessions to end")
        return len(pids)
    finally:
        await admin.close()


def asyncpg_params(database_url: str) -> dict[str, Any]:
    from tortoise.backends.base.config_generator import expand_db_url

    creds = expand_db_url(database_url)["credentials"]
    return {
        key: creds.get(key) for key in ("host", "port", "user", "password", "database")
    }


async def test_a_query_cut_off_by_a_terminated_session_is_retried(
    node: NodeDouble, clean_db: str
) -> None:
    user, _ = await make_user()
    job = await queued_job(user, PARAMS)
    notice = StartedNotice(
        generation_id=job.generation_id, node_id="double-1", started_at=utcnow()
    ).model_dump(mode="json")
    admin = await asyncpg.connect(**asyncpg_params(clean_db))
    try:
        # Hold the row, so mark_started's UPDATE is mid-query when its session
        # is terminated (as a restart or failover of Postgres does).
        holding = admin.transaction()
        await holding.start()
        await admin.execute(
            f'SELECT 1 FROM "{Generation._meta.db_table}" WHERE id = $1 FOR UPDATE',  # noqa: S608
            job.generation_id,
        )
        started = asyncio.create_task(mark_started(node.ctx, notice))
        blocked = await until(
            lambda: admin.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE "
                "datname = current_database() AND wait_event_type = 'Lock'"
            ),
            10,
            "mark_started to wait for the row lock",
        )
        await admin.execute("SELECT pg_terminate_backend($1)", blocked)
        with pytest.raises(Retry):
            await started
        await holding.rollback()
    finally:
        await admin.close()
    # Postgres is fine again: the retry goes through.
    assert await mark_started(node.ctx, notice) == "running"


async def test_idle_sessions_terminated_under_the_pool_do_no_harm(
    node: NodeDouble, clean_db: str
) -> None:
    user, _ = await make_user()
    job = await queued_job(user, PARAMS)
    made = await node.images(job)
    payload = node.result(job, Status.SUCCEEDED, [info for info, _ in made])
    assert await terminate_backends(clean_db) >= 1
    assert await store_result(node.ctx, payload) == "succeeded"


async def test_a_session_terminated_inside_the_transaction_is_retried(
    node: NodeDouble, clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, _ = await make_user(premium=False)
    job = await queued_job(user, PARAMS, tier=Tier.NORMAL)
    made = await node.images(job)
    payload = node.result(job, Status.SUCCEEDED, [info for info, _ in made])
    real_persist = results._persist
    terminated = []

    async def persist_after_termination(*args: Any) -> None:
        if not terminated:
            [row] = await Generation._meta.db.execute_query_dict(
                "SELECT pg_backend_pid() AS pid"
            )
            terminated.append(await terminate_backends(clean_db, pid=row["pid"]))
        await real_persist(*args)

    monkeypatch.setattr(results, "_persist", persist_after_termination)
    with pytest.raises(Retry):
        await store_result(node.ctx, payload)
    assert terminated == [1]
    row = await Generation.get(id=job.generation_id)
    assert row.status is Status.QUEUED  # rolled back, nothing half-written
    assert await OutboxEmail.all().count() == 0
    assert await store_result(node.ctx, payload) == "succeeded"
    assert await OutboxEmail.all().count() == 1


async def test_results_are_kept_as_long_as_their_images_for_the_reconciler() -> None:
    settings = JobsSettings(database_url=None, redis_url="redis://127.0.0.1:1/0")
    # Built inside the loop (arq binds to it); nothing connects until it runs.
    worker = build_worker(settings, handle_signals=False)
    assert worker.keep_result_s == IMAGE_TTL_S
    store = worker.functions[STORE_RESULT_FUNCTION]
    # At the 60 s cap of the backoff, about half an hour of outage.
    assert store.max_tries is not None and store.max_tries >= 30
