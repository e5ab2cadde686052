"""Clean-up: expired idempotency keys, and inputs once no generation uses them."""

from __future__ import annotations

import uuid
from datetime import timedelta

from jobs.cleanup import clean_up
from jobs.resources import JobsResources
from sdapi.db.models import (
    Generation,
    GenerationInput,
    IdempotencyKey,
    ImageBlob,
    InputImage,
    InputRole,
    utcnow,
)
from sdapi.devtools.accounts import make_user
from tests.image_support import image_bytes, stored_input
from tests.jobs.conftest import make_generation


async def test_inputs_go_with_their_last_generation_and_old_keys_expire(
    jobs_resources: JobsResources,
) -> None:
    user = (await make_user(premium=False)).user
    first = await make_generation(user)
    second = await make_generation(user)
    image = await stored_input(jobs_resources.stores, user, image_bytes())
    for generation in (first, second):
        await GenerationInput.create(
            id=uuid.uuid4(),
            generation=generation,
            role=InputRole.INIT_IMAGE.value,
            image=image,
        )
    fresh = await IdempotencyKey.create(
        id=uuid.uuid4(),
        user=user,
        key_hash="1" * 64,
        body_hash="2" * 64,
        generation=first,
    )
    old = await IdempotencyKey.create(
        id=uuid.uuid4(),
        user=user,
        key_hash="3" * 64,
        body_hash="4" * 64,
        generation=second,
    )
    await IdempotencyKey.filter(id=old.id).update(
        created_at=utcnow() - timedelta(hours=25)
    )
    report = await clean_up(jobs_resources)
    assert (report.idempotency_keys, report.input_images) == (1, 0)
    assert await IdempotencyKey.filter(id=fresh.id).exists()
    await Generation.filter(id=first.id).delete()
    assert (await clean_up(jobs_resources)).input_images == 0
    assert await InputImage.filter(id=image.id).exists()
    await Generation.filter(id=second.id).delete()
    assert (await clean_up(jobs_resources)).input_images == 1
    assert not await InputImage.filter(id=image.id).exists()
    # Its bytes went with it (tests/jobs/test_storage_deleter.py: other stores).
    assert not await ImageBlob.filter(key=image.object_key).exists()
