"""Estimated times of generations, from the speed the nodes learned.

Pure arithmetic: `web.eta` reads what it needs from Redis, the GPU node
knows its own speed. docs/ARCHITECTURE.md ("Estimated times") has the model.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from sdapi.contract.names import SPEED_TTL_S
from sdapi.contract.payloads import BatchJob, GenerationJob, GenerationParams
from sdapi.contract.speed import (
    LOAD_BUCKET,
    LoadRecord,
    SpeedRecord,
    parse_field,
    size_bucket,
)

# A running job whose progress is unknown counts as half done.
UNKNOWN_DONE = 0.5


@dataclass(frozen=True)
class Work:
    """The shape of one pipeline run: what its time depends on."""

    width: int
    height: int
    steps: int
    images: int

    @classmethod
    def of(cls, params: GenerationParams, images: int | None = None) -> Work:
        """The work of a generation (or of `images` such images)."""
        return cls(
            width=params.width,
            height=params.height,
            steps=params.denoising_steps,
            images=params.num_images if images is None else images,
        )

    @classmethod
    def of_payload(cls, payload: object) -> Work | None:
        """The work of a queued job's payload (premium or batch); None if
        it is neither."""
        try:
            if isinstance(payload, dict) and "items" in payload:
                batch = BatchJob.model_validate(payload)
                return cls.of(batch.items[0].params, batch.image_count)
            return cls.of(GenerationJob.model_validate(payload).params)
        except ValidationError:
            return None


@dataclass(frozen=True)
class Eta:
    """Seconds until a generation starts running, and then until it ends."""

    wait_s: float
    run_s: float

    @property
    def total_s(self) -> float:
        return self.wait_s + self.run_s


@dataclass(frozen=True)
class NodeState:
    """A healthy node serving the model, and whether it has it loaded."""

    node_id: str
    loaded: bool


@dataclass(frozen=True)
class Ahead:
    """A job ahead in the queue: its work, and how much of it is done."""

    work: Work
    running: bool = False
    # Fraction done of a running job; None while its progress is unknown.
    done: float | None = 0.0

    @property
    def left(self) -> float:
        if not self.running:
            return 1.0
        return 1.0 - (UNKNOWN_DONE if self.done is None else self.done)


def _nearest(records: Mapping[int, SpeedRecord], work: Work) -> SpeedRecord:
    bucket = size_bucket(work.width, work.height)
    return records.get(bucket) or min(
        records.values(), key=lambda r: abs(size_bucket(r.pixels, 1) - bucket)
    )


class Speeds:
    """One model's learned speeds, per node (records older than SPEED_TTL_S
    are dropped); a node that has none is estimated as the others' mean."""

    def __init__(
        self,
        runs: Mapping[str, Mapping[int, SpeedRecord]],
        loads: Mapping[str, LoadRecord],
        *,
        prefer: Collection[str] = (),
    ) -> None:
        self._runs = {node: dict(r) for node, r in runs.items() if r}
        self._loads = dict(loads)
        # The healthy nodes' own records make the mean when they have any:
        # a node that left may have been another kind of GPU.
        self._pool = [n for n in self._runs if n in prefer] or list(self._runs)
        self._load_pool = [n for n in self._loads if n in prefer] or list(self._loads)

    @classmethod
    def parse(
        cls,
        raw: Mapping[bytes, bytes] | Mapping[str, str],
        now: float,
        *,
        prefer: Collection[str] = (),
    ) -> Speeds:
        """From a speed hash as Redis returns it; bad fields are skipped (a
        newer node's record is read with the fields this one knows)."""
        runs: dict[str, dict[int, SpeedRecord]] = {}
        loads: dict[str, LoadRecord] = {}
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else key
            node, bucket = parse_field(name)
            try:
                data = json.loads(value)
                if bucket == LOAD_BUCKET:
                    load = LoadRecord.model_validate(data)
                    if now - load.at <= SPEED_TTL_S:
                        loads[node] = load
                    continue
                record = SpeedRecord.model_validate(data)
                if now - record.at <= SPEED_TTL_S:
                    runs.setdefault(node, {})[int(bucket)] = record
            except (ValueError, ValidationError):
                continue
        return cls(runs, loads, prefer=prefer)

    @staticmethod
    def fresh_fields(raw: Mapping[bytes, bytes], now: float) -> set[str]:
        """The fields of a speed hash whose records are younger than SPEED_TTL_S
        (unreadable ones are not)."""
        fresh = set()
        for key, value in raw.items():
            try:
                at = json.loads(value)["at"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(at, int | float) and now - at <= SPEED_TTL_S:
                fresh.add(key.decode())
        return fresh

    @property
    def known(self) -> bool:
        """Whether any node has measured a run of the model."""
        return bool(self._runs)

    def run_s(self, work: Work, node_id: str | None = None) -> float | None:
        """Seconds `work` takes on `node_id` (the mean node when None or
        unmeasured); None before any node measured the model."""
        own = self._runs.get(node_id) if node_id is not None else None
        if own:
            return self._call_s(own, work)
        if not self._pool:
            return None
        costs = [self._call_s(self._runs[node], work) for node in self._pool]
        return sum(costs) / len(costs)

    def load_s(self, node_id: str | None = None) -> float | None:
        """Seconds a load of the model takes on `node_id` (or the mean node)."""
        own = self._loads.get(node_id) if node_id is not None else None
        if own is not None:
            return own.load_s
        if not self._load_pool:
            return None
        return sum(self._loads[n].load_s for n in self._load_pool) / len(
            self._load_pool
        )

    @staticmethod
    def _call_s(records: Mapping[int, SpeedRecord], work: Work) -> float:
        record = _nearest(records, work)
        return record.job_run_s(work.width * work.height, work.steps, work.images)


def queued_eta(
    speeds: Speeds,
    own: Work,
    ahead: Sequence[Ahead],
    nodes: Sequence[NodeState],
    *,
    unread: int = 0,
) -> Eta | None:
    """When a queued job starts and how long it runs, or None when that cannot
    be known (no node serves the model, none measured it, a cold model whose
    load time nobody measured).

    The jobs `ahead` (in service order, `unread` more after them counted as
    their mean) go to whichever node frees up first, as the nodes claim
    them; a node without the model loaded starts with a load.
    """
    if not speeds.known:
        return None
    free: dict[str, float] = {}
    for node in nodes:
        if node.loaded:
            free[node.node_id] = 0.0
            continue
        load = speeds.load_s(node.node_id)
        if load is not None:
            free[node.node_id] = load
    if not free:
        return None

    def cost(node_id: str, work: Work) -> float:
        seconds = speeds.run_s(work, node_id)
        # `known` holds: the mean node has a figure for every work.
        return 0.0 if seconds is None else seconds

    # Running jobs hold a node each already: they go first.
    ordered = [job for job in ahead if job.running] + [
        job for job in ahead if not job.running
    ]
    spent: list[float] = []
    for job in ordered:
        node_id = min(free, key=free.__getitem__)
        seconds = cost(node_id, job.work) * job.left
        free[node_id] += seconds
        if not job.running:
            spent.append(seconds)
    if unread and spent:
        extra = unread * sum(spent) / len(spent) / len(free)
        free = {node_id: at + extra for node_id, at in free.items()}
    node_id = min(free, key=free.__getitem__)
    return Eta(wait_s=free[node_id], run_s=cost(node_id, own))


def running_eta(
    speeds: Speeds,
    own: Work,
    *,
    step: int,
    total: int,
    elapsed_s: float | None,
    node_id: str | None = None,
) -> Eta | None:
    """Seconds left of a running job: its remaining steps at its own measured
    rate (`elapsed_s` for `step` steps) blended with the learned one, the
    measurement weighing as much as the fraction done."""
    done = min(max(step / total, 0.0), 1.0) if total > 0 else 0.0
    learned = speeds.run_s(own, node_id)
    learned_left = None if learned is None else learned * (1.0 - done)
    measured_left = (
        elapsed_s * (total - step) / step
        if elapsed_s is not None and step > 0 and total >= step
        else None
    )
    if learned_left is None and measured_left is None:
        return None
    if learned_left is None:
        left = measured_left
    elif measured_left is None:
        left = learned_left
    else:
        left = done * measured_left + (1.0 - done) * learned_left
    return Eta(wait_s=0.0, run_s=max(0.0, left or 0.0))
