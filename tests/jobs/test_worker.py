"""The jobs worker's start-up and shutdown of its resources."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jobs import worker
from jobs.settings import JobsSettings


async def test_a_failed_start_closes_what_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def database(url: str) -> AsyncIterator[None]:
        events.append("database opened")
        try:
            yield
        finally:
            events.append("database closed")

    @contextlib.asynccontextmanager
    async def consul(url: str) -> AsyncIterator[None]:
        raise ConnectionError("no Consul agent")
        yield  # pragma: no cover

    monkeypatch.setattr(worker, "open_database", database)
    monkeypatch.setattr(worker, "open_consul", consul)
    settings = JobsSettings(
        database_url="postgres://nobody@db.invalid/sdapi",
        redis_url="redis://127.0.0.1:1/0",
        consul_url="http://127.0.0.1:8500",
        data_dir=tmp_path,
    )
    ctx: dict[str, Any] = {"settings": settings, "redis": None}
    with pytest.raises(ConnectionError):
        await worker.on_startup(ctx)
    assert events == ["database opened", "database closed"]
    assert worker.RESOURCES not in ctx
