"""Clean-up: idempotency keys past their 24 h, and inputs no generation uses.

Input images are stored once per user and shared by that user's generations;
one stays while a generation uses it and goes in the round after the last
such generation is deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tortoise.transactions import in_transaction

from jobs.resources import JobsResources
from sdapi.db.models import (
    IDEMPOTENCY_KEY_TTL,
    IdempotencyKey,
    InputImage,
    User,
    utcnow,
)

log = logging.getLogger(__name__)

# Users whose unused inputs one round deletes (the rest wait for the next).
USERS_PER_ROUND = 100


@dataclass(frozen=True)
class CleanupReport:
    idempotency_keys: int
    input_images: int


async def delete_unused_inputs(user_id: object) -> int:
    """Delete one user's inputs that no generation uses; how many."""
    async with in_transaction():
        # A submit holds the user's row lock while it links an input it
        # found: taking the lock here means no input goes under a new link.
        await User.select_for_update().filter(id=user_id).first()
        unused = await InputImage.filter(
            user_id=user_id, uses__id__isnull=True
        ).values_list("id", flat=True)
        if not unused:
            return 0
        return await InputImage.filter(id__in=list(unused)).delete()


async def clean_up(resources: JobsResources) -> CleanupReport:
    """One clean-up round."""
    keys = await IdempotencyKey.filter(
        created_at__lt=utcnow() - IDEMPOTENCY_KEY_TTL
    ).delete()
    owners = (
        await InputImage.filter(uses__id__isnull=True)
        .distinct()
        .limit(USERS_PER_ROUND)
        .values_list("user_id", flat=True)
    )
    images = 0
    for owner in owners:
        images += await delete_unused_inputs(owner)
    if keys or images:
        log.info("cleaned up %d idempotency keys and %d input images", keys, images)
    return CleanupReport(idempotency_keys=keys, input_images=images)
