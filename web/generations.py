"""Accepting and cancelling generations (REST, WebSocket and OpenAI).

Postgres is the source of truth: a generation is committed before anything
goes to Redis, so a 202 is never lost; if the enqueue after the commit fails,
the reconciler in `jobs` enqueues it once its deadline passes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from aiohttp import web
from redis.exceptions import RedisError
from tortoise.transactions import in_transaction

from sdapi.contract.events import DoneEvent, QueuedEvent
from sdapi.contract.names import (
    generation_job_id,
    premium_queue,
)
from sdapi.contract.payloads import (
    GenerationJob,
    GenerationParams,
)
from sdapi.contract.status import TERMINAL_STATUSES, Status, Tier
from sdapi.contract.webhooks import WebhookEvent
from sdapi.db.connection import mark_inserted, table_name
from sdapi.db.input_images import (
    InputsChanged,
    PreparedInput,
    put_input_data,
    store_inputs,
    write_new_inputs,
)
from sdapi.db.models import Delivery, Generation, InputRole, User, utcnow
from sdapi.db.webhooks import queue_webhook_event
from sdapi.infra.deadline import Deadline
from sdapi.infra.queue import (
    drop_waiting_job,
    enqueue_generation,
    request_cancel,
)
from sdapi.infra.streams import append_done
from web.appkeys import (
    decoders_key,
    redis_key,
    settings_key,
    stores_key,
)
from web.auth import Principal
from web.errors import (
    EmailNotVerified,
    NotFound,
    QuotaExceeded,
    RateLimited,
)
from web.eta import LiveState, place_and_eta
from web.idempotency import IdempotencyClaim, find_replay, record
from web.inputs import Source, check_mask_size, resolve_input
from web.quota import Usage, insert_within_limits, usage
from web.request_resolution import find_offer, resolve_request
from web.schemas import generations as schemas
from web.settings import TierLimits
from web.uploads import CleanImage, Use
from web.webhooks import check_webhook, links

log = logging.getLogger(__name__)

# Retry-After for a premium user at their in-flight limit, in seconds.
IN_FLIGHT_RETRY_S = 5


async def prepare_inputs(
    app: web.Application,
    principal: Principal,
    sources: Mapping[InputRole, Source],
    *,
    num_images: int,
    idempotency: IdempotencyClaim | None = None,
) -> dict[InputRole, CleanImage]:
    """Check and clean a request's inputs with the caller's tier limits, once
    the quota and in-flight limits would let the request through."""
    # As in submit_generation: an unverified account learns nothing else.
    require_verified(principal)
    tier = principal.user.tier_at(utcnow())
    limits = app[settings_key].limits(tier)
    inputs: dict[InputRole, CleanImage] = {}
    if not sources:
        return inputs
    await check_allowance(principal, limits, num_images, idempotency)
    for role, source in sources.items():
        inputs[role] = await resolve_input(
            principal.user,
            source,
            field=role.value,
            use=Use.MASK if role is InputRole.MASK else Use.IMAGE,
            limits=limits,
            decoders=app[decoders_key],
            stores=app[stores_key],
        )
    init = inputs.get(InputRole.INIT_IMAGE)
    mask = inputs.get(InputRole.MASK)
    if init is not None and mask is not None:
        check_mask_size(init, mask)
    return inputs


async def check_allowance(
    principal: Principal,
    limits: TierLimits,
    num_images: int,
    idempotency: IdempotencyClaim | None,
) -> None:
    """The 429 that `submit_generation` would answer for the quota or the
    in-flight limit, asked before a request's images are decoded: decoding
    costs seconds of CPU, a refusal a query. Without the user's lock: the
    check under it at submission stays the one that counts."""
    now = utcnow()
    if idempotency is not None:
        # A retry of an accepted request gets its first answer, spent quota
        # or not (as in submit_generation).
        if await find_replay(principal.user.id, idempotency, now) is not None:
            return
    _check_limits(limits, await usage(principal.user, now), num_images, now)


def _check_limits(
    limits: TierLimits, used: Usage, num_images: int, now: datetime
) -> None:
    if used.images_today + num_images > limits.images_per_day:
        raise QuotaExceeded(
            f"This would exceed your {limits.images_per_day} images per day "
            f"({used.images_today} used).",
            retry_after=_seconds_to_midnight(now),
        )
    if limits.max_in_flight is not None and used.in_flight >= limits.max_in_flight:
        raise RateLimited(
            f"You already have {used.in_flight} requests queued or running "
            f"(at most {limits.max_in_flight}).",
            retry_after=IN_FLIGHT_RETRY_S,
        )


def require_verified(principal: Principal) -> None:
    """403 `email_not_verified` unless the caller's address is proven, whatever
    the tier: anyone can sign up with anyone's address, and premium an operator
    granted to such an account must not pay for work (or mail) either. REST,
    the OpenAI route and the WebSocket all submit through here."""
    if principal.user.email_verified_at is None:
        raise EmailNotVerified(
            "Generating images needs a verified email address: follow the link "
            "we sent you, or ask for a new one at POST /api/v1/auth/verify/resend."
        )


def _seconds_to_midnight(now: datetime) -> int:
    tomorrow = (now + timedelta(days=1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    return int((tomorrow - now).total_seconds()) + 1


async def submit_generation(
    app: web.Application,
    principal: Principal,
    body: schemas.GenerationRequest,
    inputs: Mapping[InputRole, CleanImage] | None = None,
    *,
    deadline: Deadline,
    idempotency: IdempotencyClaim | None = None,
) -> Generation:
    """Validate, store and (premium) enqueue a generation; return the stored row.

    With an idempotency claim seen before, the generation it made comes back
    and nothing else happens (no quota, no enqueue). Its Redis work stays
    within `deadline`: an enqueue cut short is left to the reconciler.
    """
    generation, _ = await submit_and_place(
        app, principal, body, inputs, deadline=deadline, idempotency=idempotency
    )
    return generation


async def submit_and_place(
    app: web.Application,
    principal: Principal,
    body: schemas.GenerationRequest,
    inputs: Mapping[InputRole, CleanImage] | None = None,
    *,
    deadline: Deadline,
    idempotency: IdempotencyClaim | None = None,
    check_token: bool = False,
) -> tuple[Generation, LiveState | None]:
    """`submit_generation`, and the live state a premium enqueue just placed
    it in (its position and estimate, as its `queued` event tells them):
    what the 202 shows without asking Redis again. None when not known.

    `check_token`: the principal was read a while ago (an open WebSocket's);
    its token is checked in the statement that locks the user's row, and
    `CallerChanged` is raised, nothing stored, if the token no longer works
    or the user's row no longer says what the request was resolved with."""
    settings = app[settings_key]
    now = utcnow()
    # Before validation: an unverified account can send nothing, valid or not.
    require_verified(principal)
    tier = principal.user.tier_at(now)
    if idempotency is not None:
        # Before the checks below: a retry gets its first answer even when
        # the quota is spent or the model's nodes are gone since.
        replay = await find_replay(principal.user.id, idempotency, now)
        if replay is not None:
            return replay, None
    inputs = dict(inputs or {})
    await check_webhook(app, body.webhook)
    offer = await find_offer(
        app, body.model, deadline=deadline, own_default=principal.user.default_model
    )
    request = resolve_request(body, offer, tier, app, inputs)
    limits = settings.limits(tier)

    async def create(prepared: Mapping[InputRole, PreparedInput]) -> Generation:
        async with in_transaction() as connection:
            # The user's row lock serialises their concurrent requests, so two
            # of them cannot both take the last slot of the quota.
            if check_token:
                user = await _lock_caller(principal, tier, now)
            else:
                user = await User.select_for_update().get(id=principal.user.id)
            if idempotency is not None:
                # Again under the lock: a concurrent retry may have won the race.
                replay = await find_replay(user.id, idempotency, now)
                if replay is not None:
                    raise _Replayed(replay)
            premium = tier is Tier.PREMIUM
            generation = Generation(
                id=uuid.uuid4(),
                user=user,
                tier=tier,
                status=Status.QUEUED if premium else Status.SCHEDULED,
                delivery=Delivery(request.delivery),
                model=request.model,
                request=request.model_dump(mode="json"),
                width=request.width,
                height=request.height,
                steps=request.steps,
                guidance_scale=request.guidance_scale,
                scheduler=request.scheduler,
                num_images=request.num_images,
                scheduled_for=None
                if premium
                else now + timedelta(seconds=settings.normal_delay),
                queued_at=now if premium else None,
                attempts=1 if premium else 0,
                deadline=now + timedelta(seconds=settings.queued_check_after)
                if premium
                else None,
                webhook_url=request.webhook.url if request.webhook else None,
                webhook_events=list(request.webhook.events) if request.webhook else [],
            )
            # The quota check and the insert in one statement, under the lock.
            added, used = await insert_within_limits(
                connection,
                generation,
                now=now,
                images_per_day=limits.images_per_day,
                max_in_flight=limits.max_in_flight,
            )
            if not added:
                _check_limits(limits, used, request.num_images, now)
                raise AssertionError(f"{used} refused a request within {limits}")
            mark_inserted(generation)
            await store_inputs(user, generation, prepared)
            if idempotency is not None:
                await record(user, idempotency, generation, now)
        return generation

    # New inputs go to the image store before the transaction, never under the
    # user's lock; one the clean-up deleted in between is written on a retry.
    stores = app[stores_key]
    try:
        try:
            generation = await create(
                await write_new_inputs(stores, principal.user.id, inputs)
            )
        except InputsChanged:
            generation = await create(
                await write_new_inputs(stores, principal.user.id, inputs)
            )
    except _Replayed as replayed:
        return replayed.generation, None
    if generation.tier is Tier.PREMIUM:
        placed = await _enqueue_premium(
            app,
            generation,
            request,
            inputs.values(),
            waiting=not offer.available,
            deadline=deadline,
        )
        return generation, placed
    return generation, None


class CallerChanged(Exception):
    """The caller's token stopped working, or their row changed in what a
    request is resolved with, since their principal was read: read it again."""


async def _lock_caller(principal: Principal, tier: Tier, now: datetime) -> User:
    """Lock the caller's row, in one statement with the check that their token
    is live (`web.tokens.live_tokens`), and check that the row still gives the
    tier, verified address and default model the request was resolved with."""
    user = (
        await User.select_for_update(of=(table_name(User),))
        .filter(
            id=principal.user.id,
            tokens__id=principal.token.id,
            tokens__revoked_at=None,
            tokens__expires_at__gt=now,
        )
        .first()
    )
    if (
        user is None
        or user.tier_at(now) is not tier
        or user.email_verified_at is None
        or user.default_model != principal.user.default_model
    ):
        raise CallerChanged(str(principal.token.id))
    return user


class _Replayed(Exception):
    """An idempotent retry found under the user's lock: its first answer."""

    def __init__(self, generation: Generation) -> None:
        super().__init__(str(generation.id))
        self.generation = generation


async def _enqueue_premium(
    app: web.Application,
    generation: Generation,
    request: schemas.ResolvedRequest,
    inputs: Iterable[CleanImage],
    *,
    waiting: bool,
    deadline: Deadline,
) -> LiveState | None:
    redis = app[redis_key]
    job = GenerationJob(
        generation_id=generation.id,
        model=generation.model,
        tier=Tier.PREMIUM,
        params=GenerationParams.from_request(request.model_dump()),
        attempt=generation.attempts,
    )

    async def enqueue() -> LiveState | None:
        # The node fetches the inputs by hash: they are in Redis before the
        # job, from the bytes at hand (the store is read only on re-enqueues).
        await put_input_data(redis, inputs)
        # `queued` goes into the stream before the job exists, so no node can
        # append `started` ahead of it; the jobs ahead of this one (running
        # ones included, as arq keeps them) are those before its fair place.
        owner = str(generation.user_id)
        ahead, eta = await place_and_eta(
            app, generation.model, job.params, owner, deadline
        )
        queued = QueuedEvent(
            position=ahead,
            waiting_for_node=waiting,
            wait_s=None if eta is None else round(eta.wait_s, 1),
            run_s=None if eta is None else round(eta.run_s, 1),
        )
        enqueued = await enqueue_generation(
            redis, job, owner=owner, events=[(generation.id, queued)]
        )
        return LiveState(position=ahead, eta=eta) if enqueued else None

    try:
        return await deadline.run(enqueue())
    except (RedisError, TimeoutError):
        # Committed already: the reconciler enqueues it after its deadline
        # (a job cut short halfway is one it finds not live, as after a
        # Redis error between two of these commands).
        log.warning("enqueue of %s failed; the reconciler will retry", generation.id)
        return None


async def load_own(user: User, generation_id: str) -> Generation:
    """The caller's generation, or 404 (also for other users' ids)."""
    try:
        key = uuid.UUID(generation_id)
    except ValueError:
        raise NotFound("No such generation.") from None
    generation = await Generation.get_or_none(id=key, user_id=user.id)
    if generation is None:
        raise NotFound("No such generation.")
    return generation


async def cancel_generation(app: web.Application, generation: Generation) -> bool:
    """Cancel unless finished; True if this call cancelled it."""
    now = utcnow()
    async with in_transaction():
        # Everything below reads the locked row: `generation` may be stale (a
        # reconciler retry bumps `attempts`, the job id follows it).
        locked = await Generation.select_for_update().get(id=generation.id)
        if locked.status in TERMINAL_STATUSES:
            return False
        was = Status(locked.status)
        locked.status = Status.CANCELLED
        locked.finished_at = now
        locked.deadline = None
        await locked.save(update_fields=["status", "finished_at", "deadline"])
        await queue_webhook_event(locked, WebhookEvent.COMPLETED, links(app))
    redis = app[redis_key]
    try:
        # The node checks this flag before starting and at every step.
        await request_cancel(redis, locked.id)
        if was is Status.QUEUED and locked.tier is Tier.PREMIUM:
            job_id = generation_job_id(locked.id, locked.attempts)
            await drop_waiting_job(redis, premium_queue(locked.model), job_id)
        await append_done(redis, locked.id, DoneEvent(status=Status.CANCELLED))
    except RedisError:
        # Cancelled in the database already: a node that runs it anyway has its
        # result refused, and followers read the ending from the database.
        log.warning("cancel of %s not announced in Redis", locked.id)
    return True


async def delete_finished(generation: Generation) -> bool:
    """Delete a finished generation with its images; False if it has not finished."""
    deleted: int = await Generation.filter(
        id=generation.id, status__in=list(TERMINAL_STATUSES)
    ).delete()
    return deleted > 0
