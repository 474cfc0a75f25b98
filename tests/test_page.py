"""The page `phi3v serve` answers ``GET /`` with, on a real uvicorn server with the tiny random model.

The browser test drives a real headless Chromium (Debian's ``chromium`` through Playwright's ``executable_path``; it is
skipped, with the reason, when either is missing): it uploads synth photos and a text file through the page's file
input and checks what the page shows against what ``/v1/predict`` answers for the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from phi3v.data.synthetic import CATEGORIES, COLOURS, PATTERNS, draw_product
from phi3v.serve import ServeOptions, ServerThread

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """The tiny model with the answer template ``{title}``: the random model's answer parses as a title (it never
    follows the trained template), so the page's parsed fields are not all empty."""
    options = ServeOptions(
        model=str(tiny_model_dir),
        port=0,
        max_new_tokens=12,
        log_level="warning",
        access_log=False,
        served_model_name="tiny-page",
        answer_template="{title}",
        override_trained=True,
    )
    with ServerThread(options) as running:
        yield running


def _synth_photo(folder: Path, name: str, index: int) -> Path:
    colour = list(COLOURS)[index % len(COLOURS)]
    image = draw_product(CATEGORIES[index % len(CATEGORIES)], colour, PATTERNS[index % 3], 1 + index % 3, size=256)
    path = folder / name
    image.save(path, "JPEG", quality=90)
    return path


def _inline_hash(html: str, tag: str) -> str:
    (block,) = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return "'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"


def test_the_page_is_self_contained_and_locked_to_its_own_origin(server):
    response = httpx.get(f"{server.url}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "v1/predict" in html and 'type="file"' in html
    # nothing fetched from elsewhere: no absolute URL, no external script, style or font
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html), "the page references another origin"
    assert "@import" not in html and "url(" not in html
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["script-src"] == _inline_hash(html, "script")  # exactly the page's own script, by hash
    assert policy["style-src"] == _inline_hash(html, "style")
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_page_ships_in_the_wheel(tmp_path):
    """The page is package data: a wheel built from (a copy of) the checkout holds it, else `phi3v serve` installed
    from a wheel would answer / with 500."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    build = subprocess.run(
        [*pip, "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("phi3v-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("phi3v/static/index.html").decode()
    assert shipped == (ROOT / "src/phi3v/static/index.html").read_text()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        # Playwright gives the browser a fresh temporary profile (--user-data-dir) and adds --headless
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


def _shown(value: object) -> str:
    """How the page shows an answer field (a missing one as a dash)."""
    return "—" if value is None or value == "" else str(value)


def _wait_for(page, counter: str, value: int) -> None:
    """Until the page has shown ``value`` answers / errors (selectors, not evaluated code: the page's CSP forbids
    eval, which `wait_for_function` would need)."""
    page.wait_for_selector(f"body[data-{counter}='{value}']", state="attached", timeout=120_000)


def _page_answer(page) -> dict[str, str]:
    return {name: page.text_content(f"#{name}") for name in ("title", "category", "price", "raw", "answer-model")}


def _api_answer(server, path: Path) -> dict:
    response = httpx.post(f"{server.url}/v1/predict", files={"image": (path.name, path.read_bytes())}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _expected(api: dict) -> dict[str, str]:
    return {
        "title": _shown(api["title"]),
        "category": _shown(api["category"]),
        "price": _shown(api["price"]),
        "raw": api["raw"],
        "answer-model": api["model"],
    }


@pytest.mark.browser
def test_the_page_answers_like_the_api_and_shows_its_errors(browser, server, tmp_path):
    from PIL import Image

    page = browser.new_page(viewport={"width": 1100, "height": 720})
    requests: list[str] = []
    problems: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on(
        "console",
        lambda message: problems.append(message.text) if "Content Security Policy" in message.text else None,
    )
    page.goto(f"{server.url}/")
    page.wait_for_selector("#status:text-is('ready')", timeout=60_000)
    assert page.text_content("#model") == "tiny-page"

    # a synth photo: the page shows what /v1/predict answers for the same bytes
    first = _synth_photo(tmp_path, "coat.jpg", 0)
    page.set_input_files("#file", str(first))
    _wait_for(page, "answers", 1)
    api = _api_answer(server, first)
    assert api["title"], "the {title} template parses any answer: the page's title must not be empty"
    assert _page_answer(page) == _expected(api)
    assert re.fullmatch(r"\d+ ms", page.text_content("#latency")), page.text_content("#latency")
    assert page.is_visible("#answer") and not page.is_visible("#error")
    assert page.locator("#preview").evaluate("image => image.naturalWidth") == 256  # the blob: preview loaded

    # not an image: the page shows the service's JSON error (its message and type), and hides the old answer
    notes = b"shopping list: a coat, a scarf\n"
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": notes}])
    _wait_for(page, "errors", 1)
    refused = httpx.post(f"{server.url}/v1/predict", files={"image": ("notes.txt", notes, "text/plain")})
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert page.text_content("#error-message") == error["message"]
    assert page.text_content("#error-code") == f"422 {error['type']}"
    assert page.is_visible("#error") and not page.is_visible("#answer")
    assert page.get_attribute("body", "data-state") == "error"
    hint = page.text_content("#error-hint")
    assert hint == "notes.txt is text/plain, not an image: pick a photo (JPEG, PNG, WebP, ...).", hint
    page.screenshot(path=str(tmp_path / "page-error.png"))

    # still usable: another photo (another shape), dropped on the page this time, is answered and the error goes away
    second = _synth_photo(tmp_path, "bag.jpg", 1)
    Image.open(second).resize((320, 200)).save(second, "JPEG", quality=90)
    dropped = page.evaluate_handle(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
            return transfer;
        }""",
        [second.name, base64.b64encode(second.read_bytes()).decode()],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    _wait_for(page, "answers", 2)
    assert _page_answer(page) == _expected(_api_answer(server, second))
    assert page.is_visible("#answer") and not page.is_visible("#error")
    assert page.text_content("#file-name") == f"bag.jpg ({int(second.stat().st_size / 1024 + 0.5)} KB)"

    screenshot = tmp_path / "page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    width, height = Image.open(io.BytesIO(data)).size
    assert width == 1100 and height >= 300

    origin = urlsplit(server.url)
    elsewhere = [url for url in requests if url.startswith("http") and urlsplit(url)[:2] != origin[:2]]
    assert not elsewhere, f"the page asked another origin: {elsewhere}"
    assert not problems, problems
    page.close()
