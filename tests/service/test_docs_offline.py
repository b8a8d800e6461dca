"""`/docs` (Swagger UI) and `/redoc` load nothing from another host: every `src`/`href` they name is on
the gateway and answers 200, also with API keys on (the docs are open paths)."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest

from tests.service.test_api import running, tiny_settings

pytestmark = pytest.mark.timeout(120)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value for name, value in attrs if name in ("src", "href") and value]


def references(html: str) -> list[str]:
    """Every src/href attribute, plus URLs the inline scripts name (`url: '...'`, `*_url`)."""
    parser = _Links()
    parser.feed(html)
    inline = re.findall(r"""(?:url|href|src)["']?\s*[:=]\s*["']([^"']+)["']""", html)
    return parser.links + inline


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_are_self_contained(page: str) -> None:
    async with running(tiny_settings(api_keys="acme:docs-test-key-0123456789")) as (client, _service):
        response = await client.get(page)
        assert response.status_code == 200 and "text/html" in response.headers["content-type"]
        links = references(response.text)
        assert any(link.endswith(".js") for link in links), links
        assert "http://" not in response.text.replace("http://gateway", "") and "https://" not in response.text
        for link in links:
            absolute = urljoin(f"http://gateway{page}", link)
            assert urlsplit(absolute).netloc == "gateway", f"{page} refers to another host: {link}"
            answer = await client.get(absolute)
            assert answer.status_code == 200, (link, answer.status_code)
            assert answer.content
