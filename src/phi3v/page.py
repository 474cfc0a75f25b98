"""The page `phi3v serve` answers ``GET /`` with: try the model in a browser, no client to write.

One self-contained file (``phi3v/static/index.html``: inline CSS and vanilla JavaScript, nothing from a CDN). It
posts the photo the user drops or picks to ``/v1/predict`` as a multipart upload and shows the parsed title,
category and price, the raw answer, the model name and the round-trip latency; a refused upload shows the service's
JSON error message (``{"error": {"message", "type"}}``) and the page stays usable.

The response carries a Content-Security-Policy allowing only the page's own inline script and style (by hash), calls
to the same origin, and ``blob:`` / ``data:`` images (the preview): the page cannot load or send anything elsewhere.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

PAGE_FILE = "index.html"


@functools.cache
def page_html() -> str:
    """The page's HTML (read once from the package data)."""
    return resources.files("phi3v").joinpath("static", PAGE_FILE).read_text(encoding="utf-8")


def _hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    if not blocks:
        raise ValueError(f"the page has no inline <{tag}> block")
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(block.encode("utf-8")).digest()).decode() + "'" for block in blocks
    )


@functools.cache
def page_headers() -> dict[str, str]:
    """Response headers of the page: its Content-Security-Policy (inline blocks allowed by hash) and friends."""
    html = page_html()
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hashes(html, 'script')}",
            f"style-src {_hashes(html, 'style')}",
            "img-src blob: data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
