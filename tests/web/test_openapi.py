"""The OpenAPI document says what the API validates (tests/e2e/test_schema_fuzz.py
holds the running server to it; these pin each published rule)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from web.openapi import ApiRoutes, Response
from web.openapi_document import build_openapi
from web.routes import route_tables
from web.schemas.accounts import SignupRequest
from web.schemas.generations import GenerationRequest


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_openapi(
        route_tables(),
        title="sdapi",
        version="0",
        description="",
        server_url="http://testserver.local",
    )


def _parameter(document: dict[str, Any], path: str, method: str, name: str) -> Any:
    parameters = document["paths"][path][method]["parameters"]
    [found] = [p for p in parameters if p["name"] == name]
    return found


def _body_schema(document: dict[str, Any], path: str, kind: str) -> Any:
    schema = document["paths"][path]["post"]["requestBody"]["content"][kind]["schema"]
    if "$ref" in schema:
        return document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_query_parameters_publish_their_bounds(document: dict[str, Any]) -> None:
    limit = _parameter(document, "/api/v1/generations", "get", "limit")
    assert limit["schema"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 100,
        "default": 20,
    }
    token = _parameter(document, "/api/v1/auth/verify", "get", "token")
    assert token["schema"]["minLength"] == 1
    assert token["schema"]["maxLength"] == 200
    signature = _parameter(
        document, "/api/v1/generations/{id}/images/{index}", "get", "signature"
    )
    # A query parameter is absent, never null.
    assert signature["schema"]["type"] == "string"
    assert "anyOf" not in signature["schema"]


def test_free_text_publishes_that_nul_is_refused(document: dict[str, Any]) -> None:
    schema = _body_schema(document, "/api/v1/tokens", "application/json")
    pattern = schema["properties"]["name"]["pattern"]
    assert re.search(pattern, "laptop script")
    assert not re.search(pattern, "laptop\x00script")
    before = _parameter(document, "/api/v1/generations", "get", "before")
    assert not re.search(before["schema"]["pattern"], "abc\x00")


@pytest.mark.parametrize(
    "path", ["/api/v1/generations", "/v1/images/generations", "/v1/images/edits"]
)
def test_a_blank_prompt_is_outside_the_published_pattern(
    document: dict[str, Any], path: str
) -> None:
    content = document["paths"][path]["post"]["requestBody"]["content"]
    schema = _body_schema(document, path, next(iter(content)))
    pattern = schema["properties"]["prompt"]["pattern"]
    for blank in (" ", "\t\n", "\x1d", "a\x00"):
        assert not re.search(pattern, blank)
    for text in ("a red fox", " \x1d fox ", "狐"):
        assert re.search(pattern, text)
    for blank in (" ", "\x1d"):
        with pytest.raises(ValueError, match="empty"):
            GenerationRequest(prompt=blank)


def test_reserved_email_domains_are_outside_the_published_pattern(
    document: dict[str, Any],
) -> None:
    schema = _body_schema(document, "/api/v1/auth/signup", "application/json")
    email = schema["properties"]["email"]
    assert email["format"] == "email"
    for reserved in ("a@b.test", "a@localhost", "a@b.INVALID", "a@x.onion."):
        assert not re.search(email["pattern"], reserved)
        with pytest.raises(ValueError, match="not a valid email address"):
            SignupRequest(email=reserved, password="long enough pw")
    for fine in ("a@example.com", "a@test.example.org", "a@b.testing"):
        assert re.search(email["pattern"], fine)
        SignupRequest(email=fine, password="long enough pw")


@pytest.mark.parametrize("path", ["/api/v1/generations", "/v1/images/edits"])
def test_multipart_bodies_have_no_null_fields(
    document: dict[str, Any], path: str
) -> None:
    schema = _body_schema(document, path, "multipart/form-data")
    assert schema["additionalProperties"] is False
    for name, field in schema["properties"].items():
        assert field.get("type") != "null", name
        assert {"type": "null"} not in field.get("anyOf", []), name
        assert field.get("default", "") is not None, name
    assert schema["properties"]["model"]["maxLength"] == 200


def test_a_form_does_not_promise_a_list_of_objects(document: dict[str, Any]) -> None:
    """LoRAs come as a JSON list; a form has no encoding for it (tags in the
    prompt serve forms), so the form's schema leaves it out."""
    json_body = _body_schema(document, "/api/v1/generations", "application/json")
    form = _body_schema(document, "/api/v1/generations", "multipart/form-data")
    assert "loras" in json_body["properties"]
    assert "loras" not in form["properties"]
    assert "prompt" in form["properties"]


def test_the_verification_link_documents_its_html_pages(
    document: dict[str, Any],
) -> None:
    responses = document["paths"]["/api/v1/auth/verify"]["get"]["responses"]
    for status in ("200", "404", "410", "422"):
        assert set(responses[status]["content"]) == {"application/json", "text/html"}


def test_the_idempotency_key_is_printable_ascii(document: dict[str, Any]) -> None:
    key = _parameter(document, "/api/v1/generations", "post", "Idempotency-Key")
    pattern = key["schema"]["pattern"]
    assert re.search(pattern, "3f1c-retry 1")
    for bad in ("a\tb", "\x7f", "é"):
        assert not re.search(pattern, bad)


def test_a_null_negative_prompt_is_published_as_accepted(
    document: dict[str, Any],
) -> None:
    schema = _body_schema(document, "/api/v1/generations", "application/json")
    assert {"type": "null"} in schema["properties"]["negative_prompt"]["anyOf"]
    accepted = GenerationRequest.model_validate(
        {"prompt": "a", "negative_prompt": None}
    )
    assert accepted.negative_prompt == ""


def test_me_is_documented_under_its_own_name(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    response = document["paths"]["/api/v1/me"]["get"]["responses"]["200"]
    ref = response["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/Me"
    assert "quota" in schemas["Me"]["properties"]
    assert "quota" not in schemas["User"]["properties"]


def test_two_models_with_one_title_are_refused() -> None:
    class Base(BaseModel):
        model_config = ConfigDict(title="Same")

    class Child(Base):
        extra: int

    routes = ApiRoutes()

    async def handler(request: web.Request) -> web.StreamResponse:
        raise AssertionError("only documented, never called")

    for path, model in (("/a", Base), ("/b", Child)):
        routes.route("GET", path, summary="", responses=[Response(200, "", model)])(
            handler
        )
    with pytest.raises(ValueError, match="Same"):
        build_openapi(
            [routes], title="t", version="0", description="", server_url="http://x"
        )
