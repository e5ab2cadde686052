"""A generation's live state from Redis: queue position, progress, and its
estimated time (`sdapi.infra.eta`), in at most two pipelined round trips
within the request's Redis budget."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from redis.exceptions import RedisError

from sdapi.contract.names import (
    batch_job_id,
    batch_queue,
    generation_job_id,
    premium_queue,
    progress_key,
    speed_key,
)
from sdapi.contract.payloads import GenerationParams
from sdapi.contract.status import Status, Tier
from sdapi.db.models import Generation
from sdapi.infra.clock import utcnow
from sdapi.infra.deadline import Deadline
from sdapi.infra.eta import (
    Ahead,
    Eta,
    NodeState,
    Speeds,
    Work,
    queued_eta,
    running_eta,
)
from sdapi.infra.fair_order import places_ahead_reply, queue_places_ahead
from sdapi.infra.queue import QueuedJob, QueueOrder
from sdapi.infra.registry import NodesUnknown
from web.appkeys import redis_key, registry_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """A running generation's latest step, as its node wrote it."""

    step: int
    total: int
    # Seconds the node spent on its first `step` steps (its own clock).
    elapsed_s: float | None


@dataclass(frozen=True)
class LiveState:
    """What Redis adds to a generation's row; None where it does not know."""

    position: int | None = None
    progress: Progress | None = None
    eta: Eta | None = None


def _progress(raw: Mapping[bytes, bytes]) -> Progress | None:
    try:
        step, total = int(raw[b"step"]), int(raw[b"total"])
    except (KeyError, ValueError):
        return None
    elapsed = None
    if b"t0" in raw and b"at" in raw:
        try:
            elapsed = max(0.0, float(raw[b"at"]) - float(raw[b"t0"]))
        except ValueError:
            elapsed = None
    return Progress(step, total, elapsed)


async def _nodes(
    app: web.Application, model: str, deadline: Deadline
) -> list[NodeState]:
    """The healthy nodes serving `model` ([] when they cannot be listed)."""
    try:
        infos = await deadline.run(app[registry_key].nodes())
    except (NodesUnknown, RedisError):
        # Without the nodes there is no estimate; the position still counts.
        return []
    return [NodeState(i.node_id, i.loaded) for i in infos if i.model == model]


def _premium_generation(job_id: str) -> str | None:
    # `generation_job_id`: the generation's id, then ":<attempt>" after a retry.
    head = job_id.split(":", 1)[0]
    return None if job_id.startswith("batch:") else head


def _ahead(
    jobs: list[QueuedJob], progress: Mapping[str, Progress | None]
) -> list[Ahead]:
    found = []
    for job in jobs:
        work = Work.of_payload(job.payload)
        if work is None:
            continue  # gone meanwhile (done), or not a generation
        done = None
        seen = progress.get(job.job_id)
        if seen is not None and seen.total > 0:
            done = min(seen.step / seen.total, 1.0)
        found.append(Ahead(work, running=job.running, done=done))
    return found


async def live_state(
    app: web.Application, generation: Generation, deadline: Deadline
) -> LiveState:
    """Position, progress and estimated time of `generation`, as far as Redis
    answers within `deadline` (unknown parts None: the row stays the truth)."""
    status = Status(generation.status)
    try:
        if status is Status.RUNNING:
            return await _running(app, generation, deadline)
        if status is Status.QUEUED:
            return await _queued(app, generation, deadline)
        if status is Status.SCHEDULED:
            return await _scheduled(app, generation, deadline)
    except (RedisError, TimeoutError):
        log.warning("live state of %s unavailable", generation.id)
    return LiveState()


def _params(generation: Generation) -> GenerationParams:
    return GenerationParams.from_request(generation.request)


async def _running(
    app: web.Application, generation: Generation, deadline: Deadline
) -> LiveState:
    redis = app[redis_key]
    nodes = await _nodes(app, generation.model, deadline)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(progress_key(generation.id))
        pipe.hgetall(speed_key(generation.model))
        raw, speed = await deadline.run(pipe.execute())
    progress = _progress(raw)
    speeds = Speeds.parse(speed, time.time(), prefer=[n.node_id for n in nodes])
    own = Work.of(_params(generation))
    if progress is None:
        # Started, no step written yet: the learned time less the time since.
        learned = speeds.run_s(own)
        if learned is None or generation.started_at is None:
            return LiveState()
        since = (utcnow() - generation.started_at).total_seconds()
        return LiveState(eta=Eta(0.0, max(0.0, learned - since)))
    eta = running_eta(
        speeds,
        own,
        step=progress.step,
        total=progress.total,
        elapsed_s=progress.elapsed_s,
    )
    return LiveState(progress=progress, eta=eta)


async def _scheduled(
    app: web.Application, generation: Generation, deadline: Deadline
) -> LiveState:
    """Waiting in the database for its time: then one batch's run."""
    nodes = await _nodes(app, generation.model, deadline)
    reading = app[redis_key].hgetall(speed_key(generation.model))
    raw = await deadline.run(reading)  # type: ignore[arg-type]
    speeds = Speeds.parse(raw, time.time(), prefer=[n.node_id for n in nodes])
    run_s = speeds.run_s(Work.of(_params(generation)))
    if run_s is None or generation.scheduled_for is None:
        return LiveState()
    wait_s = max(0.0, (generation.scheduled_for - utcnow()).total_seconds())
    return LiveState(eta=Eta(wait_s, run_s))


async def _queued(
    app: web.Application, generation: Generation, deadline: Deadline
) -> LiveState:
    redis = app[redis_key]
    model = generation.model
    if generation.tier is Tier.PREMIUM:
        own_job = generation_job_id(generation.id, generation.attempts)
        # Premium work waits behind premium work only: batches yield to it
        # at their next step.
        orders = [QueueOrder(premium_queue(model), own_job)]
    elif generation.batch_id is not None:
        own_job = batch_job_id(generation.batch_id, generation.attempts)
        orders = [
            QueueOrder(premium_queue(model), None),
            QueueOrder(batch_queue(model), own_job),
        ]
    else:
        return LiveState()
    mine = orders[-1]
    nodes = await _nodes(app, model, deadline)
    async with redis.pipeline(transaction=False) as pipe:
        for order in orders:
            order.ask_rank(pipe)
        pipe.hgetall(speed_key(model))
        pipe.hgetall(progress_key(generation.id))
        first = await deadline.run(pipe.execute())
    for index, order in enumerate(orders):
        order.take_rank(first[2 * index : 2 * index + 2])
    speed, own_progress = first[-2], _progress(first[-1])
    position = mine.rank
    if position is None:
        return LiveState()
    speeds = Speeds.parse(speed, time.time(), prefer=[n.node_id for n in nodes])
    if own_progress is not None and own_progress.elapsed_s is not None:
        # Its node started it; `jobs` has not recorded that yet.
        eta = running_eta(
            speeds,
            Work.of(_params(generation)),
            step=own_progress.step,
            total=own_progress.total,
            elapsed_s=own_progress.elapsed_s,
        )
        return LiveState(position=position, progress=own_progress, eta=eta)
    if not speeds.known or not nodes:
        return LiveState(position=position)
    queued, ahead = await _read_ahead(app, orders, own_job, deadline)
    own = None if queued is None else Work.of_payload(queued.payload)
    if own is None:
        return LiveState(position=position)
    unread = sum(order.unread for order in orders)
    return LiveState(
        position=position, eta=queued_eta(speeds, own, ahead, nodes, unread=unread)
    )


async def _read_ahead(
    app: web.Application,
    orders: list[QueueOrder],
    own_job: str | None,
    deadline: Deadline,
) -> tuple[QueuedJob | None, list[Ahead]]:
    """The second round trip: the payloads of the jobs ahead (and of this one,
    once enqueued), and the progress of the premium ones among them."""
    mine = [] if own_job is None else [own_job]
    async with app[redis_key].pipeline(transaction=False) as pipe:
        sizes = [
            order.ask_jobs(pipe, also=mine if order is orders[-1] else [])
            for order in orders
        ]
        premium_ids = [
            (job_id, generation)
            for order in orders
            for job_id in order.ids or []
            if (generation := _premium_generation(job_id)) is not None
        ]
        for _, generation in premium_ids:
            pipe.hgetall(progress_key(generation))
        results = await deadline.run(pipe.execute())
    jobs: list[QueuedJob] = []
    own: QueuedJob | None = None
    offset = 0
    for order, size in zip(orders, sizes, strict=True):
        also = mine if order is orders[-1] else []
        read = order.take_jobs(results[offset : offset + size], also=also)
        offset += size
        if also:
            own = read.pop()
        jobs += read
    progress = {
        job_id: _progress(raw)
        for (job_id, _), raw in zip(premium_ids, results[offset:], strict=True)
    }
    return own, _ahead(jobs, progress)


async def place_and_eta(
    app: web.Application,
    model: str,
    params: GenerationParams,
    owner: str,
    deadline: Deadline,
) -> tuple[int, Eta | None]:
    """Where a premium job of `owner` enqueued now goes (the jobs ranked
    before it then, `places_ahead`) and its estimated time, for its `queued`
    event, read in one round trip (two with jobs ahead and known speeds).
    The estimate is None when it cannot be known, or Redis failed past the
    place (the enqueue matters more); a failure to place raises."""
    queue = premium_queue(model)
    redis = app[redis_key]
    order = QueueOrder(queue, None)
    nodes = await _nodes(app, model, deadline)
    async with redis.pipeline(transaction=False) as pipe:
        queue_places_ahead(pipe, queue, owner)
        order.ask_rank(pipe)
        pipe.hgetall(speed_key(model))
        first = await deadline.run(pipe.execute(raise_on_error=False))
    place = await deadline.run(places_ahead_reply(redis, first[0], queue, owner))
    try:
        for reply in first[1:]:
            if isinstance(reply, RedisError):
                raise reply
        order.place = place
        order.take_rank(first[1:3])
        speeds = Speeds.parse(first[3], time.time(), prefer=[n.node_id for n in nodes])
        if not speeds.known or not nodes:
            return place, None
        ahead: list[Ahead] = []
        if order.ids:
            _, ahead = await _read_ahead(app, [order], None, deadline)
    except RedisError:
        log.warning("no estimate for a job on %s: Redis failed", model)
        return place, None
    return place, queued_eta(speeds, Work.of(params), ahead, nodes, unread=order.unread)
