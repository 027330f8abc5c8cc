"""`/docs` works offline: the page references only assets this server serves itself (issue 10 item 9)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def test_docs_page_and_its_assets_come_from_this_server() -> None:
    client = TestClient(create_app(Settings(model="unused", served_model_name="tiny")))  # no lifespan: no model
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", page.text)
    assets = [u for pair in urls for u in pair if u]
    assert any(u.endswith("swagger-ui-bundle.js") for u in assets), assets
    assert any(u.endswith("swagger-ui.css") for u in assets), assets
    for url in assets:
        assert not re.match(r"(https?:)?//", url), f"{url} needs the network"
        response = client.get(url)
        assert response.status_code == 200 and len(response.content) > 0, url
    assert "paths" in client.get("/openapi.json").json()
