"""phi3v.data.download against a real loopback HTTP server (tests/http_server.py): one exact reason per source."""

from __future__ import annotations

import asyncio
import gzip
import io
import re
import struct
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_server import LoopbackServer
from phi3v.data.download import (
    PLACEHOLDERS,
    DownloadConfig,
    FetchResult,
    ImageStore,
    fetch_all,
    fetch_sources,
    is_placeholder,
    parse_retry_after,
    source_key,
    source_kind,
)

STORED_NAME = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}\.jpg$")


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def cfg(**overrides) -> DownloadConfig:
    """A config with short waits, so retry tests stay fast."""
    values = {"concurrency": 8, "timeout": 5.0, "retries": 2, "backoff": 0.01, "max_backoff": 2.0, "workers": 2}
    values.update(overrides)
    return DownloadConfig(**values)


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """Smooth random RGB image (not flat, so JPEG sizes are realistic)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def jpeg(width: int = 64, height: int = 48, seed: int = 0, **params) -> bytes:
    return encode(photo(width, height, seed), "JPEG", quality=90, **params)


def png_with_size(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR claims ``width`` x ``height`` (the pixel data is for a 1x1 image)."""
    data = bytearray(encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"))
    assert data[12:16] == b"IHDR"
    ihdr = bytes(data[16:29])
    ihdr = struct.pack(">II", width, height) + ihdr[8:]
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def run(sources, store: ImageStore, config: DownloadConfig | None = None, **kwargs) -> dict[str, FetchResult]:
    """fetch_sources, checking that every distinct source got exactly one result."""
    results: list[FetchResult] = []
    fetch_sources(sources, store, config or cfg(), results.append, **kwargs)
    names = [r.source for r in results]
    assert len(names) == len(set(names)), f"a source was reported twice: {names}"
    assert set(names) == {source_key(s) for s in sources}
    return {r.source: r for r in results}


def one(source, store: ImageStore, config: DownloadConfig | None = None, **kwargs) -> FetchResult:
    return run([source], store, config, **kwargs)[source_key(source)]


def stored(store: ImageStore, result: FetchResult) -> Image.Image:
    assert result.ok, result
    assert result.path is not None and STORED_NAME.match(result.path)
    image = Image.open(store.path_of(result.path))
    image.load()
    assert image.format == "JPEG" and image.mode == "RGB"
    assert image.size == (result.width, result.height)
    return image


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        yield srv


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


# --------------------------------------------------------------------------------------------------------------
# sources, placeholders, parsing
# --------------------------------------------------------------------------------------------------------------


def test_placeholders_and_source_kinds():
    for value in [None, float("nan"), "", "  ", "N.A.", "n/a", " NaN ", "null", "-", "None", 3, b"x"]:
        assert is_placeholder(value), value
    assert "n.a." in PLACEHOLDERS
    for value in ["https://x/a.jpg", "a.jpg", "N.A.jpg", Path("a.jpg")]:
        assert not is_placeholder(value), value
    assert source_kind("https://assets.burberry.com/is/image/Burberryltd/8A07B207") == "url"
    assert source_kind("  HTTP://Example.com/a.jpg ") == "url"
    assert source_kind("images/a.jpg") == "path"
    assert source_kind("/abs/a.jpg") == "path"
    assert source_kind("C:\\images\\a.jpg") == "path"
    for bad in ["ftp://x", "javascript:alert(1)", "file:///etc/passwd", "data:image/png;base64,AA", "//cdn/x.jpg"]:
        assert source_kind(bad) == "invalid", bad
    assert source_kind("http://") == "invalid"
    assert source_kind("a\x00b.jpg") == "invalid"
    assert source_kind("N.A.") == "invalid"
    assert source_key(None) == "" and source_key(float("nan")) == "nan" and source_key(Path("a/b.jpg")) == "a/b.jpg"


def test_parse_retry_after():
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("") is None
    now = 1_700_000_000.0  # 2023-11-14 22:13:20 GMT
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 GMT", now=now) == pytest.approx(30.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now=now) == 0.0


def test_config_validation_and_user_agent():
    import phi3v

    assert DownloadConfig().user_agent.startswith(f"phi3v/{phi3v.__version__} ")
    with pytest.raises(ValueError, match="concurrency"):
        DownloadConfig(concurrency=0)
    with pytest.raises(ValueError, match="max_side"):
        DownloadConfig(max_side=0)


def test_store_refuses_foreign_paths(store: ImageStore):
    for bad in ["../x.jpg", "ab/../../etc/passwd", "/etc/passwd", "AB/" + "a" * 64 + ".jpg", "ab/cd.jpg"]:
        with pytest.raises(ValueError):
            store.path_of(bad)
    sha, relpath = store.put_bytes(b"abc")
    assert relpath == f"{sha[:2]}/{sha}.jpg" and store.path_of(relpath).read_bytes() == b"abc"
    before = store.path_of(relpath).stat().st_mtime_ns
    time.sleep(0.01)
    assert store.put_bytes(b"abc") == (sha, relpath)
    assert store.path_of(relpath).stat().st_mtime_ns == before  # not rewritten


def test_placeholders_and_invalid_make_no_request(server: LoopbackServer, store: ImageStore):
    values = ["N.A.", "", None, "nan", float("nan"), "ftp://x", "javascript:alert(1)"]
    results = run(values, store)
    assert server.requests == []
    for value in ["N.A.", "", "nan"]:
        assert results[value].reason == "placeholder" and results[value].attempts == 0
    assert results["ftp://x"].reason == "invalid_source"
    assert results["javascript:alert(1)"].reason == "invalid_source"
    assert not any(r.ok for r in results.values())


# --------------------------------------------------------------------------------------------------------------
# HTTP statuses, retries, timeouts, connection failures
# --------------------------------------------------------------------------------------------------------------


def test_404_is_final(server: LoopbackServer, store: ImageStore):
    url = server.add("/gone", b"<html>not found</html>", status=404, content_type="text/html")
    result = one(url, store)
    assert (result.ok, result.reason, result.http_status, result.attempts) == (False, "http_404", 404, 1)
    assert server.hits["/gone"] == 1


def test_500_then_200_is_retried(server: LoopbackServer, store: ImageStore):
    url = server.add_sequence("/flaky.jpg", [{"status": 500, "body": b"oops"}, {"body": jpeg()}])
    result = one(url, store)
    assert (result.ok, result.reason, result.attempts, result.http_status) == (True, "ok", 2, 200)
    assert server.hits["/flaky.jpg"] == 2


def test_503_until_retries_run_out(server: LoopbackServer, store: ImageStore):
    url = server.add("/down.jpg", b"busy", status=503)
    result = one(url, store, cfg(retries=2))
    assert (result.reason, result.attempts, result.http_status) == ("http_503", 3, 503)
    assert server.hits["/down.jpg"] == 3


def test_429_honours_retry_after(server: LoopbackServer, store: ImageStore):
    url = server.add_sequence(
        "/limited.jpg", [{"status": 429, "body": b"slow down", "headers": {"Retry-After": "1"}}, {"body": jpeg()}]
    )
    result = one(url, store)
    assert (result.reason, result.attempts) == ("ok", 2)
    assert server.hits["/limited.jpg"] == 2


def test_timeout_after_retries(server: LoopbackServer, store: ImageStore):
    url = server.add("/slow.jpg", jpeg(), delay=2.0)
    result = one(url, store, cfg(timeout=0.3, retries=2))
    assert (result.reason, result.attempts, result.ok) == ("timeout", 3, False)
    assert server.hits["/slow.jpg"] == 3


def test_connection_reset(server: LoopbackServer, store: ImageStore):
    url = server.add_handler("/reset.jpg", lambda handler: handler.close_now())
    result = one(url, store, cfg(retries=2))
    assert (result.reason, result.attempts, result.http_status) == ("connection_error", 3, None)
    assert server.hits["/reset.jpg"] == 3


def test_redirects(server: LoopbackServer, store: ImageStore):
    image = server.add("/real.jpg", jpeg())
    moved = server.add("/moved.jpg", status=301, headers={"Location": image})
    loop = server.add_handler("/loop", lambda h: h.send_simple(b"", status=302, headers={"Location": h.path}))
    ftp = server.add("/to-ftp", status=302, headers={"Location": "ftp://example.com/a.jpg"})
    results = run([moved, loop, ftp], store, cfg(max_redirects=3))
    assert results[moved].reason == "ok" and results[moved].http_status == 200
    assert results[loop].reason == "too_many_redirects" and results[loop].attempts == 1
    assert server.hits["/loop"] == 4  # the first request + 3 redirects
    assert results[ftp].reason == "invalid_redirect"


# --------------------------------------------------------------------------------------------------------------
# size caps and broken content
# --------------------------------------------------------------------------------------------------------------


def test_content_length_above_cap_is_not_read(server: LoopbackServer, store: ImageStore):
    def huge(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(10**9))
        handler.end_headers()
        handler.wfile.write(b"\xff" * 1000)
        time.sleep(2.0)  # then nothing: a client that waited for the body would hit its 1 s timeout
        handler.close_connection = True

    url = server.add_handler("/huge.jpg", huge)
    result = one(url, store, cfg(max_bytes=100_000, timeout=1.0, retries=0))
    assert (result.reason, result.nbytes, result.http_status, result.attempts) == ("too_large", 0, 200, 1)
    assert "Content-Length" in result.detail


def test_chunked_body_above_cap(server: LoopbackServer, store: ImageStore):
    url = server.add("/chunked.jpg", b"\xff" * 300_000, chunked=True)
    result = one(url, store, cfg(max_bytes=100_000))
    assert result.reason == "too_large" and 100_000 < result.nbytes <= 300_000


def test_compressed_bodies_are_not_read(server: LoopbackServer, store: ImageStore):
    bomb = gzip.compress(gzip.compress(b"\0" * 20_000_000))  # ~20 kB that a decoder turns into 20 MB
    url = server.add("/bomb.jpg", bomb, headers={"Content-Encoding": "gzip, gzip"})
    result = one(url, store, cfg(max_bytes=100_000))
    assert (result.reason, result.http_status, result.nbytes) == ("encoded_body", 200, 0)
    assert server.requests[-1]["headers"]["Accept-Encoding"] == "identity"


def test_broken_content(server: LoopbackServer, store: ImageStore):
    good = jpeg(200, 150)
    urls = {
        "not_an_image": server.add("/page.jpg", b"<!DOCTYPE html><html>Access denied</html>", content_type="text/html"),
        "truncated": server.add("/cut.jpg", good[: len(good) // 2]),
        "empty": server.add("/empty.jpg", b""),
        "decompression_bomb": server.add("/bomb.png", png_with_size(30000, 30000), content_type="image/png"),
    }
    own_limit = server.add("/big.png", png_with_size(8000, 8000), content_type="image/png")  # 64 M > 50 M
    results = run([*urls.values(), own_limit], store)
    for reason, url in urls.items():
        assert results[url].reason == reason, results[url]
        assert results[url].http_status == 200 and not results[url].ok
    assert results[own_limit].reason == "decompression_bomb" and "max_pixels" in results[own_limit].detail
    assert "text/html" in results[urls["not_an_image"]].detail
    assert list(store.root.rglob("*.jpg")) == []


# --------------------------------------------------------------------------------------------------------------
# image normalisation
# --------------------------------------------------------------------------------------------------------------


def test_modes_are_stored_as_rgb_jpeg(server: LoopbackServer, store: ImageStore):
    cmyk = encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95)  # red in CMYK
    rgba = Image.new("RGBA", (40, 30), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent -> white
    sixteen = Image.fromarray(np.full((30, 40), 0x8000, dtype=np.uint16))  # mid grey, 16 bits
    assert sixteen.mode.startswith("I;16")
    frames = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    urls = {
        "cmyk": server.add("/cmyk.jpg", cmyk),
        "rgba": server.add("/rgba.png", encode(rgba, "PNG"), content_type="image/png"),
        "16bit": server.add("/16.png", encode(sixteen, "PNG"), content_type="image/png"),
        "gif": server.add("/anim.gif", gif.getvalue(), content_type="image/gif"),
    }
    results = run(list(urls.values()), store)
    pixels = {}
    for name, url in urls.items():
        assert results[url].reason == "ok", results[url]
        image = stored(store, results[url])
        assert image.size == (40, 30)
        pixels[name] = np.asarray(image).astype(int)
    assert pixels["cmyk"][15, 20, 0] > 200 and pixels["cmyk"][15, 20, 1] < 60  # red
    assert (pixels["rgba"][15, 5] > 245).all()  # transparent -> white
    assert pixels["rgba"][15, 35, 2] > 200 and pixels["rgba"][15, 35, 0] < 30  # opaque blue stays blue
    assert abs(pixels["16bit"][15, 20] - 128).max() <= 3  # scaled, not clipped to white
    assert pixels["gif"][15, 20, 0] > 200 and pixels["gif"][15, 20, 1] < 60  # first frame (red)
    assert "re-encoded" in results[urls["cmyk"]].detail


def test_exif_rotation_is_applied(server: LoopbackServer, store: ImageStore):
    image = Image.new("RGB", (80, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 16))  # marker at the top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    url = server.add("/rotated.jpg", encode(image, "JPEG", quality=95, exif=exif.tobytes()))
    result = one(url, store)
    upright = np.asarray(stored(store, result)).astype(int)
    assert (result.width, result.height) == (40, 80)  # dimensions swapped
    assert upright[8, 31, 0] > 200 and upright[8, 31, 2] < 60  # marker now at the top-right
    assert upright[8, 8, 2] > 200 and upright[70, 20, 2] > 200
    assert Image.open(store.path_of(result.path)).getexif().get(0x0112) is None  # no orientation left to apply


def test_baseline_jpeg_is_stored_byte_identical(server: LoopbackServer, store: ImageStore):
    original = jpeg(120, 80, seed=3)
    progressive = jpeg(120, 80, seed=4, progressive=True)
    url = server.add("/baseline.jpg", original)
    prog_url = server.add("/progressive.jpg", progressive)
    results = run([url, prog_url], store)
    assert store.path_of(results[url].path).read_bytes() == original
    assert results[url].detail == "stored the original JPEG bytes" and results[url].nbytes == len(original)
    assert store.path_of(results[prog_url].path).read_bytes() != progressive  # re-encoded as baseline
    assert stored(store, results[prog_url]).size == (120, 80)


def test_max_side_resize(server: LoopbackServer, store: ImageStore):
    url = server.add("/wide.jpg", jpeg(400, 200))
    small = server.add("/small.jpg", jpeg(60, 30))
    results = run([url, small], store, cfg(max_side=100))
    assert (results[url].width, results[url].height) == (100, 50)
    assert stored(store, results[url]).size == (100, 50)
    assert (results[small].width, results[small].height) == (60, 30)
    assert "stored the original" in results[small].detail


# --------------------------------------------------------------------------------------------------------------
# de-duplication, local paths, storage layout, headers, concurrency, streaming
# --------------------------------------------------------------------------------------------------------------


def test_same_url_twice_is_fetched_once(server: LoopbackServer, store: ImageStore):
    url = server.add("/a.jpg", jpeg())
    results: list[FetchResult] = []
    fetch_sources([url, url, url], store, cfg(), results.append)
    assert len(results) == 1 and results[0].ok
    assert server.hits["/a.jpg"] == 1


def test_same_content_under_two_urls(server: LoopbackServer, store: ImageStore):
    data = jpeg(seed=7)
    first, second = server.add("/one.jpg", data), server.add("/two.jpg?x=1", data)
    results = run([first, second], store)
    assert results[first].ok and results[second].ok
    assert results[first].sha256 == results[second].sha256 and results[first].path == results[second].path
    assert len(list(store.root.rglob("*.jpg"))) == 1


def test_local_paths(tmp_path: Path, store: ImageStore):
    catalog_dir = tmp_path / "catalog"
    (catalog_dir / "img").mkdir(parents=True)
    relative = catalog_dir / "img" / "rel.jpg"
    relative.write_bytes(jpeg(seed=1))
    absolute = tmp_path / "abs.png"
    photo(seed=2).save(absolute)
    sources = ["img/rel.jpg", str(absolute), "img/missing.jpg", "img", " img/rel.jpg "]
    results = run(sources, store, base_dir=catalog_dir)
    assert results["img/rel.jpg"].reason == "ok" and results["img/rel.jpg"].http_status is None
    assert store.path_of(results["img/rel.jpg"].path).read_bytes() == relative.read_bytes()
    assert results[str(absolute)].reason == "ok" and results[str(absolute)].attempts == 1
    assert results["img/missing.jpg"].reason == "file_not_found"
    assert results["img"].reason == "read_error"
    assert results[" img/rel.jpg "].sha256 == results["img/rel.jpg"].sha256  # stripped, reported as given
    assert relative.read_bytes() == jpeg(seed=1)  # sources are only read


def test_nothing_written_outside_the_store(server: LoopbackServer, tmp_path: Path):
    store = ImageStore(tmp_path / "store")
    urls = [server.add(f"/p{i}.png", encode(photo(seed=i), "PNG")) for i in range(5)]
    urls += [server.add("/x.jpg", jpeg()), server.add("/img/..%2F..%2Fetc%2Fpasswd.jpg", jpeg(seed=9))]
    results = run(urls, store)
    assert all(r.ok for r in results.values())
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert files and all(p.is_relative_to(store.root) for p in files)
    for path in files:
        assert STORED_NAME.match(path.relative_to(store.root).as_posix()), path
    assert {r.path for r in results.values()} == {p.relative_to(store.root).as_posix() for p in files}


def test_user_agent_is_sent(server: LoopbackServer, store: ImageStore):
    url = server.add("/ua.jpg", jpeg())
    config = cfg()
    assert one(url, store, config).ok
    assert server.requests[0]["headers"]["User-Agent"] == config.user_agent
    assert server.requests[0]["headers"]["User-Agent"].startswith("phi3v/")


def test_concurrency_is_bounded(server: LoopbackServer, store: ImageStore):
    urls = [server.add(f"/c{i}.jpg", jpeg(seed=i), delay=0.15) for i in range(16)]
    results = run(urls, store, cfg(concurrency=3))
    assert all(r.ok for r in results.values())
    assert 2 <= server.max_active <= 3


def test_results_are_streamed(server: LoopbackServer, store: ImageStore):
    slow = server.add("/slow.jpg", jpeg(seed=1), delay=1.0)
    fast = [server.add(f"/fast{i}.jpg", jpeg(seed=10 + i)) for i in range(4)]
    order: list[str] = []
    fetch_sources([slow, *fast], store, cfg(), lambda r: order.append(r.source))
    assert order[-1] == slow and set(order[:-1]) == set(fast)


def test_on_result_runs_on_the_loop_thread_and_its_errors_propagate(server: LoopbackServer, store: ImageStore):
    import threading

    urls = [server.add(f"/t{i}.jpg", jpeg(seed=i)) for i in range(3)]
    threads = set()

    def record(result: FetchResult) -> None:
        threads.add(threading.get_ident())

    fetch_sources(urls, store, cfg(), record)
    assert threads == {threading.get_ident()}

    def explode(result: FetchResult) -> None:
        raise RuntimeError("journal is full")

    with pytest.raises(RuntimeError, match="journal is full"):
        fetch_sources([server.add("/boom.jpg", jpeg(seed=5))], store, cfg(), explode)


def test_fetch_all_with_a_given_client_and_json_round_trip(server: LoopbackServer, store: ImageStore):
    import httpx

    url = server.add("/given.jpg", jpeg())
    results: list[FetchResult] = []

    async def main() -> None:
        async with httpx.AsyncClient(headers={"User-Agent": "custom"}) as client:
            await fetch_all([url], store, cfg(), results.append, client=client)

    asyncio.run(main())
    assert results[0].ok and server.requests[0]["headers"]["User-Agent"] == "custom"
    assert FetchResult(**asdict(results[0])) == results[0]
