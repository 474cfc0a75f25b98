"""`phi3v serve` on a real uvicorn server (loopback, in-process thread) with the tiny random model: both endpoints,
every documented error, remote-image refusal, the queue bound, timeouts, and a few hundred concurrent requests whose
batched answers must equal the one-at-a-time ones."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import ipaddress
import json
from pathlib import Path

import httpx
import pytest
from PIL import Image

from http_server import LoopbackServer
from phi3v.cli import build_parser, main
from phi3v.serve import (
    Answer,
    ApiError,
    BatchEngine,
    Job,
    RemoteImageFetcher,
    ServeError,
    ServeOptions,
    ServerThread,
    is_public_address,
)
from test_docs import documented_commands

SHAPES = [(256, 256), (384, 192), (192, 384), (300, 300), (480, 240), (240, 480)]  # 2x2, 1x2, 2x1 crop grids


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def _chat(url: str, text: str | None = None, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def _error(response: httpx.Response, status: int, type_: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == type_ and error["message"], error
    return error["message"]


@pytest.fixture(scope="module")
def photos(make_image) -> list[bytes]:
    return [_jpeg(make_image(w, h, seed=i)) for i, (w, h) in enumerate(SHAPES)]


def _options(model: Path, **overrides) -> ServeOptions:
    base = {"port": 0, "max_new_tokens": 6, "log_level": "warning", "access_log": False}
    return ServeOptions(model=str(model), **{**base, **overrides})


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """Batching on, remote images allowed (loopback must still be refused), small body and pixel limits. The batch
    timeout is a minute: a lone request must not wait for company that is not coming (it would get a 504)."""
    options = _options(
        tiny_model_dir,
        max_batch_size=8,
        batch_timeout_ms=60_000,
        request_timeout=30,
        max_queue=512,
        max_body_bytes=1_000_000,
        max_image_pixels=1_000_000,
        allow_remote_images=True,
        served_model_name="tiny",
    )
    with ServerThread(options) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


# ------------------------------------------------------------------------------------------------ good requests
def test_health_and_models(client):
    health = client.get("/healthz")
    assert health.status_code == 200
    body = health.json()
    assert body["ready"] is True and body["status"] == "ready" and body["model"] == "tiny"
    assert body["queue_depth"] == 0 and body["max_queue"] == 512 and body["max_batch_size"] == 8
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["object"] == "model"


def test_every_way_of_sending_an_image_gets_the_same_answer(client, photos, tiny_model_dir):
    from phi3v.model.processing import Phi3VProcessor

    photo = photos[1]
    multipart = client.post("/v1/predict", files={"image": ("shirt.jpg", photo, "image/jpeg")})
    assert multipart.status_code == 200, multipart.text
    answer = multipart.json()
    assert set(answer) == {"title", "category", "price", "raw", "model"}
    assert answer["model"] == "tiny" and isinstance(answer["raw"], str) and answer["raw"]
    assert answer["price"] is None or isinstance(answer["price"], float)
    as_base64 = client.post("/v1/predict", json={"image": base64.b64encode(photo).decode()}).json()
    as_data_url = client.post("/v1/predict", json={"image": _data_url(photo)}).json()
    assert as_base64 == answer and as_data_url == answer

    chat = client.post("/v1/chat/completions", json=_chat(_data_url(photo), max_tokens=6))
    assert chat.status_code == 200, chat.text
    completion = chat.json()
    assert completion["object"] == "chat.completion" and completion["id"].startswith("chatcmpl-")
    assert completion["model"] == "tiny" and isinstance(completion["created"], int)
    (choice,) = completion["choices"]
    assert choice["message"] == {"role": "assistant", "content": answer["raw"]}  # no text: the trained prompt
    assert choice["finish_reason"] in ("stop", "length")
    processor = Phi3VProcessor.from_pretrained(tiny_model_dir)
    image = Image.open(io.BytesIO(photo))
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>What is shown in this image?"}])
    usage = completion["usage"]
    assert usage["prompt_tokens"] == processor(prompt, images=[image])["input_ids"].shape[1]
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    asked = client.post("/v1/chat/completions", json=_chat(_data_url(photo), "Name the product.", max_tokens=3))
    assert asked.status_code == 200, asked.text
    own = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\nName the product."}])
    assert asked.json()["usage"]["prompt_tokens"] == processor(own, images=[image])["input_ids"].shape[1]
    assert asked.json()["usage"]["completion_tokens"] <= 3


# ------------------------------------------------------------------------------------------------ bad requests
def test_malformed_json_and_wrong_content_types(client, photos):
    for path in ("/v1/predict", "/v1/chat/completions"):
        _error(
            client.post(path, content=b'{"image": ', headers={"content-type": "application/json"}), 400, "invalid_json"
        )
        _error(
            client.post(path, content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"
        )
    _error(client.post("/v1/chat/completions", files={"image": ("a.jpg", photos[0])}), 415, "unsupported_media_type")
    _error(client.post("/v1/predict", json=["not", "an", "object"]), 422, "invalid_request_error")
    _error(client.post("/v1/predict", json={"picture": "abc"}), 422, "invalid_request_error")
    _error(
        client.post("/v1/predict", data={"other": "x"}, files={"file": ("a.jpg", photos[0])}),
        422,
        "invalid_request_error",
    )
    _error(client.get("/v1/nothing-here"), 404, "not_found")
    not_allowed = client.get("/v1/predict")
    _error(not_allowed, 405, "method_not_allowed")
    assert not_allowed.headers["allow"] == "POST"
    # bodies json.loads chokes on in other ways than a syntax error: deep nesting, an integer of 5,000 digits
    for body in (b"[" * 100_000, b'{"image": "x", "max_tokens": ' + b"9" * 5000 + b"}"):
        response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
        _error(response, 400, "invalid_json")
    for field in ("\u00b2", "9" * 5000, "-1", "ten"):  # a superscript two is a digit to str.isdigit, not to int()
        response = client.post("/v1/predict", data={"max_tokens": field}, files={"image": ("a.jpg", photos[0])})
        assert "max_tokens" in _error(response, 422, "invalid_request_error")


def test_invalid_chat_requests_are_refused_with_the_reason(client, photos):
    url = _data_url(photos[0])
    two = _chat(url)
    two["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": url}})
    cases = {
        "exactly one image": two,
        "got 0": {"messages": [{"role": "user", "content": "hello"}]},
        "max_tokens must be between 1 and 256": _chat(url, max_tokens=1000),
        "stream": _chat(url, stream=True),
        "image tags": _chat(url, "<|image_1|> again"),
        "unsupported content part": {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        "messages": {"model": "tiny", "messages": []},
        "above the limit of 4000": _chat(url, "x" * 4001),
    }
    for expected, body in cases.items():
        message = _error(client.post("/v1/chat/completions", json=body), 422, "invalid_request_error")
        assert expected in message, (expected, message)
    surrogate = json.dumps(_chat(url, "\ud800")).encode()  # the JSON escape \ud800: a lone surrogate once decoded
    response = client.post("/v1/chat/completions", content=surrogate, headers={"content-type": "application/json"})
    assert "not valid Unicode" in _error(response, 422, "invalid_request_error")
    _error(
        client.post("/v1/predict", json={"image": _data_url(photos[0]), "max_tokens": 0}), 422, "invalid_request_error"
    )


def test_oversize_bodies_get_413(client):
    big = b"A" * 1_500_000
    message = _error(client.post("/v1/predict", files={"image": ("big.jpg", big)}), 413, "request_too_large")
    assert "1000000" in message

    def chunks():  # no Content-Length: counted while streaming
        yield b'{"image": "'
        for _ in range(40):
            yield b"A" * 40_000
        yield b'"}'

    _error(
        client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"}),
        413,
        "request_too_large",
    )
    assert client.get("/healthz").status_code == 200


def test_undecodable_images_get_422(client, photos, make_image):
    cases = {
        "not a recognised image format": b"<html>not an image</html>",
        "cannot decode": photos[0][: len(photos[0]) // 2],  # truncated JPEG: the header reads, the pixels do not
        "empty": b"",
        # EPS, which Pillow would hand to Ghostscript: not among the formats the server opens
        "not a recognised image format ": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    }
    for expected, data in cases.items():
        message = _error(client.post("/v1/predict", files={"image": ("x.jpg", data)}), 422, "invalid_image")
        assert expected in message, (expected, message)
    _error(client.post("/v1/predict", json={"image": "!!! not base64 !!!"}), 422, "invalid_image")
    _error(client.post("/v1/predict", json={"image": "data:text/plain;base64,aGk="}), 422, "invalid_image")
    _error(client.post("/v1/chat/completions", json=_chat("data:image/png;base64,aGVsbG8=")), 422, "invalid_image")
    flat = io.BytesIO()
    Image.new("RGB", (1200, 1000), (255, 255, 255)).save(flat, "PNG")  # 1.2 M pixels, a few KB: a small "bomb"
    message = _error(client.post("/v1/predict", files={"image": ("big.png", flat.getvalue())}), 422, "invalid_image")
    assert "1200x1000" in message and "--max-image-pixels" in message
    assert client.post("/v1/predict", files={"image": ("ok.jpg", photos[0])}).status_code == 200


# ------------------------------------------------------------------------------------------------ remote images
def test_loopback_urls_are_refused_even_when_remote_images_are_allowed(client, photos):
    with LoopbackServer() as origin:
        url = origin.add("/photo.jpg", photos[0])
        for target in (url, url.replace("127.0.0.1", "localhost"), f"http://[::1]:{origin.port}/photo.jpg"):
            message = _error(client.post("/v1/chat/completions", json=_chat(target)), 400, "image_url_refused")
            assert "refused" in message
        _error(client.post("/v1/predict", json={"image": url}), 400, "image_url_refused")
        _error(client.post("/v1/chat/completions", json=_chat("file:///etc/passwd")), 422, "invalid_request_error")
        assert origin.hits["/photo.jpg"] == 0, "no request may reach a loopback address"


def test_the_address_policy():
    refused = [
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:7f00:1::1", "2001:db8::1", "fec0::1",
    ]  # fmt: skip
    for text in refused:
        assert not is_public_address(ipaddress.ip_address(text)), text
    for text in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"):
        assert is_public_address(ipaddress.ip_address(text)), text


def test_the_fetcher_checks_every_redirect_and_caps_size_and_time(photos):
    """The policy admits 127.0.0.1 only (standing in for a public address); 127.0.0.2 plays the private network."""

    def only_first(address) -> bool:
        return str(address) == "127.0.0.1"

    async def run(url: str, **kwargs) -> bytes:
        fetcher = RemoteImageFetcher(**{"max_bytes": 100_000, "timeout": 2.0, "address_allowed": only_first, **kwargs})
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.aclose()

    def expect(url: str, status: int, type_: str, **kwargs) -> str:
        with pytest.raises(ApiError) as caught:
            asyncio.run(run(url, **kwargs))
        assert (caught.value.status, caught.value.type) == (status, type_), caught.value.message
        return caught.value.message

    with LoopbackServer() as public, LoopbackServer(host="127.0.0.2") as private:
        secret = private.add("/secret.jpg", photos[0])
        public.add("/photo.jpg", photos[0])
        public.add("/hop", status=302, headers={"Location": "/photo.jpg"})
        public.add("/to-private", status=302, headers={"Location": secret})
        public.add("/big.jpg", b"x" * 200_000)
        public.add("/slow.jpg", photos[0], delay=3.0)
        public.add("/loop", status=302, headers={"Location": "/loop"})
        bomb = gzip.compress(gzip.compress(b"\0" * 20_000_000))  # ~20 kB that a decoder turns into 20 MB
        public.add("/bomb.jpg", bomb, headers={"Content-Encoding": "gzip, gzip"})
        assert asyncio.run(run(public.url("/hop"))) == photos[0]
        assert public.requests[-1]["headers"]["Host"] == f"127.0.0.1:{public.port}"
        assert "127.0.0.2" in expect(public.url("/to-private"), 400, "image_url_refused")
        assert private.hits["/secret.jpg"] == 0
        assert "100000" in expect(public.url("/big.jpg"), 422, "image_fetch_failed")
        assert "longer than" in expect(public.url("/slow.jpg"), 422, "image_fetch_failed", timeout=0.5)
        assert "redirects" in expect(public.url("/loop"), 422, "image_fetch_failed")
        assert "HTTP 404" in expect(public.url("/missing"), 422, "image_fetch_failed")
        assert "Content-Encoding" in expect(public.url("/bomb.jpg"), 422, "image_fetch_failed")
        assert public.requests[-1]["headers"]["Accept-Encoding"] == "identity"


# ------------------------------------------------------------------------------------------------ load, queue, time
def test_concurrent_requests_are_batched_and_answered_as_one_at_a_time(client, server, photos):
    reference = [
        client.post("/v1/predict", files={"image": ("p.jpg", photo)}).json()["raw"] for photo in photos
    ]  # sequential requests: batches of one
    before = client.get("/healthz").json()["stats"]
    total, concurrency = 240, 32

    async def drive() -> list[tuple[int, int, dict]]:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            gate = asyncio.Semaphore(concurrency)

            async def one(i: int) -> tuple[int, int, dict]:
                photo = photos[i % len(photos)]
                async with gate:
                    if i % 3 == 0:
                        response = await http.post("/v1/chat/completions", json=_chat(_data_url(photo), max_tokens=6))
                        answer = response.json()
                        return i, response.status_code, {"raw": answer["choices"][0]["message"]["content"]}
                    response = await http.post("/v1/predict", files={"image": ("p.jpg", photo)})
                    return i, response.status_code, response.json()

            return await asyncio.gather(*(one(i) for i in range(total)))

    results = asyncio.run(drive())
    assert [status for _, status, _ in results] == [200] * total
    wrong = [(i, body["raw"]) for i, _, body in results if body["raw"] != reference[i % len(photos)]]
    assert not wrong, f"{len(wrong)} batched answers differ from the one-at-a-time answers: {wrong[:3]}"
    stats = client.get("/healthz").json()["stats"]
    assert stats["answered"] - before["answered"] == total and stats["failed"] == before["failed"]
    assert stats["largest_batch"] > 1 and stats["batches"] - before["batches"] < total


def test_a_failing_batch_fails_only_its_bad_requests(server, photos):
    """Straight on the idle server's model: a batch holding an image the processor refuses (0x0: the whole
    `generate_answers` call raises) and a truncated file that fails to decode (reported for that image only)."""
    runner = server.service.runner
    good = [Image.open(io.BytesIO(p)).convert("RGB") for p in photos[:2]]
    truncated = Image.open(io.BytesIO(photos[2][: len(photos[2]) // 2]))  # lazily opened: fails at load()
    images = [good[0], Image.new("RGB", (0, 0)), good[1], truncated]
    outcomes = runner.run_batch([Job(image, runner.chat_prompt, 6) for image in images])
    assert isinstance(outcomes[1], ApiError) and (outcomes[1].status, outcomes[1].type) == (500, "generation_failed")
    assert "size must be positive" in outcomes[1].message
    assert isinstance(outcomes[3], ApiError) and (outcomes[3].status, outcomes[3].type) == (422, "invalid_image")
    alone = [runner.run_batch([Job(image, runner.chat_prompt, 6)])[0].text for image in good]
    assert [outcomes[0].text, outcomes[2].text] == alone


def test_a_full_queue_answers_503_and_a_slow_answer_504(tiny_model_dir, photos):
    options = _options(tiny_model_dir, batching=False, max_queue=1, max_new_tokens=48, warmup=False)
    with ServerThread(options) as small:
        remote = httpx.post(f"{small.url}/v1/chat/completions", json=_chat("https://example.com/a.jpg"))
        assert "--allow-remote-images" in _error(remote, 400, "image_url_refused")

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=small.url, timeout=120) as http:
                sends = [http.post("/v1/predict", files={"image": ("p.jpg", photos[i % 6])}) for i in range(24)]
                return await asyncio.gather(*sends)

        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
        overloaded = [r for r in responses if r.status_code == 503]
        for response in overloaded:
            assert "queue is full" in _error(response, 503, "server_overloaded")
            assert response.headers["retry-after"] == "1"
        health = httpx.get(f"{small.url}/healthz").json()
        assert health["stats"]["rejected"] == len(overloaded) and health["max_batch_size"] == 1

    with ServerThread(_options(tiny_model_dir, request_timeout=0.001, warmup=False)) as hurried:
        response = httpx.post(f"{hurried.url}/v1/predict", files={"image": ("p.jpg", photos[0])}, timeout=60)
        assert "--request-timeout" in _error(response, 504, "timeout")
        assert httpx.get(f"{hurried.url}/healthz").status_code == 200


def test_requests_that_timed_out_give_their_queue_places_and_batch_slots_back():
    batches: list[int] = []

    def run_batch(jobs: list[Job]) -> list[Answer]:
        batches.append(len(jobs))
        return [Answer(text="ok", prompt_tokens=1, completion_tokens=1, finish_reason="stop") for _ in jobs]

    async def scenario() -> str:
        engine = BatchEngine(run_batch, batch_size=8, batch_timeout=0.0, max_queue=3)
        loop = asyncio.get_running_loop()

        def job() -> Job:
            return Job(image=Image.new("RGB", (8, 8)), prompt="p", max_tokens=1, future=loop.create_future())

        timed_out = [job() for _ in range(3)]
        for waiting in timed_out:
            engine.submit(waiting)
            waiting.future.cancel()  # what a 504 does to a request still in the queue
        live = job()
        engine.submit(live)  # the queue is full of dead requests: they make room instead of a 503
        engine.start()
        try:
            return (await asyncio.wait_for(live.future, 10)).text
        finally:
            await engine.stop()

    assert asyncio.run(scenario()) == "ok"
    assert batches == [1], "only the live request was run"


# ------------------------------------------------------------------------------------------------ command line
def test_a_model_that_fails_to_load_is_reported_not_served(tmp_path, photos):
    broken = ServerThread(_options(tmp_path / "no-such-model")).start(stop_on_failure=False)
    try:
        health = httpx.get(f"{broken.url}/healthz")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "failed" and body["ready"] is False and "no-such-model" in body["error"]
        response = httpx.post(f"{broken.url}/v1/predict", files={"image": ("p.jpg", photos[0])})
        assert "could not load" in _error(response, 503, "not_ready")
    finally:
        broken.stop()
    with pytest.raises(ServeError, match="could not load"):
        ServerThread(_options(tmp_path / "no-such-model")).start()


def test_serve_options_and_a_model_that_does_not_load(tmp_path, capsys):
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeOptions(model="m", max_batch_size=0)
    with pytest.raises(ValueError, match="image tag"):
        ServeOptions(model="m", prompt="no tag here")
    args = build_parser().parse_args(["serve", "--model", "m", "--no-batching", "--allow-remote-images"])
    assert args.command == "serve" and args.no_batching and args.allow_remote_images
    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "0", "--log-level", "warning"]) == 1
    assert "could not load" in capsys.readouterr().err


def test_the_listening_socket_turns_nagle_off():
    """asyncio sets TCP_NODELAY on accepted connections only when the socket's proto is TCP; without it every
    keep-alive response waits for a delayed ACK (~40 ms)."""
    import socket

    from phi3v.serve import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_the_guide_commands_parse():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "serve.md").read_text()
    commands = [command for command in documented_commands(guide) if command[0] == "serve"]
    assert len(commands) >= 3, "docs/serve.md lost its commands"
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(command)
        assert args.command == "serve" and args.model


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/v1/chat/completions", "application/json"), ("/v1/predict", "multipart/form-data; boundary=xyz")],
)
def test_a_client_that_disconnects_mid_body_is_logged_as_a_disconnect(server, caplog, path, content_type):
    import socket
    import time
    from urllib.parse import urlsplit

    caplog.set_level("INFO", logger="phi3v.serve")
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: 5000\r\n\r\n"
        sock.sendall(head.encode() + b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n')
        time.sleep(0.2)  # the server is reading the body now
    deadline = time.monotonic() + 10
    while "client disconnected" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"client disconnected before sending its whole body: POST {path}" in caplog.text
    assert "unexpected error" not in caplog.text and "internal_error" not in caplog.text
