"""Health, readiness, metrics, OpenAPI, docs and the error format."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from sdapi.contract.status import Status, Tier
from sdapi.db.models import Delivery, Generation
from sdapi.devtools.accounts import auth, make_user
from tests.node_double import NodeDouble
from web.metrics import web_metrics_key


async def test_healthz(client: TestClient) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_readyz_checks_database_and_redis(client: TestClient) -> None:
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"status": "ready", "database": True, "redis": True}


async def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    response = await client.get("/api/v1/nope")
    assert response.status == 404
    body = await response.json()
    assert body["error"]["code"] == "not_found"
    assert body["error"]["details"] == []


async def test_wrong_method_is_a_json_405(client: TestClient) -> None:
    response = await client.delete("/healthz")
    assert response.status == 405
    assert (await response.json())["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


async def test_metrics_are_prometheus_text(client: TestClient) -> None:
    await client.get("/healthz")
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert (
        'sdapi_http_requests_total{method="GET",route="/healthz",status="200"}' in text
    )


async def test_openapi_is_3_1_and_generated(client: TestClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"] == "3.1.0"
    assert "/healthz" in document["paths"]
    assert "/docs" not in document["paths"]
    assert "ErrorBody" in document["components"]["schemas"]


async def test_docs_page_uses_packaged_assets(client: TestClient) -> None:
    response = await client.get("/docs")
    assert response.status == 200
    html = await response.text()
    assert "/docs/assets/swagger-ui-bundle.js" in html
    asset = await client.get("/docs/assets/swagger-ui-bundle.js")
    assert asset.status == 200
    assert len(await asset.read()) > 100_000


# --- regression tests of the review ---------------------------------------


def samples(text: str, name: str) -> dict[str, float]:
    """The samples of metric `name` as {labels: value}."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name) :].rpartition(" ")
            found[labels] = float(value)
    return found


async def test_metrics_count_client_errors_with_their_status(
    client: TestClient,
) -> None:
    assert (await client.get("/api/v1/me")).status == 401
    assert (await client.get("/api/v1/nope")).status == 404
    text = await (await client.get("/metrics")).text()
    requests = samples(text, "sdapi_http_requests_total")
    assert requests['{method="GET",route="/api/v1/me",status="401"}'] == 1
    assert requests['{method="GET",route="unmatched",status="404"}'] == 1
    assert not any('status="500"' in labels for labels in requests)


async def test_metrics_gauges_are_fresh_each_scrape(
    client: TestClient, node: NodeDouble
) -> None:
    gauges = client.app[web_metrics_key]
    # A model seen at an earlier scrape that no longer exists.
    gauges.queue_depth.labels("gone", "premium").set(7)
    gauges.healthy_nodes.labels("gone").set(1)
    user, secret = await make_user(premium=False)
    for _ in range(2):
        response = await client.post(
            "/api/v1/generations",
            json={"prompt": "a fox", "width": 64, "height": 64, "delivery": "email"},
            headers=auth(secret),
        )
        assert response.status == 202
    # Another model's scheduled row, with no node serving it.
    await Generation.create(
        user=user,
        tier=Tier.NORMAL,
        status=Status.SCHEDULED,
        delivery=Delivery.EMAIL,
        model="offline-model",
        request={},
        width=64,
        height=64,
        steps=4,
        guidance_scale=5.0,
        scheduler="euler",
        num_images=1,
    )
    text = await (await client.get("/metrics")).text()
    assert "gone" not in text
    assert samples(text, "sdapi_scheduled_generations") == {
        '{model="offline-model"}': 1.0,
        '{model="tiny"}': 2.0,
    }
    assert samples(text, "sdapi_healthy_gpu_nodes") == {
        '{model="offline-model"}': 0.0,
        '{model="tiny"}': 1.0,
    }
    depth = samples(text, "sdapi_queue_depth")
    assert depth['{model="tiny",tier="premium"}'] == 0.0
    assert depth['{model="offline-model",tier="normal"}'] == 0.0


async def test_openapi_request_bodies_mark_only_required_fields_required(
    client: TestClient,
) -> None:
    document = await (await client.get("/openapi.json")).json()
    operation = document["paths"]["/api/v1/generations"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["required"] == ["prompt"]
    assert schema["properties"]["width"]["anyOf"][0]["minimum"] == 64
