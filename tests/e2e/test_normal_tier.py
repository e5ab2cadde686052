"""The normal tier end to end: web, two jobs workers and a `tiny` GPU node as
real processes, real PostgreSQL, an embedded Valkey this module owns, and an
aiosmtpd server that keeps the emails."""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import io
import json
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from arq.constants import result_key_prefix
from PIL import Image

from sdapi.contract.events import QueuedEvent
from sdapi.contract.names import batch_job_id, batch_queue
from sdapi.contract.status import TERMINAL_STATUSES, Status
from sdapi.db.connection import open_database, truncate_all
from sdapi.db.models import GeneratedImage, Generation, OutboxEmail, OutboxStatus, User
from sdapi.devtools.accounts import make_user
from sdapi.devtools.embedded import EmbeddedValkey
from sdapi.devtools.mailsink import free_port, mail_sink, read_messages
from sdapi.infra.queue import create_queue_pool
from sdapi.infra.streams import read_events
from tests.e2e.conftest import (
    Service,
    Services,
    node_env,
    sdapi_env,
    start_services,
)
from tests.image_support import stored_bytes
from tests.support import until

pytestmark = pytest.mark.slow

MAIL_FROM = "sdapi <noreply@sdapi.test>"
NORMAL_DELAY_S = 2
MAX_BATCH = 4
BATCHES_PER_NODE = 3
NODE_ID = "e2e-node"


class MailServer:
    """aiosmtpd keeping messages in a folder, stoppable and restartable on its port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"smtp://127.0.0.1:{self.port}"
        self._sink: contextlib.AbstractContextManager[str] | None = None

    def start(self) -> None:
        self._sink = mail_sink(self.folder, port=self.port)
        self._sink.__enter__()

    def stop(self) -> None:
        if self._sink is not None:
            self._sink.__exit__(None, None, None)
            self._sink = None

    def clear(self) -> None:
        for path in self.folder.glob("*.eml"):
            path.unlink()

    def messages(self) -> list[EmailMessage]:
        return [
            email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[misc]
            for raw in read_messages(self.folder)
        ]


@dataclass
class Stack:
    web_url: str
    redis_url: str
    valkey: EmbeddedValkey
    services: Services
    mail: MailServer

    @property
    def node(self) -> Service:
        return self.services["gpu-node"]


@pytest.fixture(scope="module")
def stack(
    database_url: str, e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("normal-e2e")
    port = free_port()
    web_url = f"http://127.0.0.1:{port}"
    mail = MailServer(root / "mail")
    mail.start()
    services = Services()
    with EmbeddedValkey(root / "valkey") as valkey:
        common: dict[str, object] = {
            "database_url": database_url,
            "redis_url": valkey.url,
            "data_dir": root / "data",
            "secret_key": "e2e-secret-key",
            "public_url": web_url,
        }
        services.add(
            Service(
                "web",
                "web",
                sdapi_env(
                    **common,
                    host="127.0.0.1",
                    port=port,
                    normal_delay=NORMAL_DELAY_S,
                    bcrypt_rounds=4,
                    premium_max_in_flight=20,
                ),
                root,
            )
        )
        for name in ("jobs-1", "jobs-2"):
            services.add(
                Service(
                    name,
                    "jobs",
                    sdapi_env(
                        **common,
                        smtp_url=mail.url,
                        mail_from=MAIL_FROM,
                        # Far above a loaded machine's slowest answer: a reply
                        # after the timeout is sent again (at least once), and
                        # this module checks that each email goes out once.
                        smtp_timeout=30,
                        dispatch_interval=0.3,
                        # Longer than it takes to submit a test's requests, so
                        # requests sent together are batched together.
                        dispatch_window=3,
                        dispatch_batches_per_node=BATCHES_PER_NODE,
                        reconcile_interval=1,
                        # Lost work is noticed within seconds, not a minute.
                        queued_check_after=3,
                        outbox_interval=0.3,
                        outbox_backoff_base=1,
                        outbox_backoff_max=4,
                        # A server back up is noticed within seconds.
                        smtp_retry_max=2,
                    ),
                    root,
                )
            )
        node = node_env(
            common,
            e2e_model_dir,
            NODE_ID,
            gpu_max_batch=MAX_BATCH,
            # A SIGKILLed node's batch is claimed again after 2 s.
            gpu_job_lease_s=2,
            gpu_announce_every_s=1,
            gpu_preview_every=0,
        )
        services.add(Service("gpu-node", "gpu-node", node, root))
        try:
            start_services(services, web_url, valkey.url)
            yield Stack(web_url, valkey.url, valkey, services, mail)
        finally:
            services.stop()
            mail.stop()


class E2E:
    """A test's view of the stack: HTTP, the database, Redis, the mailbox."""

    def __init__(self, stack: Stack, http: aiohttp.ClientSession, redis: Any):
        self.stack = stack
        self.http = http
        self.redis = redis

    async def submit(self, auth: dict[str, str], **fields: Any) -> dict[str, Any]:
        body = {"prompt": "a lighthouse", "width": 64, "height": 64, **fields}
        async with self.http.post(
            "/api/v1/generations", json=body, headers=auth
        ) as response:
            data: dict[str, Any] = await response.json()
            assert response.status == 202, data
            return data

    async def png(self, auth: dict[str, str], generation_id: str) -> bytes:
        async with self.http.get(
            f"/api/v1/generations/{generation_id}/images/0", headers=auth
        ) as response:
            assert response.status == 200
            return await response.read()

    async def finished(self, ids: list[str], timeout: float = 90) -> list[Generation]:
        """Wait until every generation is final; the rows, in `ids` order."""

        async def check() -> list[Generation] | None:
            rows = {str(r.id): r for r in await Generation.filter(id__in=ids)}
            if all(rows[i].status in TERMINAL_STATUSES for i in ids):
                return [rows[i] for i in ids]
            return None

        return await until(check, timeout, "generations to finish", self.stack.services)

    async def mails(self, count: int, timeout: float = 60) -> list[EmailMessage]:
        """Wait for at least `count` messages in the mailbox."""

        async def check() -> list[EmailMessage] | None:
            messages = self.stack.mail.messages()
            return messages if len(messages) >= count else None

        return await until(check, timeout, f"{count} emails", self.stack.services)

    async def all_sent(self, ids: list[str], timeout: float = 60) -> None:
        """Wait until the outbox has sent every email of `ids` and holds none
        it could still send: from then on no copy of them can arrive."""

        async def check() -> bool:
            rows = await OutboxEmail.filter(generation_id__in=ids)
            return len(rows) == len(ids) and all(
                row.status is OutboxStatus.SENT for row in rows
            )

        await until(check, timeout, "every email sent", self.stack.services)

    async def idle(self) -> None:
        """Wait until the GPU queues are empty (nothing left for the next test)."""

        async def check() -> bool:
            return not await self.redis.zcard(batch_queue("tiny"))

        await until(check, 60, "an empty batch queue", self.stack.services)


@pytest.fixture
async def e2e(stack: Stack, database_url: str) -> AsyncIterator[E2E]:
    await truncate_all(database_url)
    stack.mail.clear()
    async with contextlib.AsyncExitStack() as exits:
        await exits.enter_async_context(open_database(database_url, pool_size=2))
        pool = await create_queue_pool(stack.redis_url)
        exits.push_async_callback(pool.aclose)
        http = await exits.enter_async_context(
            aiohttp.ClientSession(base_url=stack.web_url)
        )
        helper = E2E(stack, http, pool)
        yield helper
        await helper.idle()


# --- emails and PNGs ---------------------------------------------------------

REQUEST_ID = re.compile(r"Request id: ([0-9a-f-]{36})")


def mail_generation(message: EmailMessage) -> str:
    """The generation an email is about (from its text part)."""
    text = message.get_body(("plain",))
    assert text is not None
    found = REQUEST_ID.search(text.get_content())
    assert found, text.get_content()
    return found.group(1)


def attached_pngs(message: EmailMessage) -> list[bytes]:
    return [
        part.get_content()
        for part in message.iter_attachments()
        if part.get_content_type() == "image/png"
    ]


def png_manifest(data: bytes) -> dict[str, Any]:
    """The parameters a node wrote into the PNG's text chunks."""
    with Image.open(io.BytesIO(data)) as image:
        chunks = dict(image.text)  # type: ignore[attr-defined]
    manifest: dict[str, Any] = json.loads(chunks["sdapi"])
    manifest["parameters"] = chunks["parameters"]
    return manifest


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()


def assert_same_image(batched: bytes, alone: bytes) -> None:
    """The same picture: same seeds, same noise, same denoising.

    A batched pipeline call runs the same maths as a single one, but the CPU
    kernels sum in another order for another batch size, so a rare 8-bit value
    may round one level apart (measured: at most 1 of 12,288 values, by 1).
    """
    left, right = pixels(batched), pixels(alone)
    assert len(left) == len(right)
    diffs = [abs(x - y) for x, y in zip(left, right, strict=True) if x != y]
    assert max(diffs, default=0) <= 1, f"{len(diffs)} values differ"
    assert len(diffs) <= len(left) // 200, f"{len(diffs)} values differ"


def by_generation(messages: list[EmailMessage]) -> dict[str, list[EmailMessage]]:
    found: dict[str, list[EmailMessage]] = {}
    for message in messages:
        found.setdefault(mail_generation(message), []).append(message)
    return found


# --- the tests -----------------------------------------------------------------


async def test_twelve_requests_run_as_four_batches_and_are_emailed(
    e2e: E2E, stack: Stack
) -> None:
    users = [await make_user(premium=False) for _ in range(3)]
    submitted = []
    for i in range(12):
        user, auth = users[i % 3].user, users[i % 3].headers
        data = await e2e.submit(
            auth, prompt=f"harbour at dusk {i}", seed=1000 + i, steps=2 + i % 2
        )
        assert data["status"] == "scheduled"
        submitted.append((user, data))
    ids = [data["id"] for _, data in submitted]

    rows = await e2e.finished(ids)
    assert [row.status for row in rows] == [Status.SUCCEEDED] * 12
    # 2 parameter groups x 2 chunks of at most 4 images, each run once.
    batches = Counter(row.batch_id for row in rows)
    assert sorted(batches.values()) == [2, 2, 4, 4]
    assert {row.attempts for row in rows} == {1}
    for batch_id in batches:
        assert await e2e.redis.exists(result_key_prefix + batch_job_id(batch_id, 1))
    for row in rows:
        queued = [
            e
            for _, e in await read_events(e2e.redis, row.id)
            if isinstance(e, QueuedEvent)
        ]
        assert len(queued) == 1  # dispatched once, by one of the two workers

    messages = await e2e.mails(12)
    await e2e.all_sent(ids)
    mails = by_generation(stack.mail.messages())
    assert sorted(mails) == sorted(ids)
    for user, data in submitted:
        [message] = mails[data["id"]]
        assert message["To"] == user.email
        assert message["From"] == MAIL_FROM
        assert message.get_body(("html",)) is not None
        [png] = attached_pngs(message)
        manifest = png_manifest(png)
        assert manifest["seed"] == data["request"]["seed"]
        assert manifest["prompt"] == data["request"]["prompt"]
        assert f"Seed: {data['request']['seed']}" in manifest["parameters"]
        # The signed link in the email works without logging in.
        text = message.get_body(("plain",))
        assert text is not None
        link = re.search(r"(http://\S+/images/0\?\S+)", text.get_content())
        assert link, text.get_content()
        async with aiohttp.ClientSession() as anonymous:
            async with anonymous.get(link.group(1)) as response:
                assert response.status == 200
                assert await response.read() == png
    assert len(messages) == 12
    for row in await Generation.filter(id__in=ids):
        assert row.emailed_at is not None

    # Each batched image equals the same request run alone (premium, no batch).
    premium = (await make_user(premium=True)).headers
    for _, data in submitted:
        request = data["request"]
        alone = await e2e.submit(
            premium,
            prompt=request["prompt"],
            seed=request["seed"],
            steps=request["steps"],
            guidance_scale=request["guidance_scale"],
            scheduler=request["scheduler"],
        )
        [row] = await e2e.finished([alone["id"]])
        assert row.status is Status.SUCCEEDED
        batched = await GeneratedImage.get(generation_id=data["id"], index=0)
        assert_same_image(
            await stored_bytes(batched), await e2e.png(premium, alone["id"])
        )


async def test_a_premium_request_starts_before_the_queued_batches(
    e2e: E2E, stack: Stack
) -> None:
    users = [await make_user(premium=False) for _ in range(2)]
    normal = [
        await e2e.submit(users[i % 2].headers, seed=i, steps=50, num_images=2)
        for i in range(10)
    ]
    normal_ids = [data["id"] for data in normal]

    async def queue_full() -> bool:
        depth = await e2e.redis.zcard(batch_queue("tiny"))
        running = await Generation.filter(status=Status.RUNNING).exists()
        return depth >= BATCHES_PER_NODE and running

    await until(queue_full, 30, "a full batch queue", stack.services)
    premium = (await make_user(premium=True)).headers
    accepted = await e2e.submit(premium, seed=99, steps=2)
    [done] = await e2e.finished([accepted["id"]], timeout=60)
    assert done.status is Status.SUCCEEDED and done.started_at is not None

    # Let a batch that waited when the premium request came start, then stop.
    async def waited_batch_started() -> bool:
        return await Generation.filter(
            id__in=normal_ids, started_at__gt=done.created_at
        ).exists()

    await until(waited_batch_started, 60, "the next batch", stack.services)
    for i, data in enumerate(normal):
        async with e2e.http.delete(
            f"/api/v1/generations/{data['id']}", headers=users[i % 2].headers
        ) as response:
            assert response.status == 204
    rows = await e2e.finished(normal_ids)
    later = [r for r in rows if r.started_at and r.started_at > done.created_at]
    assert later
    assert all(done.started_at <= r.started_at for r in later if r.started_at)


async def test_emails_wait_for_the_smtp_server_and_go_out_once(
    e2e: E2E, stack: Stack
) -> None:
    stack.mail.stop()
    try:
        made = await make_user(premium=False)
        user, auth = made.user, made.headers
        ids = [(await e2e.submit(auth, seed=i))["id"] for i in range(3)]
        rows = await e2e.finished(ids)
        assert {row.status for row in rows} == {Status.SUCCEEDED}

        async def tried() -> bool:
            # Tried and handed back: a server that is down costs no attempt.
            outbox = await OutboxEmail.filter(generation_id__in=ids)
            return len(outbox) == 3 and all(
                row.attempts == 0 and row.last_error for row in outbox
            )

        await until(tried, 30, "failed send attempts", stack.services)

        def server_down_tries() -> int:
            return sum(
                stack.services[name].log_text().count("SMTP server unavailable")
                for name in ("jobs-1", "jobs-2")
            )

        # The outage itself is what is tested: SMTP stays down while the
        # workers try it again and again (each try backs off, at most 2 s).
        before = server_down_tries()
        await until(
            lambda: server_down_tries() >= before + 4,
            60,
            "more tries while the server is down",
            stack.services,
        )
    finally:
        stack.mail.start()

    await e2e.mails(3, timeout=30)
    await e2e.all_sent(ids)
    mails = by_generation(stack.mail.messages())
    assert sorted(mails) == sorted(ids)
    assert all(len(copies) == 1 for copies in mails.values())
    for row in await Generation.filter(id__in=ids):
        assert row.emailed_at is not None
    statuses = await OutboxEmail.filter(generation_id__in=ids).values_list(
        "status", flat=True
    )
    assert set(statuses) == {OutboxStatus.SENT}
    assert (await User.get(id=user.id)).email == mails[ids[0]][0]["To"]


async def test_a_batch_survives_its_gpu_node_being_killed(
    e2e: E2E, stack: Stack
) -> None:
    auth = (await make_user(premium=False)).headers
    ids = [(await e2e.submit(auth, seed=i, steps=50))["id"] for i in range(4)]

    async def running() -> bool:
        return await Generation.filter(id__in=ids, status=Status.RUNNING).exists()

    await until(running, 30, "the batch to start", stack.services)
    stack.node.kill()
    killed_mid_batch = not await Generation.filter(
        id__in=ids, status=Status.SUCCEEDED
    ).exists()
    stack.node.start()

    rows = await e2e.finished(ids, timeout=120)
    assert [row.status for row in rows] == [Status.SUCCEEDED] * 4
    assert killed_mid_batch
    assert len({row.batch_id for row in rows}) == 1
    await e2e.mails(4)
    await e2e.all_sent(ids)
    mails = by_generation(stack.mail.messages())
    assert sorted(mails) == sorted(ids)
    assert all(len(copies) == 1 for copies in mails.values())


async def test_a_cancelled_item_leaves_the_rest_of_its_batch(
    e2e: E2E, stack: Stack
) -> None:
    auth = (await make_user(premium=False)).headers
    stack.node.signal(signal.SIGSTOP)
    try:
        ids = [(await e2e.submit(auth, seed=i, steps=2))["id"] for i in range(3)]

        async def one_batch() -> bool:
            rows = await Generation.filter(id__in=ids, status=Status.QUEUED)
            return len(rows) == 3 and len({row.batch_id for row in rows}) == 1

        await until(one_batch, 30, "one queued batch", stack.services)
        async with e2e.http.delete(
            f"/api/v1/generations/{ids[1]}", headers=auth
        ) as response:
            assert response.status == 204
    finally:
        stack.node.signal(signal.SIGCONT)

    rows = await e2e.finished(ids)
    assert [row.status for row in rows] == [
        Status.SUCCEEDED,
        Status.CANCELLED,
        Status.SUCCEEDED,
    ]
    assert not await GeneratedImage.filter(generation_id=ids[1]).exists()
    await e2e.mails(2)
    await e2e.all_sent([ids[0], ids[2]])
    assert sorted(by_generation(stack.mail.messages())) == sorted([ids[0], ids[2]])


async def test_a_flushed_redis_loses_no_generation(e2e: E2E, stack: Stack) -> None:
    auth = (await make_user(premium=False)).headers
    # The node takes nothing while paused; its announcement lives on (15 s).
    stack.node.signal(signal.SIGSTOP)
    try:
        ids = [(await e2e.submit(auth, seed=i, steps=2))["id"] for i in range(10)]

        async def all_queued() -> bool:
            return (
                await Generation.filter(id__in=ids, status=Status.QUEUED).count() == 10
            )

        await until(all_queued, 30, "10 queued generations", stack.services)
        assert await e2e.redis.zcard(batch_queue("tiny")) == 3
        await e2e.redis.flushall()
    finally:
        stack.node.signal(signal.SIGCONT)

    rows = await e2e.finished(ids, timeout=60)
    assert [row.status for row in rows] == [Status.SUCCEEDED] * 10
    assert {row.attempts for row in rows} == {2}
    assert await Generation.all().count() == 10
    assert await GeneratedImage.filter(generation_id__in=ids).count() == 10
    await e2e.mails(10)
    await e2e.all_sent(ids)
    mails = by_generation(stack.mail.messages())
    assert sorted(mails) == sorted(ids)
    assert all(len(copies) == 1 for copies in mails.values())


def _noise_png(seed: int) -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _mask_png() -> str:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _rgb(data: bytes | str) -> np.ndarray[Any, Any]:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    with Image.open(io.BytesIO(raw)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


async def test_img2img_and_inpainting_are_batched_apart_and_emailed(
    e2e: E2E, stack: Stack
) -> None:
    auth = (await make_user(premium=False)).headers
    pictures = [_noise_png(seed) for seed in range(3)]
    img2img = [
        await e2e.submit(
            auth, init_image=image, strength=0.5, steps=4, seed=10 + i, prompt="oil"
        )
        for i, image in enumerate(pictures[:2])
    ]
    inpaint = await e2e.submit(
        auth, init_image=pictures[2], mask=_mask_png(), steps=4, seed=20
    )
    text = await e2e.submit(auth, steps=4, seed=30)
    everything = [*img2img, inpaint, text]
    assert {data["status"] for data in everything} == {"scheduled"}
    ids = [data["id"] for data in everything]
    rows = await e2e.finished(ids)
    assert [row.status for row in rows] == [Status.SUCCEEDED] * 4
    # Same mode and strength share a batch; other modes run apart.
    assert rows[0].batch_id == rows[1].batch_id
    assert len({rows[0].batch_id, rows[2].batch_id, rows[3].batch_id}) == 3
    await e2e.mails(4)
    await e2e.all_sent(ids)
    mails = by_generation(stack.mail.messages())
    assert sorted(mails) == sorted(ids)
    [[inpainted]] = [attached_pngs(m) for m in mails[inpaint["id"]]]
    outside = np.ones((64, 64), dtype=bool)
    outside[16:48, 16:48] = False
    assert np.array_equal(_rgb(inpainted)[outside], _rgb(pictures[2])[outside])
    manifest = png_manifest(inpainted)
    assert manifest["mask_sha256"] == inpaint["request"]["mask_sha256"]
    assert manifest["init_image_sha256"] == inpaint["request"]["init_image_sha256"]
    # A batched img2img image equals the same request run alone.
    premium = (await make_user(premium=True)).headers
    request = img2img[1]["request"]
    alone = await e2e.submit(
        premium,
        prompt=request["prompt"],
        seed=request["seed"],
        steps=request["steps"],
        strength=0.5,
        init_image=pictures[1],
    )
    [row] = await e2e.finished([alone["id"]])
    assert row.status is Status.SUCCEEDED
    batched = await GeneratedImage.get(generation_id=img2img[1]["id"], index=0)
    assert_same_image(await stored_bytes(batched), await e2e.png(premium, alone["id"]))


async def test_inputs_lost_with_redis_are_put_back_from_postgres(
    e2e: E2E, stack: Stack
) -> None:
    auth = (await make_user(premium=False)).headers
    stack.node.signal(signal.SIGSTOP)
    try:
        data = await e2e.submit(auth, init_image=_noise_png(5), strength=0.5, steps=2)

        async def queued() -> bool:
            row = await Generation.get(id=data["id"])
            return row.status is Status.QUEUED

        await until(queued, 30, "a queued generation", stack.services)
        await e2e.redis.flushall()
    finally:
        stack.node.signal(signal.SIGCONT)
    [row] = await e2e.finished([data["id"]], timeout=60)
    assert row.status is Status.SUCCEEDED, row.error_message
    assert row.attempts == 2
