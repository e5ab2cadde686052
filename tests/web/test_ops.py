"""Health, readiness, metrics, OpenAPI, docs and the error format."""

from __future__ import annotations

from aiohttp.test_utils import TestClient


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
