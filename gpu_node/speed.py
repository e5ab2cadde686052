"""What this node learns of its own speed, and its publication in Redis.

Each finished pipeline call and each model load from disk is a measurement;
the book keeps an exponentially weighted mean per model and size bucket and
writes it to the model's speed hash (`speed_key`), where `web` reads it for
estimated times (`sdapi.infra.eta`).
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sdapi.contract.names import SPEED_TTL_S, speed_key
from sdapi.contract.speed import (
    LoadRecord,
    SpeedRecord,
    load_field,
    size_bucket,
    speed_field,
)
from sdapi.infra.eta import Speeds

log = logging.getLogger(__name__)

# Seconds of the pipeline calls of the job running in this task, and of the
# premium work nested in them (each job runs in its own task: a premium job
# nested in a batch keeps its own list).
job_calls: ContextVar[list[float] | None] = ContextVar("job_calls", default=None)

# Weight of a new measurement in the mean: the last five or so calls count
# most, so a node that warms up or slows down (thermal, a neighbour on the
# GPU) is followed within a few calls, and one odd call moves it by a third.
ALPHA = 0.3


def _mean(old: float, new: float) -> float:
    return old + ALPHA * (new - old)


class SpeedBook:
    """This node's learned speeds, per model and size bucket, and load times."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.runs: dict[str, dict[int, SpeedRecord]] = {}
        self.loads: dict[str, LoadRecord] = {}
        # Measured before Redis was open (loads at start): published later.
        self._unpublished: dict[tuple[str, str], str] = {}
        # Models whose hash this node has swept of old records.
        self._swept: set[str] = set()

    def observe_call(
        self,
        model: str,
        *,
        width: int,
        height: int,
        images: int,
        steps: int,
        seconds: float,
        step_seconds: float,
    ) -> SpeedRecord:
        """Learn from a finished call of `images` images that ran `steps` steps
        in `seconds`, `step_seconds` of them per step (all images at once)."""
        calls = job_calls.get()
        if calls is not None:
            calls.append(seconds)
        images = max(images, 1)
        step_s = step_seconds / images
        overhead_s = max(0.0, seconds - step_seconds * steps) / images
        bucket = size_bucket(width, height)
        buckets = self.runs.setdefault(model, {})
        old = buckets.get(bucket)
        pixels = width * height
        if old is not None:
            # The mean is kept at the last size measured in the bucket.
            scale = pixels / old.pixels
            step_s = _mean(old.step_s * scale, step_s)
            overhead_s = _mean(old.overhead_s * scale, overhead_s)
        record = SpeedRecord(
            pixels=pixels,
            step_s=step_s,
            overhead_s=overhead_s,
            job_s=0.0 if old is None else old.job_s,
            samples=1 if old is None else old.samples + 1,
            at=time.time(),
        )
        self._keep(model, bucket, record)
        return record

    def observe_job(
        self, model: str, *, width: int, height: int, seconds: float
    ) -> None:
        """Learn from a job that spent `seconds` outside its pipeline calls
        (and model load), its images of `width` x `height` pixels."""
        bucket = size_bucket(width, height)
        old = self.runs.get(model, {}).get(bucket)
        if old is None:
            return  # no call ran to its end (cancelled, failed)
        job_s = max(0.0, seconds)
        record = old.model_copy(
            update={
                "job_s": job_s if old.job_s == 0 else _mean(old.job_s, job_s),
                "at": time.time(),
            }
        )
        self._keep(model, bucket, record)

    def _keep(self, model: str, bucket: int, record: SpeedRecord) -> None:
        self.runs.setdefault(model, {})[bucket] = record
        self._unpublished[(model, speed_field(self.node_id, bucket))] = (
            record.model_dump_json()
        )

    def observe_load(self, model: str, seconds: float) -> None:
        """Learn from a load of `model` from disk that took `seconds`."""
        old = self.loads.get(model)
        record = LoadRecord(
            load_s=seconds if old is None else _mean(old.load_s, seconds),
            samples=1 if old is None else old.samples + 1,
            at=time.time(),
        )
        self.loads[model] = record
        self._unpublished[(model, load_field(self.node_id))] = record.model_dump_json()

    def speeds(self, model: str) -> Speeds:
        """What this node knows of its speed with `model`."""
        runs = self.runs.get(model, {})
        load = self.loads.get(model)
        return Speeds(
            {self.node_id: runs} if runs else {},
            {self.node_id: load} if load is not None else {},
        )

    async def publish(self, redis: Redis) -> None:
        """Write what changed since the last call to the speed hashes (best
        effort: an estimate is not worth failing or slowing a job for)."""
        if not self._unpublished:
            return
        pending, self._unpublished = self._unpublished, {}
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for (model, field), value in pending.items():
                    pipe.hset(speed_key(model), field, value)
                for model in {model for model, _ in pending}:
                    pipe.expire(speed_key(model), SPEED_TTL_S)
                await pipe.execute()
            for model in {model for model, _ in pending} - self._swept:
                await self._sweep(redis, model)
                self._swept.add(model)
        except (RedisError, OSError) as exc:
            # Kept for the next call, unless a newer measurement replaced it.
            self._unpublished = pending | self._unpublished
            log.warning("cannot publish this node's speed: %s", exc)

    async def _sweep(self, redis: Redis, model: str) -> None:
        # Every node that starts adds fields (node ids are new each start):
        # the first to write after a start drops the expired ones, so the
        # hash that `web` reads whole stays the size of the live fleet.
        raw: dict[bytes, bytes] = await redis.hgetall(speed_key(model))  # type: ignore[misc]
        fresh = Speeds.fresh_fields(raw, time.time())
        old = [field.decode() for field in raw if field.decode() not in fresh]
        if old:
            await redis.hdel(speed_key(model), *old)  # type: ignore[misc]  # redis-py types it sync|async
