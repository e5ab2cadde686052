"""Schema fuzzing: schemathesis against /openapi.json of a running `sdapi web`.

Every operation gets generated requests (bounded in number and time), with a
normal and a premium token: no answer may be a 5xx, and every answer must
match what the document says of it.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from sdapi.db.connection import open_database, truncate_all
from sdapi.devtools.accounts import make_user
from sdapi.devtools.net import free_port
from tests.e2e.conftest import (
    Service,
    Services,
    own_redis_db,
    sdapi_env,
    start_services,
)

pytestmark = pytest.mark.slow

REDIS_DB = 11
EXAMPLES = 30
# Sign-out would end the token the rest of the run uses.
SKIPPED = {("POST", "/api/v1/auth/signout")}


@pytest.fixture(scope="module")
def web_url(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    own_redis = own_redis_db(redis_url, REDIS_DB)
    asyncio.run(truncate_all(database_url))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    services = Services()
    services.add(
        Service(
            "web",
            "web",
            sdapi_env(
                database_url=database_url,
                redis_url=own_redis,
                data_dir=root / "data",
                secret_key="fuzz-secret-key",
                public_url=url,
                port=port,
                bcrypt_rounds=4,
            ),
            root,
        )
    )
    try:
        start_services(services, url, own_redis)
        yield url
    finally:
        services.stop()


def tokens(database_url: str) -> dict[str, dict[str, str]]:
    async def make() -> dict[str, dict[str, str]]:
        async with open_database(database_url, pool_size=1):
            normal = (await make_user(premium=False)).headers
            premium = (await make_user(premium=True)).headers
        return {"normal": normal, "premium": premium}

    return asyncio.run(make())


@pytest.mark.parametrize("tier", ["normal", "premium"])
def test_no_generated_request_gets_a_5xx_or_an_undocumented_answer(
    web_url: str, database_url: str, tier: str, tmp_path: Path
) -> None:
    headers = tokens(database_url)[tier]
    schema = schemathesis.openapi.from_url(f"{web_url}/openapi.json")
    failures: list[str] = []
    operations = [
        result.ok()
        for result in schema.get_all_operations()
        if (result.ok().method.upper(), result.ok().path) not in SKIPPED
    ]
    assert len(operations) > 20

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                response = case.call(base_url=web_url, headers=headers, timeout=30)
            for validate in (
                not_a_server_error,
                status_code_conformance,
                response_schema_conformance,
            ):
                try:
                    case.validate_response(response, checks=[validate])
                except BaseException as exc:  # a FailureGroup, collected
                    failures.append(
                        f"{case.method.upper()} {case.path} -> "
                        f"{response.status_code}: {_first_line(exc)}"
                    )
                    return

        check()
    assert failures == [], "\n".join(sorted(set(failures))[:30])


def _first_line(exc: BaseException) -> str:
    inner = getattr(exc, "exceptions", None)
    if inner:
        return _first_line(inner[0])
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
