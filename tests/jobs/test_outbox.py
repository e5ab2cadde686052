"""The outbox sender against real PostgreSQL and an aiosmtpd server."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from tortoise.transactions import in_transaction

from jobs import email_sender as outbox
from jobs.email_sender import (
    JITTER,
    claim_due,
    database_now,
    send_due_emails,
    send_round,
)
from jobs.resources import JobsResources
from jobs.settings import JobsSettings
from jobs.smtp import message_id
from sdapi.contract.status import Status
from sdapi.db.models import (
    GeneratedImage,
    Generation,
    OutboxEmail,
    OutboxStatus,
    utcnow,
)
from sdapi.db.outbox import queue_email
from sdapi.devtools.accounts import make_user
from sdapi.devtools.mailsink import free_port, mail_sink, read_messages
from sdapi.infra.backoff import backoff_s
from sdapi.infra.object_store import result_object_key
from sdapi.infra.settings import SettingsError
from tests.image_support import write_image
from tests.jobs.conftest import make_generation


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A running mail sink: its smtp:// URL and the folder it writes to."""
    folder = tmp_path / "mail"
    with mail_sink(folder) as url:
        yield url, folder


def with_settings(res: JobsResources, **changes: Any) -> JobsResources:
    """The same resources with some settings changed."""
    settings = res.settings.model_copy(update=changes)
    return dataclasses.replace(res, settings=settings)


async def write_email(
    n: int = 0, *, to: str = "reader@example.org", **extra: Any
) -> OutboxEmail:
    async with in_transaction():
        await queue_email(
            dedupe_key=f"test:{n}",
            to_address=to,
            subject=f"Message {n}",
            text_body=f"Plain text {n}\n",
            html_body=f"<p>HTML {n}</p>",
            **extra,
        )
    return await OutboxEmail.get(dedupe_key=f"test:{n}")


def parse(raw: bytes) -> EmailMessage:
    # Mail travels with CRLF line ends; read it as a mail client would.
    message = email.message_from_bytes(
        raw.replace(b"\r\n", b"\n"), policy=email.policy.default
    )
    assert isinstance(message, EmailMessage)
    return message


async def make_due() -> None:
    """Pretend the backoff has passed for every pending row."""
    await OutboxEmail.filter(status=OutboxStatus.PENDING).update(
        next_attempt_at=utcnow() - timedelta(seconds=1)
    )


async def test_sends_a_due_email_as_text_and_html(
    jobs_resources: JobsResources, sink: tuple[str, Path]
) -> None:
    url, folder = sink
    res = with_settings(
        jobs_resources, smtp_url=url, mail_from="sdapi <noreply@sdapi.example>"
    )
    row = await write_email(1)
    await send_due_emails(res)

    [raw] = read_messages(folder)
    message = parse(raw)
    assert message["From"] == "sdapi <noreply@sdapi.example>"
    assert message["To"] == "reader@example.org"
    assert message["Subject"] == "Message 1"
    assert message["Message-ID"] == f"<outbox.{row.id}@sdapi.example>"
    assert message["Message-ID"] == message_id(row.id, "noreply@sdapi.example")
    assert message["Date"]
    assert message["Auto-Submitted"] == "auto-generated"
    assert message.get_content_type() == "multipart/alternative"
    text, html = message.get_body(("plain",)), message.get_body(("html",))
    assert text is not None
    assert html is not None
    assert text.get_content() == "Plain text 1\n"
    assert html.get_content().strip() == "<p>HTML 1</p>"

    sent = await OutboxEmail.get(id=row.id)
    assert sent.status is OutboxStatus.SENT
    assert sent.attempts == 1
    assert sent.sent_at is not None
    assert sent.last_error is None

    # Nothing is due any more: another round sends nothing.
    await send_due_emails(res)
    assert len(read_messages(folder)) == 1


async def test_generation_email_carries_its_pngs_and_records_emailed_at(
    jobs_resources: JobsResources, sink: tuple[str, Path]
) -> None:
    url, folder = sink
    res = with_settings(jobs_resources, smtp_url=url)
    user = (await make_user(premium=False)).user
    generation = await make_generation(user, num_images=2, status=Status.SUCCEEDED)
    pngs = [b"\x89PNG\r\n\x1a\n" + os.urandom(3000) for _ in range(2)]
    for index, png in enumerate(pngs):
        written = await write_image(result_object_key(generation.id, index), png)
        await GeneratedImage.create(
            generation=generation,
            index=index,
            seed=index,
            width=64,
            height=64,
            sha256=hashlib.sha256(png).hexdigest(),
            store=written.store,
            object_key=written.object_key,
            size=written.size,
        )
    row = await write_email(2, to=user.email, generation=generation)
    await send_due_emails(res)

    [raw] = read_messages(folder)
    message = parse(raw)
    assert message.get_content_type() == "multipart/mixed"
    body = message.get_body(("plain",))
    assert body is not None
    assert body.get_content() == "Plain text 2\n"
    attachments = list(message.iter_attachments())
    assert [part.get_content_type() for part in attachments] == ["image/png"] * 2
    assert [part.get_filename() for part in attachments] == [
        f"sdapi-{generation.id}-0.png",
        f"sdapi-{generation.id}-1.png",
    ]
    assert [part.get_content() for part in attachments] == pngs

    assert (await OutboxEmail.get(id=row.id)).status is OutboxStatus.SENT
    emailed = await Generation.get(id=generation.id)
    assert emailed.emailed_at is not None


async def test_smtp_down_for_a_while_fails_nothing_and_sends_each_once(
    jobs_resources: JobsResources, tmp_path: Path
) -> None:
    port = free_port()
    res = with_settings(
        jobs_resources,
        smtp_url=f"smtp://127.0.0.1:{port}",
        outbox_backoff_base=2.0,
        smtp_retry_max=60.0,
        outbox_max_attempts=2,
        smtp_timeout=5.0,
    )
    rows = [await write_email(n) for n in range(25)]

    # Nobody listens: one try of the server, then the round ends.
    before = time.monotonic()
    assert await send_round(res) == 0
    state = res.smtp_backoff
    assert state.failures == 1
    assert 1.7 <= state.retry_at - before <= 2.5  # base * 2^0, minus jitter
    for row in await OutboxEmail.all():
        assert row.status is OutboxStatus.PENDING
        assert row.attempts == 0
        assert row.claimed_at is None
    # The claimed rows say why they wait; the server was tried once.
    noted = await OutboxEmail.filter(last_error__not_isnull=True)
    assert len(noted) == outbox.BATCH_SIZE
    assert all("connect" in (row.last_error or "").lower() for row in noted)

    # While the server is known to be down, rounds do not even try it.
    assert await send_round(res) == 0
    assert state.failures == 1

    # Many more failed tries than outbox_max_attempts: still nothing fails.
    for failures in range(2, 8):
        state.retry_at = 0.0
        await send_round(res)
        assert state.failures == failures
    assert 60 * 0.9 <= backoff_s(7, base=2.0, cap=60.0, jitter=JITTER) <= 60
    statuses = await OutboxEmail.all().values_list("status", "attempts")
    assert set(statuses) == {(OutboxStatus.PENDING, 0)}

    # The server comes up on that port: every email goes, once.
    folder = tmp_path / "mail"
    with mail_sink(folder, port=port):
        state.retry_at = 0.0
        assert await send_round(res) == len(rows)
        assert await send_round(res) == 0
    subjects = sorted(parse(raw)["Subject"] for raw in read_messages(folder))
    assert subjects == sorted(f"Message {n}" for n in range(25))
    assert state.failures == 0
    for row in await OutboxEmail.all():
        assert (row.status, row.attempts) == (OutboxStatus.SENT, 1)


async def test_a_blackholed_server_costs_one_timeout_per_round(
    jobs_resources: JobsResources,
) -> None:
    # Accepts connections (the kernel's backlog) but never says hello.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(50)
        port = silent.getsockname()[1]
        res = with_settings(
            jobs_resources, smtp_url=f"smtp://127.0.0.1:{port}", smtp_timeout=0.5
        )
        for n in range(5):
            await write_email(n)
        started = time.monotonic()
        await send_round(res)
        took = time.monotonic() - started
    assert took < 2.0, took
    for row in await OutboxEmail.all():
        assert (row.status, row.attempts) == (OutboxStatus.PENDING, 0)
        assert row.last_error


async def test_an_email_the_server_never_took_fails_once_it_is_too_old(
    jobs_resources: JobsResources,
) -> None:
    res = with_settings(
        jobs_resources,
        smtp_url=f"smtp://127.0.0.1:{free_port()}",
        outbox_give_up_after=3600,
    )
    old = await write_email(1)
    young = await write_email(2)
    await OutboxEmail.filter(id=old.id).update(
        created_at=utcnow() - timedelta(seconds=3601)
    )
    await send_round(res)
    gone = await OutboxEmail.get(id=old.id)
    assert (gone.status, gone.attempts) == (OutboxStatus.FAILED, 0)
    assert gone.last_error and "unavailable for too long" in gone.last_error
    waiting = await OutboxEmail.get(id=young.id)
    assert (waiting.status, waiting.attempts) == (OutboxStatus.PENDING, 0)


async def test_an_email_that_cannot_be_built_gives_up_after_the_last_attempt(
    jobs_resources: JobsResources,
    sink: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, folder = sink
    res = with_settings(jobs_resources, smtp_url=url, outbox_max_attempts=2)

    async def broken(row: OutboxEmail, *, mail_from: str, stores: Any) -> Any:
        raise ValueError("a bug in building the message")

    monkeypatch.setattr(outbox, "compose", broken)
    row = await write_email(4)
    await send_due_emails(res)
    retried = await OutboxEmail.get(id=row.id)
    assert (retried.status, retried.attempts) == (OutboxStatus.PENDING, 1)
    await make_due()
    await send_due_emails(res)
    failed = await OutboxEmail.get(id=row.id)
    assert (failed.status, failed.attempts) == (OutboxStatus.FAILED, 2)
    assert failed.last_error and "a bug in building" in failed.last_error
    await make_due()
    await send_due_emails(res)
    assert (await OutboxEmail.get(id=row.id)).attempts == 2
    assert read_messages(folder) == []


class Stalling:
    """An SMTP server that takes the message and then never answers."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # The stall is what is tested: longer than the client's SMTP timeout.
        await asyncio.sleep(30)
        return "250 OK"


async def test_a_stalled_delivery_is_cut_off_before_anyone_takes_it_over(
    jobs_resources: JobsResources,
) -> None:
    controller = Controller(Stalling(), hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        res = with_settings(
            jobs_resources,
            smtp_url=f"smtp://127.0.0.1:{controller.port}",
            smtp_timeout=20,
            outbox_send_timeout=0.5,
            outbox_stuck_after=60,
        )
        row = await write_email(1)
        started = time.monotonic()
        await send_round(res)
        took = time.monotonic() - started
    finally:
        controller.stop()
    assert took < 5, took
    stalled = await OutboxEmail.get(id=row.id)
    assert (stalled.status, stalled.attempts) == (OutboxStatus.PENDING, 0)
    assert stalled.last_error and "0.5s" in stalled.last_error


def test_the_send_timeout_must_be_under_half_the_stuck_limit() -> None:
    with pytest.raises(SettingsError, match="SDAPI_OUTBOX_SEND_TIMEOUT"):
        JobsSettings.from_env(outbox_send_timeout=150, outbox_stuck_after=300)


class Refusing:
    """An SMTP server that refuses one recipient for good and one for now."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 No such user"
        if address.startswith("busy@"):
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


@pytest.fixture
def refusing_url() -> Iterator[str]:
    controller = Controller(Refusing(), hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield f"smtp://127.0.0.1:{controller.port}"
    finally:
        controller.stop()


async def test_a_permanent_refusal_fails_at_once_a_temporary_one_retries(
    jobs_resources: JobsResources, refusing_url: str
) -> None:
    res = with_settings(jobs_resources, smtp_url=refusing_url)
    gone = await write_email(5, to="nobody@example.org")
    busy = await write_email(6, to="busy@example.org")
    fine = await write_email(7, to="fine@example.org")
    await send_due_emails(res)

    gone = await OutboxEmail.get(id=gone.id)
    assert gone.status is OutboxStatus.FAILED
    assert gone.attempts == 1
    assert gone.last_error
    assert "No such user" in gone.last_error
    busy = await OutboxEmail.get(id=busy.id)
    assert busy.status is OutboxStatus.PENDING
    assert busy.last_error
    assert "Try again later" in busy.last_error
    # One bad recipient does not hold up the others on the same connection.
    assert (await OutboxEmail.get(id=fine.id)).status is OutboxStatus.SENT


async def test_two_senders_at_once_send_each_email_once(
    jobs_resources: JobsResources,
    sink: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, folder = sink
    res = with_settings(jobs_resources, smtp_url=url)
    rows = [await write_email(n) for n in range(50)]

    claims: dict[str, list[Any]] = {}
    real_claim = outbox.claim_due

    async def recording_claim(settings: JobsSettings) -> list[OutboxEmail]:
        claimed = await real_claim(settings)
        task = asyncio.current_task()
        assert task is not None
        claims.setdefault(task.get_name(), []).extend(row.id for row in claimed)
        return claimed

    monkeypatch.setattr(outbox, "claim_due", recording_claim)
    await asyncio.gather(
        asyncio.create_task(send_due_emails(res), name="sender-a"),
        asyncio.create_task(send_due_emails(res), name="sender-b"),
    )

    claimed = [row_id for ids in claims.values() for row_id in ids]
    assert sorted(claimed) == sorted(row.id for row in rows)
    assert set(claims) == {"sender-a", "sender-b"}  # both took a share

    ids = [parse(raw)["Message-ID"] for raw in read_messages(folder)]
    assert len(ids) == 50
    assert len(set(ids)) == 50
    for row in await OutboxEmail.all():
        assert row.status is OutboxStatus.SENT
        assert row.attempts == 1


async def test_claims_skip_rows_another_sender_has_locked(
    jobs_resources: JobsResources,
) -> None:
    first = await write_email(8)
    second = await write_email(9)
    locked = asyncio.Event()
    release = asyncio.Event()

    async def hold_lock() -> None:
        async with in_transaction():
            await OutboxEmail.select_for_update().filter(id=first.id)
            locked.set()
            await release.wait()

    holder = asyncio.create_task(hold_lock())
    await locked.wait()
    try:
        # SKIP LOCKED: no waiting for the other transaction, no double claim.
        before = await database_now()
        claimed = await asyncio.wait_for(claim_due(jobs_resources.settings), 5)
        after = await database_now()
    finally:
        release.set()
        await holder
    assert [row.id for row in claimed] == [second.id]
    # Claim times are the database's clock, the one all senders share.
    stored = await OutboxEmail.get(id=second.id)
    assert stored.claimed_at is not None
    assert before <= stored.claimed_at <= after
    assert (await OutboxEmail.get(id=first.id)).status is OutboxStatus.PENDING
    assert (await OutboxEmail.get(id=second.id)).status is OutboxStatus.SENDING


async def test_a_row_stuck_in_sending_is_taken_over_after_a_while(
    jobs_resources: JobsResources, sink: tuple[str, Path]
) -> None:
    url, folder = sink
    res = with_settings(jobs_resources, smtp_url=url, outbox_stuck_after=60)
    stuck = await write_email(10)
    busy = await write_email(11)
    now = utcnow()
    await OutboxEmail.filter(id=stuck.id).update(
        status=OutboxStatus.SENDING, attempts=1, claimed_at=now - timedelta(seconds=61)
    )
    await OutboxEmail.filter(id=busy.id).update(
        status=OutboxStatus.SENDING, attempts=1, claimed_at=now - timedelta(seconds=5)
    )
    await send_due_emails(res)
    assert [parse(raw)["Subject"] for raw in read_messages(folder)] == ["Message 10"]
    taken = await OutboxEmail.get(id=stuck.id)
    assert taken.status is OutboxStatus.SENT
    assert taken.attempts == 2
    assert (await OutboxEmail.get(id=busy.id)).status is OutboxStatus.SENDING


async def test_non_ascii_addresses_go_out_with_smtputf8(
    jobs_resources: JobsResources, sink: tuple[str, Path]
) -> None:
    url, folder = sink
    res = with_settings(jobs_resources, smtp_url=url)
    row = await write_email(12, to="jürgen@exämple.com")
    await send_due_emails(res)
    assert (await OutboxEmail.get(id=row.id)).status is OutboxStatus.SENT
    [raw] = read_messages(folder)
    assert parse(raw)["To"] == "jürgen@exämple.com"


async def test_without_smtp_nothing_is_claimed(jobs_resources: JobsResources) -> None:
    assert jobs_resources.settings.smtp_url is None
    row = await write_email(13)
    await send_due_emails(jobs_resources)
    waiting = await OutboxEmail.get(id=row.id)
    assert waiting.status is OutboxStatus.PENDING
    assert waiting.attempts == 0


def test_backoff_doubles_up_to_the_cap_with_a_little_jitter() -> None:
    for attempts, full in [(1, 2.0), (2, 4.0), (3, 8.0), (9, 512.0), (10, 600.0)]:
        for _ in range(20):
            delay = backoff_s(attempts, base=2.0, cap=600.0, jitter=JITTER)
            assert full * 0.9 <= delay <= full
    assert backoff_s(10_000, base=2.0, cap=600.0, jitter=JITTER) <= 600.0


async def test_a_busy_recipient_is_retried_past_the_attempt_limit_until_too_old(
    jobs_resources: JobsResources, refusing_url: str
) -> None:
    res = with_settings(
        jobs_resources,
        smtp_url=refusing_url,
        outbox_max_attempts=2,
        outbox_give_up_after=3600,
    )
    busy = await write_email(1, to="busy@example.org")
    for _ in range(4):
        await send_due_emails(res)
        await make_due()
    waiting = await OutboxEmail.get(id=busy.id)
    assert (waiting.status, waiting.attempts) == (OutboxStatus.PENDING, 4)
    await OutboxEmail.filter(id=busy.id).update(
        created_at=utcnow() - timedelta(seconds=3601)
    )
    await send_due_emails(res)
    failed = await OutboxEmail.get(id=busy.id)
    assert (failed.status, failed.attempts) == (OutboxStatus.FAILED, 5)
    assert failed.last_error and "Try again later" in failed.last_error


async def test_a_message_whose_sender_keeps_dying_fails(
    jobs_resources: JobsResources, sink: tuple[str, Path]
) -> None:
    url, folder = sink
    res = with_settings(
        jobs_resources, smtp_url=url, outbox_max_attempts=3, outbox_stuck_after=60
    )
    poison = await write_email(1)
    await OutboxEmail.filter(id=poison.id).update(
        status=OutboxStatus.SENDING,
        attempts=3,
        claimed_at=utcnow() - timedelta(seconds=61),
    )
    await send_due_emails(res)
    failed = await OutboxEmail.get(id=poison.id)
    assert (failed.status, failed.attempts) == (OutboxStatus.FAILED, 3)
    assert failed.last_error and "sender stopped" in failed.last_error
    assert read_messages(folder) == []
