"""Webhook deliveries against a real aiohttp receiver: signed (checked with the
`standardwebhooks` reference package), retried, rotated, refused, and kept
across a killed `sdapi jobs` process."""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from standardwebhooks import WebhookVerificationError

from jobs import webhook_sender
from jobs.dispatcher import dispatch_due
from jobs.resources import RESOURCES, JobsResources
from jobs.webhook_sender import send_round
from sdapi.contract.payloads import GenerationJob, GenerationParams
from sdapi.contract.status import Status, Tier
from sdapi.db import webhooks
from sdapi.db.models import Generation, OutboxStatus, User, WebhookDelivery, utcnow
from sdapi.db.webhooks import (
    account_secrets,
    delivery_summary,
    message_id,
    rotate_secret,
)
from sdapi.devtools.accounts import make_user
from sdapi.devtools.mailsink import mail_sink
from sdapi.infra.links import link_is_valid
from tests.e2e.conftest import Service, sdapi_env
from tests.jobs.conftest import announce_node, make_generation
from tests.jobs.webhook_receiver import HANG, receiver
from tests.node_double import NodeDouble
from tests.support import until
from web.schemas.generations import GenerationView
from web.schemas.webhooks import WebhookState

KEY = "test-secret-key"  # the jobs_settings fixture's SDAPI_SECRET_KEY


@pytest.fixture
def node(jobs_resources: JobsResources) -> NodeDouble:
    ctx: dict[str, Any] = {
        "redis": jobs_resources.redis,
        "job_try": 1,
        RESOURCES: jobs_resources,
    }
    return NodeDouble(ctx)


def sender(res: JobsResources, **changes: Any) -> JobsResources:
    """The resources with webhook settings for tests: the receiver is on
    127.0.0.1, backoff is short (tests move rows' next attempt anyway)."""
    settings = res.settings.model_copy(
        update={"webhook_allow_private": True, "webhook_backoff_base": 0.01, **changes}
    )
    return dataclasses.replace(res, settings=settings)


async def webhook_job(
    user: User,
    url: str,
    events: list[str],
    *,
    tier: Tier = Tier.PREMIUM,
    num_images: int = 1,
) -> GenerationJob:
    """A generation with a webhook, as web stores it, and the job a node runs."""
    row = await make_generation(
        user, tier=tier, num_images=num_images, webhook_url=url, webhook_events=events
    )
    params = GenerationParams(
        prompt="a lighthouse",
        width=64,
        height=64,
        steps=2,
        guidance_scale=5.0,
        seed=1,
        num_images=num_images,
        scheduler="euler",
    )
    return GenerationJob(generation_id=row.id, model="tiny", tier=tier, params=params)


async def make_due() -> None:
    """Pretend the backoff has passed for every pending delivery."""
    await WebhookDelivery.filter(status=OutboxStatus.PENDING).update(
        next_attempt_at=utcnow() - timedelta(seconds=1)
    )


async def test_each_event_is_posted_signed_and_verifies(
    jobs_resources: JobsResources, node: NodeDouble
) -> None:
    user, _ = await make_user()
    secret = (await account_secrets(user.id, KEY)).secret
    assert secret.startswith("whsec_")
    async with receiver() as hook:
        job = await webhook_job(
            user, hook.url, ["started", "image", "completed"], num_images=2
        )
        await node.start(job)
        assert await node.result_stored(job, await node.images(job)) == "succeeded"
        assert await send_round(sender(jobs_resources)) == 4
        assert await send_round(sender(jobs_resources)) == 0
    payloads = [received.verify(secret) for received in hook.requests]
    assert Counter(p["type"] for p in payloads) == {
        "generation.started": 1,
        "generation.image": 2,
        "generation.completed": 1,
    }
    assert len({r.headers["webhook-id"] for r in hook.requests}) == 4
    assert {r.headers["Content-Type"] for r in hook.requests} == {"application/json"}
    by_type = {p["type"]: p for p in payloads}
    assert by_type["generation.started"]["data"]["status"] == "running"
    completed = by_type["generation.completed"]["data"]
    assert completed["status"] == "succeeded"
    assert completed["id"] == str(job.generation_id)
    assert {
        p["image"]["index"] for p in payloads if p["type"] == "generation.image"
    } == {0, 1}
    # The payload's data is the Generation of the REST API, field for field.
    for payload in payloads:
        assert set(payload["data"]) == set(GenerationView.model_fields)
        GenerationView.model_validate(payload["data"])
    # Its image URLs are signed links, usable without a token.
    assert len(completed["images"]) == 2
    for image in completed["images"]:
        parts = urlsplit(image["url"])
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        assert parts.netloc == "testserver.local"
        assert link_is_valid(KEY, parts.path, int(query["expires"]), query["signature"])
    rows = await WebhookDelivery.all()
    assert {(row.status, row.attempts) for row in rows} == {(OutboxStatus.SENT, 1)}


async def test_a_failing_receiver_gets_the_same_event_until_it_accepts(
    jobs_resources: JobsResources, node: NodeDouble
) -> None:
    user, _ = await make_user()
    secret = (await account_secrets(user.id, KEY)).secret
    res = sender(jobs_resources)
    async with receiver() as hook:
        hook.script = [500, 503]
        job = await webhook_job(user, hook.url, ["completed"])
        await node.run(job)
        assert await send_round(res) == 1
        row = await WebhookDelivery.get(generation_id=job.generation_id)
        assert (row.status, row.attempts) == (OutboxStatus.PENDING, 1)
        assert row.last_error == "HTTP 500: answer 500"
        assert row.next_attempt_at > row.created_at
        # Not due before its backoff: nothing is sent.
        await WebhookDelivery.filter(id=row.id).update(
            next_attempt_at=utcnow() + timedelta(hours=1)
        )
        assert await send_round(res) == 0
        for _ in range(2):
            await make_due()
            assert await send_round(res) == 1
        await make_due()
        assert await send_round(res) == 0
    assert len(hook.requests) == 3
    assert {r.headers["webhook-id"] for r in hook.requests} == {message_id(row.id)}
    assert len({r.body for r in hook.requests}) == 1
    for received in hook.requests:
        received.verify(secret)
    row = await WebhookDelivery.get(id=row.id)
    assert (row.status, row.attempts) == (OutboxStatus.SENT, 3)
    assert row.delivered_at is not None
    generation = await Generation.get(id=job.generation_id)
    shown = WebhookState.model_validate(await delivery_summary(generation))
    assert shown.url == hook.url
    assert shown.events == ["completed"]
    assert (shown.event, shown.status, shown.attempts) == ("completed", "delivered", 3)
    assert shown.delivered_at is not None
    assert shown.last_error == "HTTP 503: answer 503"


async def test_a_slow_receiver_times_out_and_a_late_answer_means_one_more_post(
    jobs_resources: JobsResources, node: NodeDouble
) -> None:
    user, _ = await make_user()
    res = sender(jobs_resources, webhook_timeout=0.3)
    async with receiver() as hook:
        hook.script = [HANG]
        job = await webhook_job(user, hook.url, ["completed"])
        await node.run(job)
        assert await send_round(res) == 1
        row = await WebhookDelivery.get(generation_id=job.generation_id)
        assert (row.status, row.attempts) == (OutboxStatus.PENDING, 1)
        assert row.last_error == "no answer within 0.3s"
        hook.release.set()  # it answers 200 now, after the deadline
        await make_due()
        assert await send_round(res) == 1
        # Delivered: never sent again.
        await make_due()
        assert await send_round(res) == 0
    assert [r.headers["webhook-id"] for r in hook.requests] == [message_id(row.id)] * 2
    row = await WebhookDelivery.get(id=row.id)
    assert (row.status, row.attempts) == (OutboxStatus.SENT, 2)


async def test_after_a_rotation_both_secrets_sign_for_24_hours(
    jobs_resources: JobsResources, node: NodeDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, _ = await make_user()
    old = (await account_secrets(user.id, KEY)).secret
    res = sender(jobs_resources)
    async with receiver() as hook:
        job = await webhook_job(user, hook.url, ["started", "completed"])
        await node.start(job)
        assert await send_round(res) == 1
        rotated = await rotate_secret(user.id, KEY)
        new = rotated.secret
        assert new != old
        assert rotated.previous == old
        assert rotated.previous_expires_at is not None
        assert await node.result_stored(job, await node.images(job)) == "succeeded"
        # Just before the old secret expires, both sign.
        before = rotated.previous_expires_at - timedelta(seconds=1)
        monkeypatch.setattr(webhook_sender, "utcnow", lambda: before)
        assert await send_round(res) == 1
        # Then the new one only.
        later = await webhook_job(user, hook.url, ["completed"])
        await node.run(later)
        expired = rotated.previous_expires_at + timedelta(seconds=1)
        monkeypatch.setattr(webhook_sender, "utcnow", lambda: expired)
        assert await send_round(res) == 1
    started, completed, last = hook.requests
    assert len(started.headers["webhook-signature"].split(" ")) == 1
    started.verify(old)
    with pytest.raises(WebhookVerificationError):
        started.verify(new)
    assert len(completed.headers["webhook-signature"].split(" ")) == 2
    assert completed.verify(old) == completed.verify(new)
    assert len(last.headers["webhook-signature"].split(" ")) == 1
    last.verify(new)
    with pytest.raises(WebhookVerificationError):
        last.verify(old)


async def test_a_private_target_is_refused_when_connecting(
    jobs_resources: JobsResources, node: NodeDouble
) -> None:
    """A URL accepted while private addresses were allowed, sent by a process
    that does not allow them: no connection, a clear error, no retry."""
    user, _ = await make_user()
    res = sender(jobs_resources, webhook_allow_private=False)
    async with receiver() as hook:
        literal = await webhook_job(user, hook.url, ["completed"])
        named = await webhook_job(
            user, hook.url.replace("127.0.0.1", "localhost"), ["completed"]
        )
        await node.run(literal)
        await node.run(named)
        assert await send_round(res) == 2
        await make_due()
        assert await send_round(res) == 0
    assert hook.requests == []
    by_literal = await WebhookDelivery.get(generation_id=literal.generation_id)
    assert (by_literal.status, by_literal.attempts) == (OutboxStatus.FAILED, 1)
    assert by_literal.last_error == (
        "refused: 127.0.0.1 is not a public address: 127.0.0.1 is a loopback address."
    )
    by_name = await WebhookDelivery.get(generation_id=named.generation_id)
    assert by_name.status is OutboxStatus.FAILED
    assert by_name.last_error is not None
    assert by_name.last_error.startswith("refused: localhost is not a public address")
    assert "loopback" in by_name.last_error


async def test_a_normal_request_reports_its_batch_run(
    jobs_resources: JobsResources, node: NodeDouble
) -> None:
    user, _ = await make_user(premium=False)
    secret = (await account_secrets(user.id, KEY)).secret
    async with receiver() as hook:
        job = await webhook_job(
            user, hook.url, ["started", "completed"], tier=Tier.NORMAL
        )
        await announce_node(jobs_resources, max_batch=4)
        assert await dispatch_due(jobs_resources) == 1
        row = await Generation.get(id=job.generation_id)
        assert row.status is Status.QUEUED
        assert row.batch_id is not None
        await node.start(job)
        assert await node.result_stored(job, await node.images(job)) == "succeeded"
        assert await send_round(sender(jobs_resources)) == 2
    payloads = {r.verify(secret)["type"]: r.payload for r in hook.requests}
    completed = payloads["generation.completed"]["data"]
    assert (completed["tier"], completed["delivery"]) == ("normal", "email")
    assert completed["status"] == "succeeded"
    assert payloads["generation.started"]["data"]["status"] == "running"


async def test_a_killed_jobs_process_loses_no_event(
    jobs_resources: JobsResources, node: NodeDouble, tmp_path: Path
) -> None:
    user, _ = await make_user()
    secret = (await account_secrets(user.id, KEY)).secret
    settings = jobs_resources.settings
    async with receiver() as hook:
        hook.script = [HANG]
        job = await webhook_job(user, hook.url, ["completed"])
        await node.run(job)
        with mail_sink(tmp_path / "mail") as smtp_url:
            env = {
                "database_url": settings.database_url,
                "redis_url": settings.redis_url,
                "secret_key": KEY,
                "smtp_url": smtp_url,
                "data_dir": tmp_path,
                "webhook_allow_private": "true",
            }
            # The first process would wait long for its POST; it is killed first.
            first = Service(
                "jobs", "jobs", sdapi_env(**env, webhook_timeout=20), tmp_path
            )
            first.start()
            try:
                await until(lambda: hook.requests, 60, "the first POST")
            finally:
                first.kill()
            row = await WebhookDelivery.get(generation_id=job.generation_id)
            assert (row.status, row.attempts) == (OutboxStatus.SENDING, 1)
            # The restarted one takes the stuck claim over within a second.
            second = Service(
                "jobs-again",
                "jobs",
                sdapi_env(**env, webhook_stuck_after=1, webhook_timeout=0.4),
                tmp_path,
            )
            second.start()
            try:

                async def delivered() -> bool:
                    found = await WebhookDelivery.get(id=row.id)
                    return found.status is OutboxStatus.SENT

                await until(delivered, 60, "the delivery after the restart")
            finally:
                second.stop()
    assert [r.headers["webhook-id"] for r in hook.requests] == [message_id(row.id)] * 2
    assert hook.requests[1].verify(secret)["data"]["id"] == str(job.generation_id)
    row = await WebhookDelivery.get(id=row.id)
    assert row.attempts == 2


def test_delivery_ids_are_standard_webhooks_message_ids() -> None:
    ident = uuid.uuid4()
    assert message_id(ident) == f"msg_{ident.hex}"


async def test_a_payload_over_the_cap_is_never_sent(
    jobs_resources: JobsResources, node: NodeDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "BODY_MAX_BYTES", 100)
    user, _ = await make_user()
    async with receiver() as hook:
        job = await webhook_job(user, hook.url, ["completed"])
        await node.run(job)
        assert await send_round(sender(jobs_resources)) == 0
    assert hook.requests == []
    row = await WebhookDelivery.get(generation_id=job.generation_id)
    assert (row.status, row.attempts) == (OutboxStatus.FAILED, 0)
    assert row.last_error == "the payload is over 100 bytes"


async def test_a_delivery_its_sender_keeps_dying_on_fails_after_the_give_up_time(
    jobs_resources: JobsResources, node: NodeDouble
) -> None:
    user, _ = await make_user()
    async with receiver() as hook:
        job = await webhook_job(user, hook.url, ["completed"])
        await node.run(job)
        # As a sender that died mid-POST leaves it, a day after the event.
        await WebhookDelivery.filter(generation_id=job.generation_id).update(
            status=OutboxStatus.SENDING,
            attempts=7,
            claimed_at=utcnow() - timedelta(hours=1),
            created_at=utcnow() - timedelta(days=1, seconds=1),
        )
        assert await send_round(sender(jobs_resources)) == 0
    assert hook.requests == []
    row = await WebhookDelivery.get(generation_id=job.generation_id)
    assert (row.status, row.attempts) == (OutboxStatus.FAILED, 7)
    assert row.last_error == "the sender stopped while sending it, on the last attempt"
