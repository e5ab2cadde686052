"""Deletes objects from the image stores, as queued in `storage_deletions`.

Rows come from the deletion trigger (an image row deleted: a purge, the
clean-up, an account gone), from `sdapi storage migrate` (the copy it moved
away from) and from every write (a day ahead, for an object whose row never
committed). An object that an image row still names is never deleted: its
queued deletion is dropped instead. A store that fails keeps its rows, retried
with backoff, so an object is gone once its store answers again.

Claims hold their rows' locks (`SKIP LOCKED`: any number of deleters) until
the objects are gone: `sdapi storage migrate`, before it writes an object
back into a store, deletes that object's queued deletions and so waits for a
deleter in the middle of deleting it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

from tortoise.transactions import in_transaction

from jobs.outbox_claims import database_now
from jobs.resources import JobsResources
from sdapi.db.connection import model_connection
from sdapi.db.image_store import ImageStores
from sdapi.db.models import StorageDeletion
from sdapi.infra.backoff import backoff_s
from sdapi.infra.object_store import BadStoreUrl, StoreError

log = logging.getLogger(__name__)

# Rows one claim takes (one transaction, one delete call per store).
BATCH = 500
# Claims one round makes at most; the rest wait for the next round.
BATCHES_PER_ROUND = 20
# last_error is for people: the first part of a long message is enough.
ERROR_CHARS = 500

_IN_USE = """
SELECT store, object_key FROM generated_images WHERE object_key = ANY($1)
UNION
SELECT store, object_key FROM input_images WHERE object_key = ANY($1)
"""


@dataclass(frozen=True)
class DeletionReport:
    deleted: int = 0  # objects deleted (or found gone already)
    in_use: int = 0  # queued deletions dropped: a row names the object
    failed: int = 0  # left for a retry: their store failed


async def _in_use(keys: list[str]) -> set[tuple[str, str]]:
    """Which (store, object_key) of these keys an image row names."""
    rows = await model_connection(StorageDeletion).execute_query_dict(_IN_USE, [keys])
    return {(row["store"], row["object_key"]) for row in rows}


async def _delete_batch(
    images: ImageStores, *, backoff_base: float, backoff_max: float
) -> DeletionReport | None:
    """Claim one batch of due deletions and carry it out; None if none is due."""
    async with in_transaction():
        now = await database_now()
        rows = (
            await StorageDeletion.select_for_update(skip_locked=True)
            .filter(not_before__lte=now)
            .order_by("not_before", "id")
            .limit(BATCH)
        )
        if not rows:
            return None
        named = await _in_use(sorted({row.object_key for row in rows}))
        done = [row.id for row in rows if (row.store, row.object_key) in named]
        in_use = len(done)
        by_store: dict[str, list[StorageDeletion]] = defaultdict(list)
        for row in rows:
            if (row.store, row.object_key) not in named:
                by_store[row.store].append(row)
        failed = 0
        for location, queued in by_store.items():
            keys = sorted({row.object_key for row in queued})
            try:
                await images.at(location).delete(keys)
            except (StoreError, BadStoreUrl) as exc:
                failed += len(queued)
                log.warning(
                    "deleting %d object(s) from %s failed; retrying later: %s",
                    len(keys),
                    location,
                    exc,
                )
                # The backoff counts from the failure, not the claim (the
                # failing call may have taken the whole deadline).
                failed_at = await database_now()
                for row in queued:
                    delay = backoff_s(
                        row.attempts + 1, base=backoff_base, cap=backoff_max, jitter=0.2
                    )
                    await StorageDeletion.filter(id=row.id).update(
                        attempts=row.attempts + 1,
                        last_error=str(exc)[:ERROR_CHARS] or type(exc).__name__,
                        not_before=failed_at + timedelta(seconds=delay),
                    )
                continue
            done.extend(row.id for row in queued)
        if done:
            await StorageDeletion.filter(id__in=done).delete()
    return DeletionReport(deleted=len(done) - in_use, in_use=in_use, failed=failed)


async def delete_queued_objects(
    images: ImageStores, *, backoff_base: float, backoff_max: float
) -> DeletionReport:
    """Every due deletion (up to BATCHES_PER_ROUND claims), with `images`."""
    deleted = in_use = failed = 0
    for _ in range(BATCHES_PER_ROUND):
        report = await _delete_batch(
            images, backoff_base=backoff_base, backoff_max=backoff_max
        )
        if report is None:
            break
        deleted += report.deleted
        in_use += report.in_use
        failed += report.failed
        if report.failed:
            # A store is failing: what is left waits for the next round
            # rather than trying that store again at once.
            break
    if deleted or in_use:
        log.info("deleted %d stored object(s), kept %d in use", deleted, in_use)
    return DeletionReport(deleted=deleted, in_use=in_use, failed=failed)


async def delete_due_objects(resources: JobsResources) -> DeletionReport:
    """One round of the jobs worker's periodic task."""
    return await delete_queued_objects(
        resources.stores,
        backoff_base=resources.settings.storage_deletion_backoff_base,
        backoff_max=resources.settings.storage_deletion_backoff_max,
    )
