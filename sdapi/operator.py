"""Operator commands: migrations, premium codes, premium grants, image moves.

They use SDAPI_DATABASE_URL, or else the embedded PostgreSQL of SDAPI_DATA_DIR
(attached to while `sdapi dev` runs, started for the command otherwise, then
migrated so a fresh data folder works). Stdout carries only the command's
result (e.g. the codes, one per line); logs and errors go to stderr. Each
returns the process exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from tortoise.exceptions import BaseORMException
from tortoise.transactions import in_transaction

from sdapi.contract.names import USERS_CHANGED_CHANNEL
from sdapi.db.connection import apply_migrations, open_database
from sdapi.db.image_store import ImageStores
from sdapi.db.models import PremiumCode, User, utcnow
from sdapi.db.premium import (
    MAX_DAYS,
    add_premium_days,
    canonical_code,
    code_hash,
    new_code,
)
from sdapi.infra.logs import setup_logging
from sdapi.infra.object_store import BadStoreUrl, parse_store_url
from sdapi.infra.settings import CommonSettings
from sdapi.storage_migration import StorageMover

log = logging.getLogger(__name__)

MAX_CODES = 10_000

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _error(message: str) -> None:
    print(f"sdapi: {message}", file=sys.stderr)  # noqa: T201 (the operator's answer)


def _report(message: str) -> None:
    """Progress for the operator on stderr, whatever the log level (stdout is
    kept for results)."""
    print(message, file=sys.stderr)  # noqa: T201


@contextlib.contextmanager
def _database(settings: CommonSettings) -> Iterator[tuple[str, bool]]:
    """The database URL, and whether it is the embedded one of the data folder."""
    if settings.database_url:
        yield settings.database_url, False
        return
    from sdapi.devtools.embedded import embedded_postgres

    log.info(
        "SDAPI_DATABASE_URL is not set: using the database in %s", settings.data_dir
    )
    with embedded_postgres(settings.data_dir) as url:
        yield url, True


def _run(
    work: Callable[[str], Coroutine[Any, Any, int]],
    *,
    migrate_embedded: bool = True,
    settings: CommonSettings | None = None,
) -> int:
    """Settings, logging and a database for one command; errors as one line."""
    settings = settings or CommonSettings.from_env()
    setup_logging(settings.log_level)
    try:
        with _database(settings) as (url, embedded):
            if embedded and migrate_embedded:
                for name in asyncio.run(apply_migrations(url)):
                    _report(f"applied migration {name}")
            return asyncio.run(work(url))
    except (BaseORMException, OSError) as exc:
        _error(f"database error: {exc}")
        return EXIT_FAILED


def migrate() -> int:
    """`sdapi migrate`: apply pending migrations; list them on stderr."""

    async def work(url: str) -> int:
        applied = await apply_migrations(url)
        for name in applied:
            _report(f"applied migration {name}")
        if not applied:
            _report("the database is up to date; nothing to apply")
        return EXIT_OK

    return _run(work, migrate_embedded=False)


def _check_days(days: int) -> bool:
    if 1 <= days <= MAX_DAYS:
        return True
    _error(f"--days must be between 1 and {MAX_DAYS} (got {days})")
    return False


def create_premium_codes(*, days: int, count: int) -> int:
    """`sdapi premium-code create`: print `count` new codes, one per line."""
    if not _check_days(days):
        return EXIT_USAGE
    if not 1 <= count <= MAX_CODES:
        _error(f"--count must be between 1 and {MAX_CODES} (got {count})")
        return EXIT_USAGE
    codes = [new_code() for _ in range(count)]

    async def work(url: str) -> int:
        async with open_database(url, pool_size=1):
            rows = []
            for code in codes:
                canonical = canonical_code(code)
                if canonical is None:  # new_code and canonical_code disagree
                    raise RuntimeError(f"generated an unparsable code {code!r}")
                rows.append(PremiumCode(code_hash=code_hash(canonical), days=days))
            async with in_transaction():
                await PremiumCode.bulk_create(rows)
        return EXIT_OK

    status = _run(work)
    if status == EXIT_OK:
        # Printed only once stored: every printed code works.
        sys.stdout.write("".join(f"{code}\n" for code in codes))
        sys.stdout.flush()
        log.info("created %d premium code(s) worth %d day(s) each", count, days)
    return status


# How long telling the web replicas of a changed user may take (seconds).
ANNOUNCE_TIMEOUT_S = 2.0


async def _announce_user_changed(user_id: uuid.UUID) -> None:
    """Web replicas drop the user's cached tokens (the change shows at once
    rather than after `token_cache_ttl_s`)."""
    url = CommonSettings.from_env().redis_url
    if url is None:
        return
    client = Redis.from_url(url)
    try:
        async with asyncio.timeout(ANNOUNCE_TIMEOUT_S):
            await client.publish(USERS_CHANGED_CHANNEL, str(user_id).encode())
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning(
            "web replicas not told of the change (%s): it shows within "
            "their token cache's age",
            exc,
        )
    finally:
        await client.aclose()


def set_premium(*, email: str, days: int) -> int:
    """`sdapi user set-premium`: add `days` of premium to the account of `email`."""
    if not _check_days(days):
        return EXIT_USAGE
    email_key = email.strip().lower()

    async def work(url: str) -> int:
        async with open_database(url, pool_size=1):
            async with in_transaction():
                user = await User.get_or_none(email_key=email_key)
                if user is None:
                    _error(f"no account with the email address {email.strip()!r}")
                    return EXIT_FAILED
                user = await add_premium_days(user.id, days, utcnow())
        await _announce_user_changed(user.id)
        until = user.premium_until
        shown = f"{until:%Y-%m-%d %H:%M:%S} UTC" if until else "?"
        sys.stdout.write(f"{user.email} is premium until {shown}\n")
        return EXIT_OK

    return _run(work)


def migrate_storage(*, to: str, batch_size: int) -> int:
    """`sdapi storage migrate --to URL`: move every image to the store at URL.

    Exit 0 when every image is there, 1 when some are not (a rerun retries
    them), 2 on a bad URL. SDAPI_STORAGE_URL is left for the operator.
    """
    try:
        target = parse_store_url(to).location
    except BadStoreUrl as exc:
        _error(f"--to: {exc}")
        return EXIT_USAGE
    settings = CommonSettings.from_env()

    async def work(url: str) -> int:
        async with open_database(url, pool_size=4):
            images = ImageStores(target, timeout_s=settings.storage_timeout)
            try:
                mover = StorageMover(
                    images,
                    presign_s=settings.storage_presign_s,
                    batch_size=batch_size,
                    progress=_report,
                )
                report = await mover.run()
                left = await mover.to_move()
            finally:
                await images.close()
        moved = report.moved
        _report(
            f"moved {report.total_moved} image(s) to {target} "
            f"({moved.get('results', 0)} results, {moved.get('inputs', 0)} "
            f"inputs); {report.gone} deleted or moved meanwhile; "
            f"{len(report.failures)} failed"
        )
        for failure in report.failures:
            _report(f"  not moved: {failure}")
        if report.stopped:
            _error("stopped: the stores kept failing; run the command again")
        still = sum(left.values())
        if still:
            _report(
                f"{still} image(s) still name another store "
                "(failed, or written there since); run the command again"
            )
        else:
            _report(
                f"every image is in {target}; the old copies are deleted by "
                "`sdapi jobs` once downloads that began before the move are over"
            )
        return EXIT_FAILED if report.failures or report.stopped else EXIT_OK

    return _run(work, settings=settings)
