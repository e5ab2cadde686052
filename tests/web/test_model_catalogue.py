"""SDAPI_MODELS as web reads it, and the models API's kind and state."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient

from sdapi.contract.catalogue import CatalogueEntry, parse_catalogue, served_name
from sdapi.devtools.accounts import auth, make_user
from sdapi.infra.announcements import announce_node
from tests.node_double import node_info
from web.appkeys import redis_key
from web.settings import WebSettings


def test_sdapi_models_entries_are_known_by_their_served_names() -> None:
    text = "tiny, other=tiny ,/models/dreamshaper_8.safetensors,a/b,./sd15/"
    assert parse_catalogue(text) == [
        CatalogueEntry(None, "tiny"),
        CatalogueEntry("other", "tiny"),
        CatalogueEntry(None, "/models/dreamshaper_8.safetensors"),
        CatalogueEntry(None, "a/b"),
        CatalogueEntry(None, "./sd15/"),
    ]
    names = [served_name(entry) for entry in parse_catalogue(text)]
    assert names == ["tiny", "other", "dreamshaper_8", "a/b", "sd15"]
    settings = WebSettings.from_env(models=text)
    assert settings.models == names
    with pytest.raises(ValueError, match="name=spec"):
        parse_catalogue("=tiny")


@pytest.fixture
def web_settings(web_settings: WebSettings) -> WebSettings:
    """Three models configured: one loaded, one on disk, one on no node."""
    return web_settings.model_copy(update={"models": ["tiny", "other", "third"]})


async def test_models_api_shows_kind_and_state(client: TestClient) -> None:
    redis = client.app[redis_key]
    await announce_node(redis, node_info(node_id="n1", kind="sd1", loaded=True))
    await announce_node(
        redis,
        node_info(node_id="n1", model="other", kind="sdxl", loaded=False),
        announcement_id="n1+1",
    )
    _, secret = await make_user()
    response = await client.get("/api/v1/models", headers=auth(secret))
    assert response.status == 200
    items = {item["id"]: item for item in (await response.json())["items"]}
    assert {m: (i["kind"], i["state"], i["nodes"]) for m, i in items.items()} == {
        "tiny": ("sd1", "ready", 1),
        "other": ("sdxl", "loadable", 1),
        "third": ("", "waiting_for_node", 0),
    }
    assert items["other"]["available"] is True
    assert items["third"]["available"] is False
