"""What every route takes: text PostgreSQL can store, and JSON types as published."""

from __future__ import annotations

import types
import typing
from typing import Any

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient
from pydantic import BaseModel

from sdapi.db.models import Generation, User
from sdapi.devtools.accounts import auth, make_user
from tests.node_double import NodeDouble
from web.routes import route_tables
from web.schemas.base import RequestModel, storable
from web.schemas.live import ClientMessage

GENERATIONS = "/api/v1/generations"
SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}
NUL = "a red\x00fox"
SURROGATE = "a red \ud800 fox"


def _models_in(annotation: Any) -> set[type[BaseModel]]:
    """The pydantic models an annotation names, however deeply nested."""
    found: set[type[BaseModel]] = set()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.add(annotation)
    for arg in typing.get_args(annotation):
        found |= _models_in(arg)
    if isinstance(annotation, types.UnionType):
        for arg in annotation.__args__:
            found |= _models_in(arg)
    return found


def _client_models() -> set[type[BaseModel]]:
    """Every model a client's input is validated as, nested ones included."""
    roots: set[type[BaseModel]] = set()
    for table in route_tables():
        for endpoint in table.endpoints:
            roots |= {m for m in (endpoint.body, endpoint.query) if m is not None}
    roots |= _models_in(ClientMessage)
    seen: set[type[BaseModel]] = set()
    todo = list(roots)
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for field in model.model_fields.values():
            todo.extend(_models_in(field.annotation))
    return seen


def test_every_model_a_client_sends_refuses_unstorable_text() -> None:
    models = _client_models()
    assert len(models) >= 10  # bodies, queries, messages and their parts
    outliers = sorted(m.__name__ for m in models if not issubclass(m, RequestModel))
    assert outliers == []


@pytest.mark.parametrize("bad", [NUL, SURROGATE, ["ok", NUL], {"k": SURROGATE}])
def test_unstorable_text_is_refused_wherever_it_hides(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"NUL|surrogate"):
        storable(bad)
    assert storable("a fox 🦊, é") == "a fox 🦊, é"


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("text", [NUL, SURROGATE])
async def test_nul_or_a_surrogate_in_a_prompt_is_a_422_naming_it(
    client: TestClient, node: NodeDouble, field: str, text: str
) -> None:
    _, secret = await make_user()
    response = await client.post(
        GENERATIONS, json={**SMALL, field: text}, headers=auth(secret)
    )
    assert response.status == 422, await response.text()
    [detail] = (await response.json())["error"]["details"]
    assert detail["field"] == field
    assert await Generation.all().count() == 0


async def test_nul_in_a_form_prompt_is_a_422(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    form = FormData(
        {"prompt": NUL, "width": "64", "height": "64"}, default_to_multipart=True
    )
    response = await client.post(GENERATIONS, data=form, headers=auth(secret))
    assert response.status == 422
    [detail] = (await response.json())["error"]["details"]
    assert detail["field"] == "prompt"


async def test_nul_in_a_signup_name_is_a_422(client: TestClient) -> None:
    response = await client.post(
        "/api/v1/auth/signup",
        json={"email": "nul@example.org", "password": "long enough pw", "name": NUL},
    )
    assert response.status == 422
    [detail] = (await response.json())["error"]["details"]
    assert detail["field"] == "name"
    assert not await User.filter(email_key="nul@example.org").exists()


async def test_nul_in_an_openai_prompt_is_a_400_naming_the_param(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    response = await client.post(
        "/v1/images/generations",
        json={"prompt": NUL, "size": "64x64", "model": "tiny"},
        headers=auth(secret),
    )
    assert response.status == 400
    assert (await response.json())["error"]["param"] == "prompt"


async def test_nul_in_a_websocket_generate_is_an_error_frame(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    async with client.ws_connect("/api/v1/ws", headers=auth(secret)) as ws:
        await ws.send_json({"type": "generate", "request": {**SMALL, "prompt": NUL}})
        error = await ws.receive_json(timeout=10)
        assert error["type"] == "error" and error["code"] == "validation_error"
        assert [d["field"] for d in error["details"]] == ["request.prompt"]
        # The socket stays open.
        await ws.send_json({"type": "subscribe", "id": "x\x00"})
        error = await ws.receive_json(timeout=10)
        assert error["code"] == "validation_error"
    assert await Generation.all().count() == 0


async def test_nul_in_a_query_parameter_is_a_422(client: TestClient) -> None:
    _, secret = await make_user()
    response = await client.get(
        GENERATIONS, params={"before": "abc\x00"}, headers=auth(secret)
    )
    assert response.status == 422
    [detail] = (await response.json())["error"]["details"]
    assert detail["field"] == "before"


@pytest.mark.parametrize("value", ["64", 64.0, True])
async def test_integers_are_integers_not_strings_floats_or_booleans(
    client: TestClient, node: NodeDouble, value: Any
) -> None:
    _, secret = await make_user()
    response = await client.post(
        GENERATIONS, json={**SMALL, "width": value}, headers=auth(secret)
    )
    assert response.status == 422
    [detail] = (await response.json())["error"]["details"]
    assert detail["field"] == "width"


async def test_a_whole_number_is_a_valid_float(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    response = await client.post(
        GENERATIONS, json={**SMALL, "guidance_scale": 7}, headers=auth(secret)
    )
    assert response.status == 202, await response.text()


BOUNDARY = "sdapiboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def _multipart(*parts: bytes) -> bytes:
    body = b"".join(
        b"--" + BOUNDARY.encode() + b"\r\n" + part + b"\r\n" for part in parts
    )
    return body + b"--" + BOUNDARY.encode() + b"--\r\n"


@pytest.mark.parametrize(
    ("path", "content_type", "body", "extra"),
    [
        pytest.param(
            GENERATIONS,
            MULTIPART,
            _multipart(b'Content-Disposition: form-data; name="pro\x14mpt"\r\n\r\nfox'),
            {},
            id="control-character-in-a-part-name",
        ),
        pytest.param(
            GENERATIONS,
            MULTIPART,
            _multipart(b"Content-Disposition form-data no colon\r\n\r\nfox"),
            {},
            id="part-header-without-a-colon",
        ),
        pytest.param(
            GENERATIONS,
            MULTIPART,
            b"--another\r\nContent-Disposition: form-data; name=prompt\r\n\r\nx\r\n",
            {},
            id="wrong-boundary",
        ),
        pytest.param(
            GENERATIONS,
            "multipart/form-data; boundary=" + "b" * 80,
            b"--" + b"b" * 80 + b"\r\n\r\nx\r\n",
            {},
            id="boundary-too-long",
        ),
        pytest.param(
            GENERATIONS,
            "multipart/form-data",
            _multipart(b'Content-Disposition: form-data; name="prompt"\r\n\r\nfox'),
            {},
            id="no-boundary",
        ),
        pytest.param(
            GENERATIONS,
            MULTIPART,
            _multipart(
                b'Content-Disposition: form-data; name="prompt"\r\n'
                b"Content-Transfer-Encoding: rot13\r\n\r\nfox"
            ),
            {},
            id="unknown-transfer-encoding",
        ),
        pytest.param(
            GENERATIONS,
            MULTIPART,
            _multipart(
                b'Content-Disposition: form-data; name="prompt"\r\n\r\n\xff\xfe'
            ),
            {},
            id="undecodable-text",
        ),
        pytest.param(
            "/v1/images/edits",
            MULTIPART,
            _multipart(b'Content-Disposition: form-data; name="pro\x14mpt"\r\n\r\nfox'),
            {},
            id="openai-edits-control-character",
        ),
    ],
)
async def test_malformed_body_is_a_400(
    client: TestClient,
    node: NodeDouble,
    caplog: pytest.LogCaptureFixture,
    path: str,
    content_type: str,
    body: bytes,
    extra: dict[str, str],
) -> None:
    _, secret = await make_user()
    response = await client.post(
        path,
        data=body,
        headers={**auth(secret), "Content-Type": content_type, **extra},
    )
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["code"] in {"bad_request", "invalid_request_error"}
    assert not [r for r in caplog.records if r.exc_info]
    assert await Generation.all().count() == 0


@pytest.mark.parametrize("path", [GENERATIONS, "/v1/images/edits"])
async def test_malformed_multipart_part_headers_are_a_400_not_a_500(
    client: TestClient, path: str
) -> None:
    _, secret = await make_user(premium=True)
    # Not a header line after the boundary (what schemathesis sent as a form).
    body = b"--b\r\n[[{}, {'': 1}]]--b--\r\n"
    response = await client.post(
        path,
        data=body,
        headers={**auth(secret), "Content-Type": "multipart/form-data; boundary=b"},
    )
    assert response.status == 400, await response.text()
    assert "malformed" in (await response.text())
