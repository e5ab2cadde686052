"""Opening, migrating and (in tests) emptying the database."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from tortoise import Tortoise
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.backends.base.config_generator import expand_db_url
from tortoise.context import TortoiseContext, set_global_context
from tortoise.exceptions import ConfigurationError
from tortoise.models import Model

MODELS_MODULE = "sdapi.db.models"
MIGRATIONS_MODULE = "sdapi.db.migrations"
APP_LABEL = "models"


# Tortoise keeps a model's table and connection on `Model._meta`, which it
# does not document: every use goes through these two, and
# tests/test_private_apis.py pins the names.


def table_name(model: type[Model]) -> str:
    """The table `model` is stored in (as SQL names it)."""
    return model._meta.db_table


def model_connection(model: type[Model]) -> BaseDBAsyncClient:
    """The connection `model` reads and writes through in the current context."""
    return model._meta.db


def insert_columns(instance: Model) -> list[tuple[str, str, Any]]:
    """(column, SQL type, value as the database takes it) for each column of an
    unsaved `instance`, as Tortoise's own INSERT would write them: for an
    INSERT ... SELECT of our own, which Tortoise cannot build."""
    meta = instance._meta
    columns = []
    for name, column in meta.fields_db_projection.items():
        field = meta.fields_map[name]
        if field.generated:
            continue
        value = field.to_db_value(getattr(instance, name), instance)
        columns.append((column, field.get_for_dialect("postgres", "SQL_TYPE"), value))
    return columns


def mark_inserted(instance: Model) -> None:
    """`instance` was inserted by a query of ours: Tortoise may now relate
    other rows to it (it refuses unsaved instances as foreign keys)."""
    instance._saved_in_db = True


async def _keep_session(connection: object) -> None:
    """A pooled connection's reset: nothing beyond asyncpg's own rollback."""


def tortoise_config(
    database_url: str, *, pool_size: int = 10, deadline_s: float | None = None
) -> dict[str, Any]:
    """Tortoise config for our one app and its migrations package.

    With `deadline_s`, connecting and every statement give up after that long
    (TimeoutError): a stalled PostgreSQL is a quick 503 on a request path.
    """
    url = database_url.replace("postgresql://", "postgres://", 1)
    sep = "&" if "?" in url else "?"
    dsn = f"{url}{sep}minsize=1&maxsize={pool_size}"
    connection = expand_db_url(dsn)
    # asyncpg's pool sends `RESET ALL; UNLISTEN *; CLOSE ALL;
    # pg_advisory_unlock_all()` on every release, one more round trip per
    # query outside a transaction (a sixth of a submit's CPU, measured in
    # docs/BENCHMARKS.md). We set nothing per session, LISTEN through Redis
    # only and take transaction-scoped advisory locks only, so there is
    # nothing to reset; asyncpg still rolls back an open transaction first.
    connection["credentials"]["reset"] = _keep_session
    if deadline_s is not None:
        connection["credentials"].update(command_timeout=deadline_s, timeout=deadline_s)
    return {
        "connections": {"default": connection},
        "apps": {
            APP_LABEL: {
                "models": [MODELS_MODULE],
                "default_connection": "default",
                "migrations": MIGRATIONS_MODULE,
            }
        },
        "use_tz": True,
        "timezone": "UTC",
    }


@contextlib.asynccontextmanager
async def open_database(
    database_url: str, *, pool_size: int = 10, deadline_s: float | None = None
) -> AsyncIterator[TortoiseContext]:
    """Initialise Tortoise once for this process; close it on exit.

    A process opens its database once, in `cleanup_ctx` or arq's `on_startup`,
    never per request.
    """
    ctx = TortoiseContext()
    # Current for this task and every task it starts (arq jobs, the server's
    # request handlers, periodic loops) ...
    ctx.__enter__()
    try:
        config = tortoise_config(
            database_url, pool_size=pool_size, deadline_s=deadline_s
        )
        await ctx.init(config=config)
        # ... and the process-wide fallback for tasks that did not inherit it.
        # Only one context can be the fallback: a second one in the same
        # process (tests running an app and a worker side by side) relies on
        # the context variable alone.
        with contextlib.suppress(ConfigurationError):
            set_global_context(ctx)
        yield ctx
    finally:
        await ctx.close_connections()
        # Cleanup may run in another task than start-up (test fixtures).
        with contextlib.suppress(ValueError):
            ctx.__exit__(None, None, None)


async def apply_migrations(database_url: str) -> list[str]:
    """Apply every pending migration; return the names applied."""
    from tortoise.migrations.api import migrate

    applied: list[str] = []

    def progress(event: str, app_label: str, name: str) -> None:
        if event == "apply_done":
            applied.append(f"{app_label}.{name}")

    try:
        await migrate(
            config=tortoise_config(database_url, pool_size=2), progress=progress
        )
    finally:
        await Tortoise.close_connections()
    return applied


async def truncate_all(database_url: str) -> None:
    """Empty every table of our app (tests only)."""
    async with open_database(database_url, pool_size=1) as ctx:
        apps = ctx.apps
        if apps is None:
            raise RuntimeError("Tortoise has no apps after init")
        tables = [table_name(model) for model in apps.get_models_iterable()]
        quoted = ", ".join(f'"{table}"' for table in tables)
        await ctx.db().execute_script(f"TRUNCATE {quoted} RESTART IDENTITY CASCADE")
