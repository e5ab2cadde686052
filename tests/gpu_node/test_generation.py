"""Generations through a running node: events, PNGs, batches, premium first, cancel."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio
from PIL import Image

from gpu_node.calls import CallItem, Engine, PipelineCall, QuietObserver
from gpu_node.images import ImageManifest, encode_png, sha256_hex
from sdapi.contract.events import ImageEvent, ProgressEvent, StartedEvent
from sdapi.contract.names import image_key, input_key, progress_key, result_job_id
from sdapi.contract.payloads import BatchJob
from sdapi.contract.status import Status, Tier
from sdapi.infra.queue import enqueue_batch, enqueue_generation, request_cancel
from tests.gpu_node.conftest import node_settings, running_node
from tests.gpu_node.support import (
    events_of,
    job,
    queued_payload,
    result_of,
    started_notice,
    stream_ms,
)
from tests.support import until


def reference_pngs(engine: Engine, jobs: list[Any]) -> dict[str, list[bytes]]:
    """PNGs of `jobs` run as one call straight on the engine (no node, no Redis)."""
    first = jobs[0].params
    call = PipelineCall(
        first.width,
        first.height,
        first.steps,
        first.guidance_scale,
        first.scheduler,
        tuple(
            CallItem(
                str(j.generation_id),
                j.params.prompt,
                j.params.negative_prompt,
                tuple(j.params.image_seeds()),
            )
            for j in jobs
        ),
    )
    images = engine.run(call, QuietObserver())
    profile = engine.profile
    out: dict[str, list[bytes]] = {}
    for j in jobs:
        key = str(j.generation_id)
        out[key] = [
            encode_png(
                image,
                ImageManifest(
                    generation_id=key,
                    index=index,
                    model=profile.model,
                    model_hash=profile.model_hash,
                    scheduler=j.params.scheduler,
                    seed=seed,
                    steps=j.params.steps,
                    guidance_scale=j.params.guidance_scale,
                    width=j.params.width,
                    height=j.params.height,
                    prompt=j.params.prompt,
                    negative_prompt=j.params.negative_prompt,
                    versions=profile.versions,
                ),
            )
            for index, (seed, image) in enumerate(
                zip(j.params.image_seeds(), images[key], strict=True)
            )
        ]
    return out


def pixels(png: bytes) -> np.ndarray[Any, Any]:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


async def test_premium_generation_events_png_and_result(
    node: Any, client: redis.asyncio.Redis
) -> None:
    request = job(prompt="  a   red fox\n in the  snow ", steps=6, num_images=2)
    await enqueue_generation(client, request, owner="test")
    result = await result_of(client, request.generation_id)

    assert result.status is Status.SUCCEEDED
    assert result.node_id == "test-node" and result.model == "tiny"
    assert result.model_hash == node.info.model_hash
    assert [i.seed for i in result.images] == [1234, 1235]
    notice = await started_notice(client, request.generation_id)
    assert notice is not None and notice.node_id == "test-node"

    # A reader that starts after the end still gets everything, in order.
    events = [event for _, event in await events_of(client, request.generation_id)]
    assert isinstance(events[0], StartedEvent)
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert [(e.step, e.total) for e in progress] == [(s, 6) for s in range(1, 7)]
    assert [e.preview is not None for e in progress] == [False, True] * 3
    assert progress[1].preview is not None
    assert progress[1].preview.startswith("data:image/jpeg;base64,")
    images = events[1 + len(progress) :]
    assert [type(e) for e in images] == [ImageEvent, ImageEvent]
    assert len(events) == 1 + 6 + 2
    stored = await client.hgetall(progress_key(request.generation_id))
    assert {k: stored[k] for k in (b"step", b"total")} == {
        b"step": b"6",
        b"total": b"6",
    }
    # When it started and when that step was made (the job's own rate).
    assert float(stored[b"t0"]) <= float(stored[b"at"])

    for info, event in zip(result.images, images, strict=True):
        assert isinstance(event, ImageEvent)
        png = await client.get(image_key(request.generation_id, info.index))
        assert png is not None and sha256_hex(png) == info.sha256 == event.sha256
        assert 0 < await client.ttl(image_key(request.generation_id, info.index))
        image = Image.open(io.BytesIO(png))
        assert image.size == (64, 64)
        parameters = image.info["parameters"]
        assert parameters.startswith("a red fox in the snow\nNegative prompt: blurry\n")
        assert f"Seed: {info.seed}" in parameters and "Sampler: Euler a" in parameters
        manifest = json.loads(image.info["sdapi"])
        assert manifest["model"] == "tiny"
        assert manifest["model_hash"] == node.info.model_hash
        assert manifest["seed"] == info.seed
        assert manifest["steps"] == 6 and manifest["guidance_scale"] == 7.5
        assert (manifest["width"], manifest["height"]) == (64, 64)
        assert manifest["scheduler"] == "euler_a"
        assert manifest["prompt"] == "a red fox in the snow"
        assert manifest["negative_prompt"] == "blurry"
        assert set(manifest["versions"]) >= {"diffusers", "torch"}


async def test_long_prompt_is_encoded_whole_without_a_truncation_warning(
    node: Any, client: redis.asyncio.Redis
) -> None:
    request = job(prompt="cat " * 100, negative_prompt="dog " * 80, steps=1)
    await enqueue_generation(client, request, owner="test")
    payload = await until(
        lambda: queued_payload(client, result_job_id(request.generation_id, 1))
    )
    assert payload["status"] == Status.SUCCEEDED
    # Nothing is cut, so there is nothing to report.
    assert not {"prompt_tokens_dropped", "negative_prompt_tokens_dropped"} & set(
        payload
    )


async def test_batch_of_long_and_short_prompts_matches_single_requests(
    node: Any, client: redis.asyncio.Redis
) -> None:
    # Three encoder windows and one: padding the short prompt to three in a
    # shared call would change its image.
    items = [
        job(Tier.NORMAL, prompt="a red barn, " * 40, seed=3),
        job(Tier.NORMAL, prompt="a (lighthouse:1.3)", seed=4),
    ]
    batch = BatchJob(batch_id=items[0].generation_id, model="tiny", items=items)
    await enqueue_batch(client, batch)
    alone = [job(prompt=i.params.prompt, seed=i.params.seed) for i in items]
    for request in alone:
        await enqueue_generation(client, request, owner="test")
    for in_batch, single in zip(items, alone, strict=True):
        batched = await result_of(client, in_batch.generation_id)
        solo = await result_of(client, single.generation_id)
        assert batched.status is solo.status is Status.SUCCEEDED
        pa = pixels(await client.get(image_key(in_batch.generation_id, 0)))
        pb = pixels(await client.get(image_key(single.generation_id, 0)))
        # As in test_batch_images_match_single_requests: kernels may round a
        # pixel one step away; a padded prompt changes far more.
        assert np.abs(pa - pb).max() <= 2


async def test_bad_request_fails_without_running(
    node: Any, client: redis.asyncio.Redis
) -> None:
    too_big = job(width=1024, height=64)
    unknown = job(scheduler="nope")
    for request in (too_big, unknown):
        await enqueue_generation(client, request, owner="test")
    for request in (too_big, unknown):
        result = await result_of(client, request.generation_id)
        assert result.status is Status.FAILED
        assert result.error is not None and result.error.code == "invalid_request"
        assert await started_notice(client, request.generation_id) is None


async def test_batch_images_match_single_requests(
    node: Any, client: redis.asyncio.Redis, tiny_engine: Engine
) -> None:
    items = [
        job(Tier.NORMAL, prompt="a lighthouse", seed=7, num_images=2),
        job(Tier.NORMAL, prompt="a forest", negative_prompt="", seed=99),
        job(Tier.NORMAL, prompt="a city at night", seed=2**32 - 1),
    ]
    batch = BatchJob(batch_id=items[0].generation_id, model="tiny", items=items)
    await enqueue_batch(client, batch)
    alone = [
        job(
            prompt=i.params.prompt,
            negative_prompt=i.params.negative_prompt,
            seed=i.params.seed,
            num_images=i.params.num_images,
        )
        for i in items
    ]
    for request in alone:
        await enqueue_generation(client, request, owner="test")

    for in_batch, single in zip(items, alone, strict=True):
        batched = await result_of(client, in_batch.generation_id)
        solo = await result_of(client, single.generation_id)
        assert batched.status is solo.status is Status.SUCCEEDED
        assert [i.seed for i in batched.images] == [i.seed for i in solo.images]
        for a, b in zip(batched.images, solo.images, strict=True):
            pa = pixels(await client.get(image_key(in_batch.generation_id, a.index)))
            pb = pixels(await client.get(image_key(single.generation_id, b.index)))
            # Not bit-identical: CPU matmul kernels split the work differently
            # for a batch of 8 latents (4 images, classifier-free guidance) than
            # for 2, so float sums round differently and a pixel can land one
            # step away. Measured with all eight schedulers at 64 and 128 px,
            # 4 and 20 steps: at most 1 of 255, mean under 0.001; 2 leaves
            # room for other CPUs' kernels.
            assert np.abs(pa - pb).max() <= 2
            assert np.abs(pa - pb).mean() < 0.01
    # Seed 2**32 - 1 + 1 wraps to 0 for a second image; here the one image keeps it.
    last = await result_of(client, items[2].generation_id)
    assert last.images[0].seed == 2**32 - 1


async def test_one_item_batch_is_byte_identical_to_premium(
    node: Any, client: redis.asyncio.Redis
) -> None:
    normal = job(Tier.NORMAL, seed=42)
    premium = job(seed=42)
    await enqueue_batch(
        client, BatchJob(batch_id=normal.generation_id, model="tiny", items=[normal])
    )
    await enqueue_generation(client, premium, owner="test")
    a = await result_of(client, normal.generation_id)
    b = await result_of(client, premium.generation_id)
    # Same shapes, same kernels: the pixels match exactly (the PNGs differ only
    # in the generation id of their manifest).
    pa = pixels(await client.get(image_key(normal.generation_id, 0)))
    pb = pixels(await client.get(image_key(premium.generation_id, 0)))
    assert a.status is b.status is Status.SUCCEEDED
    assert np.array_equal(pa, pb)


async def test_premium_preempts_a_running_batch(
    node: Any, client: redis.asyncio.Redis, tiny_engine: Engine
) -> None:
    items = [
        job(Tier.NORMAL, prompt="a long batch", steps=50, seed=11),
        job(Tier.NORMAL, prompt="another one", steps=50, seed=12, num_images=2),
    ]
    await enqueue_batch(
        client, BatchJob(batch_id=items[0].generation_id, model="tiny", items=items)
    )

    async def batch_at_step_5() -> bool:
        events = await events_of(client, items[0].generation_id)
        return any(isinstance(e, ProgressEvent) and e.step >= 5 for _, e in events)

    await until(batch_at_step_5, 60)
    premium = job(prompt="cut in line", steps=4, seed=5)
    await enqueue_generation(client, premium, owner="test")

    premium_result = await result_of(client, premium.generation_id)
    batch_results = [await result_of(client, i.generation_id) for i in items]
    assert premium_result.status is Status.SUCCEEDED
    assert all(r.status is Status.SUCCEEDED for r in batch_results)
    assert premium_result.finished_at < min(r.finished_at for r in batch_results)

    # The premium call ran between two steps of the batch: batch progress
    # before its start and after its last image.
    premium_events = await events_of(client, premium.generation_id)
    premium_start = stream_ms(premium_events[0][0])
    premium_end = stream_ms(premium_events[-1][0])
    batch_steps = [
        (stream_ms(entry), e.step)
        for entry, e in await events_of(client, items[0].generation_id)
        if isinstance(e, ProgressEvent)
    ]
    before = [step for at, step in batch_steps if at < premium_start]
    after = [step for at, step in batch_steps if at > premium_end]
    assert before and after and max(before) < min(after)
    assert [step for _, step in batch_steps] == list(range(1, 51))

    # ... and the batch's images are exactly those of an undisturbed run.
    reference = reference_pngs(tiny_engine, items)
    for item, result in zip(items, batch_results, strict=True):
        assert [i.sha256 for i in result.images] == [
            sha256_hex(png) for png in reference[str(item.generation_id)]
        ]


async def test_cancel_stops_within_one_step(
    node: Any, client: redis.asyncio.Redis
) -> None:
    request = job(width=128, height=128, steps=200)
    await enqueue_generation(client, request, owner="test")

    async def at_step_3() -> int:
        events = await events_of(client, request.generation_id)
        steps = [e.step for _, e in events if isinstance(e, ProgressEvent)]
        return max(steps, default=0) if max(steps, default=0) >= 3 else 0

    await until(at_step_3, 60)
    # The node's step counter is bumped on the pipeline thread itself, after
    # the cancel check of each step: no publishing lag in this count.
    registry = node.metrics.registry
    before = registry.get_sample_value("sdapi_gpu_steps_total")
    await request_cancel(client, request.generation_id)
    result = await result_of(client, request.generation_id)
    after = registry.get_sample_value("sdapi_gpu_steps_total")

    assert result.status is Status.CANCELLED and not result.images
    # The step running when the flag was set may finish; no step after it.
    assert after - before <= 1
    events = [e for _, e in await events_of(client, request.generation_id)]
    assert max(e.step for e in events if isinstance(e, ProgressEvent)) < 200
    assert not any(isinstance(e, ImageEvent) for e in events)


async def test_cancel_before_start_and_inside_batch(
    node: Any, client: redis.asyncio.Redis
) -> None:
    early = job()
    await request_cancel(client, early.generation_id)
    await enqueue_generation(client, early, owner="test")
    result = await result_of(client, early.generation_id)
    assert result.status is Status.CANCELLED and result.started_at is None

    keep = job(Tier.NORMAL, prompt="keep me", steps=40, seed=3)
    drop = job(Tier.NORMAL, prompt="drop me", steps=40, seed=4)
    await enqueue_batch(
        client, BatchJob(batch_id=keep.generation_id, model="tiny", items=[keep, drop])
    )

    async def started() -> bool:
        events = await events_of(client, drop.generation_id)
        return any(isinstance(e, ProgressEvent) for _, e in events)

    await until(started, 60)
    await request_cancel(client, drop.generation_id)
    kept = await result_of(client, keep.generation_id)
    dropped = await result_of(client, drop.generation_id)
    assert dropped.status is Status.CANCELLED and not dropped.images
    assert kept.status is Status.SUCCEEDED and len(kept.images) == 1
    keep_steps = [
        e.step
        for _, e in await events_of(client, keep.generation_id)
        if isinstance(e, ProgressEvent)
    ]
    assert keep_steps == list(range(1, 41))


async def test_duplicate_delivery_is_skipped(
    node: Any, client: redis.asyncio.Redis
) -> None:
    request = job()
    await enqueue_generation(client, request, owner="test")
    first = await result_of(client, request.generation_id)
    # arq runs jobs at least once: a second run of the same attempt finds the
    # result already handed over and does no GPU work.
    from arq.jobs import Job

    from sdapi.contract.names import GENERATE_FUNCTION, premium_queue
    from sdapi.infra.queue import deserialize, enqueue

    await enqueue(
        client, GENERATE_FUNCTION, request, queue=premium_queue("tiny"), job_id="again"
    )
    again = Job(
        "again", client, _queue_name=premium_queue("tiny"), _deserializer=deserialize
    )
    info = await until(again.result_info, 10)
    assert info.success and info.result == ""  # nothing left to generate
    events = [e for _, e in await events_of(client, request.generation_id)]
    assert sum(isinstance(e, StartedEvent) for e in events) == 1
    assert (await result_of(client, request.generation_id)) == first


async def test_bad_payload_fails_the_job_without_retry(
    node: Any, client: redis.asyncio.Redis
) -> None:
    from arq.jobs import Job

    from sdapi.contract.names import GENERATE_FUNCTION, premium_queue
    from sdapi.infra.queue import deserialize

    await client.enqueue_job(  # type: ignore[attr-defined]
        GENERATE_FUNCTION,
        {"prompt": "no id"},
        _job_id="bad",
        _queue_name=premium_queue("tiny"),
    )
    arq_job = Job(
        "bad", client, _queue_name=premium_queue("tiny"), _deserializer=deserialize
    )

    async def finished() -> Any:
        return await arq_job.result_info()

    info = await until(finished, 10)
    assert info.success is False and info.job_try == 1
    assert "InvalidPayload" in str(info.result)


async def test_job_timeout_stops_the_call_and_fails_it(
    models_dir: Path, clean_redis: str, tiny_engine: Engine, client: redis.asyncio.Redis
) -> None:
    # A job's limit comes from its size and the node's time budget; this
    # node's budget is about one second for the whole request.
    settings = node_settings(
        models_dir,
        clean_redis,
        gpu_timeout_base_s=1.0,
        gpu_timeout_per_image_step_s=0.0,
    )
    request = job(width=128, height=128, steps=500)
    async with running_node(settings, clean_redis, tiny_engine):
        await enqueue_generation(client, request, owner="test")  # type: ignore[arg-type]
        result = await result_of(client, request.generation_id)
    assert result.status is Status.FAILED
    assert result.error is not None and result.error.code == "timeout"
    # Stopped at a step boundary long before its 500 steps (~10 s here).
    assert result.started_at is not None
    assert (result.finished_at - result.started_at).total_seconds() < 5
    steps = [
        e.step
        for _, e in await events_of(client, request.generation_id)
        if isinstance(e, ProgressEvent)
    ]
    assert max(steps, default=0) < 500


async def test_a_second_run_keeps_the_first_runs_pngs(
    node: Any, client: redis.asyncio.Redis
) -> None:
    # A run that lost its lease, or a re-enqueue, may draw other bytes on a
    # GPU: every result of the generation describes the PNG stored first.
    request = job(steps=2, num_images=2)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    first = buffer.getvalue()
    await client.set(image_key(request.generation_id, 0), first)
    await enqueue_generation(client, request, owner="test")
    result = await result_of(client, request.generation_id)

    assert result.status is Status.SUCCEEDED
    kept, made = result.images
    assert (kept.sha256, kept.size_bytes) == (sha256_hex(first), len(first))
    assert await client.get(image_key(request.generation_id, 0)) == first
    assert 0 < await client.ttl(image_key(request.generation_id, 0))
    second = await client.get(image_key(request.generation_id, 1))
    assert second is not None and sha256_hex(second) == made.sha256
    events = [e for _, e in await events_of(client, request.generation_id)]
    assert [e.sha256 for e in events if isinstance(e, ImageEvent)] == [
        kept.sha256,
        made.sha256,
    ]


async def test_a_failed_start_notice_keeps_the_work(
    node: Any, client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable(item: Any) -> None:
        raise RuntimeError("the jobs queue is unavailable")

    monkeypatch.setattr(node.tasks, "_mark_started", unavailable)
    request = job(steps=2)
    await enqueue_generation(client, request, owner="test")
    result = await result_of(client, request.generation_id)
    assert result.status is Status.SUCCEEDED and len(result.images) == 1


async def test_pndm_progress_counts_the_requested_steps(
    node: Any, client: redis.asyncio.Redis
) -> None:
    # PNDM runs one denoising iteration more than the steps asked for.
    request = job(scheduler="pndm", steps=4)
    await enqueue_generation(client, request, owner="test")
    result = await result_of(client, request.generation_id)
    assert result.status is Status.SUCCEEDED
    progress = [
        (e.step, e.total)
        for _, e in await events_of(client, request.generation_id)
        if isinstance(e, ProgressEvent)
    ]
    assert progress == [(s, 4) for s in range(1, 5)]
    stored = await client.hgetall(progress_key(request.generation_id))
    assert {k: stored[k] for k in (b"step", b"total")} == {
        b"step": b"4",
        b"total": b"4",
    }
    # When it started and when that step was made (the job's own rate).
    assert float(stored[b"t0"]) <= float(stored[b"at"])


async def test_images_split_over_calls_report_progress_once_through(
    node: Any, client: redis.asyncio.Redis
) -> None:
    # Six images on a node of batch 4: two calls, one progress bar.
    request = job(steps=3, num_images=6)
    await enqueue_generation(client, request, owner="test")
    result = await result_of(client, request.generation_id)
    assert result.status is Status.SUCCEEDED and len(result.images) == 6
    progress = [
        (e.step, e.total)
        for _, e in await events_of(client, request.generation_id)
        if isinstance(e, ProgressEvent)
    ]
    assert progress == [(1, 3), (2, 3), (3, 3)]


async def test_a_payload_past_the_bounds_fails_its_generations(
    node: Any, client: redis.asyncio.Redis
) -> None:
    from arq.jobs import Job

    from sdapi.contract.names import (
        BATCH_FUNCTION,
        GENERATE_FUNCTION,
        batch_queue,
        premium_queue,
    )
    from sdapi.infra.queue import deserialize

    alone = job(attempt=2)
    payload = alone.model_dump(mode="json")
    payload["params"]["steps"] = 100_000
    await client.enqueue_job(  # type: ignore[attr-defined]
        GENERATE_FUNCTION, payload, _job_id="huge", _queue_name=premium_queue("tiny")
    )
    good, bad = job(Tier.NORMAL), job(Tier.NORMAL)
    batch = BatchJob(batch_id=good.generation_id, model="tiny", items=[good, bad])
    batch_payload = batch.model_dump(mode="json")
    batch_payload["items"][1]["params"]["num_images"] = 1000
    await client.enqueue_job(  # type: ignore[attr-defined]
        BATCH_FUNCTION,
        batch_payload,
        _job_id="huge-batch",
        _queue_name=batch_queue("tiny"),
    )

    result = await result_of(client, alone.generation_id, attempt=2)
    assert result.status is Status.FAILED and result.error is not None
    assert result.error.code == "invalid_request"
    assert "params.steps" in result.error.message
    for item in (good, bad):
        failed = await result_of(client, item.generation_id)
        assert failed.status is Status.FAILED and failed.error is not None
        assert failed.error.code == "invalid_request"
    arq_job = Job(
        "huge", client, _queue_name=premium_queue("tiny"), _deserializer=deserialize
    )
    info = await until(arq_job.result_info, 10)
    assert info.success is False and "InvalidPayload" in str(info.result)


async def test_a_lost_claim_stops_the_job_undelivered(
    models_dir: Path,
    clean_redis: str,
    tiny_engine: Engine,
    client: redis.asyncio.Redis,
) -> None:
    from arq.constants import in_progress_key_prefix
    from arq.jobs import Job

    from sdapi.contract.names import premium_queue, result_job_id
    from sdapi.infra.queue import deserialize
    from tests.gpu_node.support import queued_payload

    settings = node_settings(models_dir, clean_redis, gpu_job_lease_s=2)
    request = job(width=128, height=128, steps=300)
    async with running_node(settings, clean_redis, tiny_engine):
        await enqueue_generation(client, request, owner="test")

        async def at_step_3() -> bool:
            events = await events_of(client, request.generation_id)
            return any(isinstance(e, ProgressEvent) and e.step >= 3 for _, e in events)

        await until(at_step_3, 60)

        # This node's claim expired and another node's now stands in its place.
        await client.set(
            in_progress_key_prefix + str(request.generation_id), b"1", px=60_000
        )
        arq_job = Job(
            str(request.generation_id),
            client,
            _queue_name=premium_queue("tiny"),
            _deserializer=deserialize,
        )
        info = await until(arq_job.result_info, 30)
    assert info.result == "lease lost"
    assert await queued_payload(client, result_job_id(request.generation_id)) is None
    steps = [
        e.step
        for _, e in await events_of(client, request.generation_id)
        if isinstance(e, ProgressEvent)
    ]
    assert max(steps) < 300


async def test_inputs_come_from_redis_by_hash_and_bad_ones_fail_clearly(
    node: Any, client: redis.asyncio.Redis
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="PNG")
    data = buffer.getvalue()
    digest = sha256_hex(data)
    await client.set(input_key(digest), data)
    good = job(init_image_sha256=digest, strength=0.5)
    missing = job(init_image_sha256="e" * 64, strength=0.5)
    # Bytes under another image's name: refused, not run.
    await client.set(input_key("f" * 64), data)
    forged = job(init_image_sha256="f" * 64, strength=0.5)
    for request in (good, missing, forged):
        await enqueue_generation(client, request, owner="test")
    result = await result_of(client, good.generation_id)
    assert result.status is Status.SUCCEEDED
    # 4 steps at strength 0.5: 2 steps, and the progress total says so.
    progress = [
        (event.step, event.total)
        for _, event in await events_of(client, good.generation_id)
        if isinstance(event, ProgressEvent)
    ]
    assert progress == [(1, 2), (2, 2)]
    png = await client.get(image_key(good.generation_id, 0))
    with Image.open(io.BytesIO(png)) as made:
        manifest = json.loads(made.text["sdapi"])  # type: ignore[attr-defined]
        assert "Denoising strength: 0.5" in made.text["parameters"]  # type: ignore[attr-defined]
    assert manifest["init_image_sha256"] == digest and manifest["strength"] == 0.5
    failed = await result_of(client, missing.generation_id)
    assert failed.error is not None and failed.error.code == "input_unavailable"
    refused = await result_of(client, forged.generation_id)
    assert refused.error is not None and "SHA-256" in refused.error.message


async def test_an_inpainting_batch_yields_to_premium_and_cancels_within_a_step(
    node: Any, client: redis.asyncio.Redis
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), (90, 90, 200)).save(buffer, format="PNG")
    image = buffer.getvalue()
    buffer = io.BytesIO()
    Image.new("L", (128, 128), 255).save(buffer, format="PNG")
    mask = buffer.getvalue()
    for data in (image, mask):
        await client.set(input_key(sha256_hex(data)), data)
    inputs = {"init_image_sha256": sha256_hex(image), "mask_sha256": sha256_hex(mask)}
    items = [
        job(Tier.NORMAL, width=128, height=128, steps=200, seed=seed, **inputs)
        for seed in (1, 2)
    ]
    await enqueue_batch(
        client, BatchJob(batch_id=uuid.uuid4(), model="tiny", items=items)
    )

    async def at_step_3() -> int:
        events = await events_of(client, items[0].generation_id)
        steps = [e.step for _, e in events if isinstance(e, ProgressEvent)]
        return max(steps, default=0) if max(steps, default=0) >= 3 else 0

    await until(at_step_3, 60)
    # Premium work runs at the batch's next step boundary, then the batch goes on.
    premium = job(steps=2, init_image_sha256=sha256_hex(image), strength=1.0)
    await enqueue_generation(client, premium, owner="test")
    assert (await result_of(client, premium.generation_id)).status is Status.SUCCEEDED
    await request_cancel(client, items[0].generation_id)
    await request_cancel(client, items[1].generation_id)
    for item in items:
        result = await result_of(client, item.generation_id)
        assert result.status is Status.CANCELLED and not result.images
