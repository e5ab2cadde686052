"""The estimated-time model (`sdapi.infra.eta`) and what a node learns
(`gpu_node.speed`): learning, size buckets, cold models, several nodes, work
ahead, and running kept apart from waiting."""

from __future__ import annotations

import json
import time

import pytest
import redis.asyncio

from gpu_node.speed import ALPHA, SpeedBook
from sdapi.contract.names import SPEED_TTL_S, speed_key
from sdapi.contract.payloads import GenerationJob, GenerationParams
from sdapi.contract.speed import SpeedRecord, size_bucket, speed_field
from sdapi.contract.status import Tier
from sdapi.infra.eta import (
    Ahead,
    NodeState,
    Speeds,
    Work,
    queued_eta,
    running_eta,
)

NOW = 1_800_000_000.0
SMALL = Work(width=64, height=64, steps=20, images=1)


def record(
    step_s: float, overhead_s: float = 0.0, pixels: int = 64 * 64
) -> SpeedRecord:
    return SpeedRecord(
        pixels=pixels, step_s=step_s, overhead_s=overhead_s, samples=3, at=NOW
    )


def speeds_of(**nodes: float) -> Speeds:
    """Nodes measured at 64x64 with `step_s` seconds per image step."""
    return Speeds(
        {node: {size_bucket(64, 64): record(s)} for node, s in nodes.items()}, {}
    )


def test_a_call_takes_overhead_plus_steps_per_image() -> None:
    rec = record(step_s=0.1, overhead_s=0.5)
    assert rec.call_s(64 * 64, steps=20, images=2) == pytest.approx(2 * (0.5 + 2.0))


def test_the_book_learns_a_weighted_mean_per_bucket() -> None:
    book = SpeedBook("n1")
    book.observe_call(
        "tiny", width=64, height=64, images=1, steps=10, seconds=1.5, step_seconds=0.1
    )
    first = book.runs["tiny"][size_bucket(64, 64)]
    assert first.step_s == pytest.approx(0.1)
    assert first.overhead_s == pytest.approx(0.5)
    book.observe_call(
        "tiny", width=64, height=64, images=1, steps=10, seconds=3.0, step_seconds=0.2
    )
    second = book.runs["tiny"][size_bucket(64, 64)]
    assert second.step_s == pytest.approx(0.1 + ALPHA * 0.1)
    assert second.overhead_s == pytest.approx(0.5 + ALPHA * (1.0 - 0.5))
    assert second.samples == 2
    # Per image: a call of four images at the same rate teaches the same.
    book.observe_call(
        "tiny", width=128, height=128, images=4, steps=10, seconds=6.0, step_seconds=0.4
    )
    big = book.runs["tiny"][size_bucket(128, 128)]
    assert big.step_s == pytest.approx(0.1)
    assert big.overhead_s == pytest.approx(0.5)
    assert size_bucket(128, 128) != size_bucket(64, 64)


def test_sizes_share_a_bucket_within_half_an_octave() -> None:
    assert size_bucket(512, 512) == size_bucket(512, 576)
    assert size_bucket(512, 512) != size_bucket(768, 768)
    assert size_bucket(512, 512) != size_bucket(256, 256)


def test_an_unmeasured_size_is_scaled_from_the_nearest_bucket() -> None:
    speeds = speeds_of(n1=0.1)
    # Four times the pixels: four times as long.
    big = Work(width=128, height=128, steps=20, images=1)
    assert speeds.run_s(big) == pytest.approx(4 * speeds.run_s(SMALL))  # type: ignore[operator]
    # A measured bucket wins over scaling.
    both = Speeds(
        {
            "n1": {
                size_bucket(64, 64): record(0.1),
                size_bucket(128, 128): record(0.2, pixels=128 * 128),
            }
        },
        {},
    )
    assert both.run_s(big) == pytest.approx(20 * 0.2)


def test_nothing_learned_means_no_estimate() -> None:
    empty = Speeds({}, {})
    assert not empty.known
    assert empty.run_s(SMALL) is None
    assert queued_eta(empty, SMALL, [], [NodeState("n1", loaded=True)]) is None
    assert running_eta(empty, SMALL, step=0, total=20, elapsed_s=None) is None


def test_no_healthy_node_means_no_estimate() -> None:
    assert queued_eta(speeds_of(n1=0.1), SMALL, [], []) is None


def test_an_idle_node_starts_at_once() -> None:
    eta = queued_eta(speeds_of(n1=0.1), SMALL, [], [NodeState("n1", loaded=True)])
    assert eta is not None
    assert eta.wait_s == 0
    assert eta.run_s == pytest.approx(2.0)
    assert eta.total_s == pytest.approx(2.0)


def test_work_ahead_is_waited_for_in_service_order() -> None:
    speeds = speeds_of(n1=0.1)
    node = [NodeState("n1", loaded=True)]
    ahead = [
        Ahead(SMALL, running=True, done=0.75),  # 0.5 s left
        Ahead(Work(64, 64, steps=10, images=2)),  # 2 s
        Ahead(SMALL),  # 2 s
    ]
    eta = queued_eta(speeds, SMALL, ahead, node)
    assert eta is not None
    assert eta.wait_s == pytest.approx(4.5)
    assert eta.run_s == pytest.approx(2.0)
    # Progress unknown: a running job counts as half done.
    unknown = queued_eta(speeds, SMALL, [Ahead(SMALL, running=True, done=None)], node)
    assert unknown is not None and unknown.wait_s == pytest.approx(1.0)
    # Jobs past the ones read count as the mean of those read.
    more = queued_eta(speeds, SMALL, [Ahead(SMALL)], node, unread=3)
    assert more is not None and more.wait_s == pytest.approx(8.0)


def test_several_nodes_share_the_work_ahead() -> None:
    speeds = speeds_of(fast=0.05, slow=0.2)
    nodes = [NodeState("fast", loaded=True), NodeState("slow", loaded=True)]
    # One job ahead: the fast node takes it, the slow one is free.
    eta = queued_eta(speeds, SMALL, [Ahead(SMALL)], nodes)
    assert eta is not None
    assert eta.wait_s == 0
    assert eta.run_s == pytest.approx(4.0)  # on the slow node
    # Three ahead: fast takes 1 (1 s), slow 1 (4 s), fast the third (2 s).
    eta = queued_eta(speeds, SMALL, [Ahead(SMALL)] * 3, nodes)
    assert eta is not None
    assert eta.wait_s == pytest.approx(2.0)
    assert eta.run_s == pytest.approx(1.0)


def test_a_new_node_is_estimated_as_the_healthy_ones_mean() -> None:
    speeds = Speeds(
        {
            "a": {size_bucket(64, 64): record(0.1)},
            "b": {size_bucket(64, 64): record(0.3)},
            "gone": {size_bucket(64, 64): record(10.0)},
        },
        {},
        prefer=["a", "b", "new"],
    )
    assert speeds.run_s(SMALL, "new") == pytest.approx(20 * 0.2)
    assert speeds.run_s(SMALL, "a") == pytest.approx(20 * 0.1)


def test_a_cold_model_waits_for_its_measured_load() -> None:
    raw = {
        speed_field("n1", size_bucket(64, 64)).encode(): record(0.1)
        .model_dump_json()
        .encode(),
        b"n1|load": json.dumps({"load_s": 7.0, "samples": 1, "at": NOW}).encode(),
    }
    speeds = Speeds.parse(raw, NOW)
    cold = [NodeState("n1", loaded=False)]
    eta = queued_eta(speeds, SMALL, [], cold)
    assert eta is not None
    assert eta.wait_s == pytest.approx(7.0)
    assert eta.run_s == pytest.approx(2.0)
    # A load nobody measured: no honest estimate.
    unmeasured = Speeds.parse({k: v for k, v in raw.items() if b"load" not in k}, NOW)
    assert queued_eta(unmeasured, SMALL, [], cold) is None
    # A warm node beside it serves at once.
    warm = queued_eta(unmeasured, SMALL, [], [*cold, NodeState("n2", loaded=True)])
    assert warm is not None and warm.wait_s == 0


def test_old_and_unreadable_records_are_ignored() -> None:
    raw = {
        b"n1|24": record(0.1)
        .model_copy(update={"at": NOW - SPEED_TTL_S - 1})
        .model_dump_json()
        .encode(),
        b"n2|24": b"{not json",
        b"n3|x": record(0.1).model_dump_json().encode(),
        b"n4|24": json.dumps({"step_s": -1}).encode(),
    }
    assert not Speeds.parse(raw, NOW).known
    assert Speeds.fresh_fields(raw, NOW) == {"n3|x"}


def test_running_blends_its_own_rate_with_the_learned_one() -> None:
    speeds = speeds_of(n1=0.1)  # 2 s for 20 steps
    # Its own rate: 10 steps in 3 s, so 3 s left; learned: 1 s left; half done.
    eta = running_eta(speeds, SMALL, step=10, total=20, elapsed_s=3.0)
    assert eta is not None
    assert eta.wait_s == 0
    assert eta.run_s == pytest.approx(0.5 * 3.0 + 0.5 * 1.0)
    # At the start the learned rate counts alone; near the end, its own.
    start = running_eta(speeds, SMALL, step=0, total=20, elapsed_s=0.0)
    assert start is not None and start.run_s == pytest.approx(2.0)
    late = running_eta(speeds, SMALL, step=19, total=20, elapsed_s=19.0)
    assert late is not None
    assert late.run_s == pytest.approx(0.95 * 1.0 + 0.05 * 0.1)
    # Nothing learned: its own rate only.
    alone = running_eta(Speeds({}, {}), SMALL, step=5, total=20, elapsed_s=1.0)
    assert alone is not None and alone.run_s == pytest.approx(3.0)


def test_work_of_payloads() -> None:
    params = GenerationParams(
        prompt="a",
        width=64,
        height=96,
        steps=12,
        num_images=3,
        seed=1,
        guidance_scale=7.0,
        scheduler="euler",
    )
    job = GenerationJob(
        generation_id="00000000-0000-0000-0000-000000000001",  # type: ignore[arg-type]
        model="tiny",
        tier=Tier.PREMIUM,
        params=params,
    )
    assert Work.of_payload(job.model_dump(mode="json")) == Work(64, 96, 12, 3)
    assert Work.of_payload({"something": "else"}) is None
    assert Work.of_payload(None) is None


async def test_the_book_publishes_and_sweeps_old_records(
    redis_client: redis.asyncio.Redis,
) -> None:
    key = speed_key("tiny")
    stale = record(0.1).model_copy(update={"at": time.time() - SPEED_TTL_S - 5})
    await redis_client.hset(key, "gone|24", stale.model_dump_json())
    book = SpeedBook("n1")
    book.observe_load("tiny", 3.0)
    book.observe_call(
        "tiny", width=64, height=64, images=1, steps=10, seconds=1.5, step_seconds=0.1
    )
    await book.publish(redis_client)
    raw = await redis_client.hgetall(key)
    assert set(raw) == {b"n1|load", speed_field("n1", size_bucket(64, 64)).encode()}
    assert 0 < await redis_client.ttl(key) <= SPEED_TTL_S
    speeds = Speeds.parse(raw, time.time())
    assert speeds.run_s(Work(64, 64, 10, 1), "n1") == pytest.approx(1.5)
    assert speeds.load_s("n1") == pytest.approx(3.0)
    # The node's own view gives the same figures.
    assert book.speeds("tiny").run_s(Work(64, 64, 10, 1), "n1") == pytest.approx(1.5)
