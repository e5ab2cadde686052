"""Handing finished work to `jobs`: PNGs in Redis, results on its queue.

Nothing here touches the database: `jobs` stores what the node hands over,
once, whatever number of times the node hands it over.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpu_node.calls import ModelProfile
from gpu_node.images import ImageManifest, encode_png, sha256_hex
from gpu_node.items import PreparedItem
from gpu_node.resources import NodeResources
from sdapi.contract.events import ImageEvent
from sdapi.contract.names import (
    RESULTS_QUEUE,
    STORE_RESULT_FUNCTION,
    image_key,
    result_job_id,
)
from sdapi.contract.payloads import ErrorInfo, GenerationResult, ImageInfo
from sdapi.contract.status import Status, Tier
from sdapi.infra.clock import utcnow
from sdapi.infra.queue import enqueue

if TYPE_CHECKING:
    from PIL.Image import Image


async def send_result(resources: NodeResources, result: GenerationResult) -> None:
    """Put one attempt's result on the `jobs` queue (once per attempt)."""
    await enqueue(
        resources.redis,
        STORE_RESULT_FUNCTION,
        result,
        queue=RESULTS_QUEUE,
        job_id=result_job_id(result.generation_id, result.attempt),
    )


async def deliver(
    resources: NodeResources,
    profile: ModelProfile,
    items: list[PreparedItem],
    tier: Tier,
) -> None:
    """Store the images of `items` (made by `profile`'s model) and hand every
    item's result to `jobs`."""
    succeeded = [item for item in items if item.status is Status.SUCCEEDED]
    stored = await asyncio.gather(
        *(_store_images(resources, profile, i) for i in succeeded)
    )
    infos = {item.key: images for item, images in zip(succeeded, stored, strict=True)}
    results = [
        GenerationResult(
            generation_id=item.job.generation_id,
            attempt=item.job.attempt,
            status=item.status or Status.FAILED,
            images=infos.get(item.key, []),
            error=item.error,
            node_id=resources.node_id,
            model=profile.model,
            model_hash=profile.model_hash,
            started_at=item.started_at,
            finished_at=utcnow(),
        )
        for item in items
    ]
    # Everything this node says about these generations is in their streams
    # before `jobs` can append `done`.
    await resources.publisher.flush()
    for result in results:
        await send_result(resources, result)
        resources.metrics.generations.labels(tier.value, result.status.value).inc()
        resources.metrics.images.labels(tier.value).inc(len(result.images))


async def refuse(
    resources: NodeResources, payload: Any, error: ValidationError
) -> None:
    """Fail every generation a malformed payload names, saying why.

    The job itself fails for good; without a result, its rows would wait
    for the reconciler and then fail with no reason given.
    """
    named = named_generations(payload)
    if not named:
        return
    problem = error.errors()[0]
    where = ".".join(str(part) for part in problem["loc"]) or "payload"
    reason = ErrorInfo(
        code="invalid_request",
        message=f"the GPU node refused the job: {where}: {problem['msg']}",
    )
    models = resources.models
    profile = models.profile(models.primary)
    for generation_id, attempt in named:
        await send_result(
            resources,
            GenerationResult(
                generation_id=generation_id,
                attempt=attempt,
                status=Status.FAILED,
                error=reason,
                node_id=resources.node_id,
                model=profile.model if profile else models.primary,
                model_hash=profile.model_hash if profile else "",
                finished_at=utcnow(),
            ),
        )


async def _store_images(
    resources: NodeResources, profile: ModelProfile, item: PreparedItem
) -> list[ImageInfo]:
    params = item.job.params
    seeds = params.image_seeds()
    manifests = [
        ImageManifest(
            generation_id=item.key,
            index=index,
            model=profile.model,
            model_hash=profile.model_hash,
            scheduler=params.scheduler,
            seed=seed,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
            width=params.width,
            height=params.height,
            prompt=item.prompt,
            negative_prompt=item.negative_prompt,
            versions=profile.versions,
            init_image_sha256=params.init_image_sha256,
            mask_sha256=params.mask_sha256,
            strength=params.effective_strength
            if params.init_image_sha256 is not None
            else None,
            loras=tuple((lora.name, lora.weight, lora.sha256) for lora in item.loras),
        )
        for index, seed in enumerate(seeds)
    ]
    # Encoding and hashing are CPU work: in threads, the images in parallel
    # (zlib and hashlib let go of the GIL).
    encoded = await asyncio.gather(
        *(
            asyncio.to_thread(_encode, image, manifest)
            for image, manifest in zip(item.images, manifests, strict=True)
        )
    )
    infos: list[ImageInfo] = []
    for index, (seed, image, (png, digest)) in enumerate(
        zip(seeds, item.images, encoded, strict=True)
    ):
        event = ImageEvent(
            index=index,
            seed=seed,
            width=image.width,
            height=image.height,
            sha256=digest,
        )
        # A generation may run twice (a lost lease, a re-enqueue by the
        # reconciler) and a GPU need not draw the same bytes twice: the first
        # PNG stays and every result describes it, so `jobs` never finds an
        # image that does not match its hash. The PNG and its event go in
        # one round trip, after the item's progress.
        kept = await resources.publisher.store_image(
            item.key, image_key(item.key, index), png, event
        )
        size = len(png)
        if kept is not None:
            # An earlier run's PNG stays: the event and result describe it.
            digest = await asyncio.to_thread(sha256_hex, kept)
            size = len(kept)
            resources.publisher.emit(
                item.key, event.model_copy(update={"sha256": digest})
            )
        infos.append(
            ImageInfo(
                index=index,
                seed=seed,
                width=image.width,
                height=image.height,
                sha256=digest,
                size_bytes=size,
            )
        )
    return infos


def _encode(image: Image, manifest: ImageManifest) -> tuple[bytes, str]:
    png = encode_png(image, manifest)
    return png, sha256_hex(png)


def named_generations(payload: Any) -> list[tuple[UUID, int]]:
    """(id, attempt) of each generation a payload names, however bad the rest."""
    if not isinstance(payload, dict):
        return []
    entries = payload.get("items", [payload])
    named: list[tuple[UUID, int]] = []
    for entry in entries if isinstance(entries, list) else []:
        try:
            found = _Named.model_validate(entry)
        except ValidationError:
            continue
        named.append((found.generation_id, found.attempt))
    return named


class _Named(BaseModel):
    model_config = ConfigDict(extra="ignore")

    generation_id: UUID
    attempt: int = Field(default=1, ge=1)
