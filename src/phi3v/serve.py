"""`phi3v serve`: an HTTP service answering product photos, with micro-batching (FastAPI + uvicorn).

Endpoints (every error is JSON ``{"error": {"message": ..., "type": ...}}``; docs/serve.md has examples):

- ``POST /v1/predict``: one photo as a multipart upload (field ``image``) or JSON ``{"image": "<base64 or data
  URL>"}`` -> ``{"title", "category", "price", "raw", "model"}``, the answer parsed with the model's answer template.
- ``POST /v1/chat/completions``: the OpenAI chat format with exactly one ``image_url`` part (a ``data:`` URL; an
  http(s) URL only with ``--allow-remote-images``, and never to a private, loopback, link-local, multicast or
  reserved address) -> an OpenAI ``chat.completion``. Without user text the model's trained prompt is used.
- ``GET /healthz`` (ready or not, queue depth, counters) and ``GET /v1/models`` (OpenAI list format).
- ``GET /``: a page to try the model in a browser (`phi3v.page`): drop or pick a photo, see the parsed answer, the
  raw answer, the model and the latency; self-contained, nothing loaded from elsewhere.

How a request is answered: the handler checks the body (size, content type, JSON, fields), decodes the image with the
project's loader (`phi3v.model.image_io.load_image`, after a pixel-count check: no decompression bombs) on a
thread, renders the chat prompt and puts a job into a bounded `asyncio.Queue` (full: 503 at once). A dispatcher task
on the event loop takes the first waiting job, then more until it holds ``max_batch_size`` jobs, or
``batch_timeout_ms`` has passed, or no other request is being received (a lone request never waits for company),
and hands the batch to the single worker thread, which runs one
`phi3v.generation.generate_answers` call per (prompt, max_tokens) group: greedy decoding with the KV cache, left
padding, stopped at ``<|end|>``, the same decoding as `phi3v evaluate`. When a batch fails, its requests are
answered one by one so that only the culprit fails; the service goes on. Each request has a deadline (504), which
also drops it from the queue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phi3v import __version__
from phi3v.model.image_io import ImageLoadError, load_image

logger = logging.getLogger(__name__)

IMAGE_TAG = "<|image_1|>"
USER_AGENT = f"phi3v-serve/{__version__} (remote image fetch)"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


# ----------------------------------------------------------------------------------------------------------- options
@dataclass
class ServeOptions:
    """Settings of `phi3v serve` (one field per command-line option; docs/serve.md describes each).

    Args:
        model: A training output, ``checkpoint-N``, exported or base model folder, or a hub id
            (`phi3v.inference.load_for_inference`).
        host: Interface to listen on (``0.0.0.0`` for every interface).
        port: TCP port (0: a free one, for tests).
        served_model_name: The ``model`` id in responses and ``/v1/models``; default: the folder's name (a hub id as
            given).
        device / dtype / num_crops / base_model / qlora_base: As for `phi3v evaluate`.
        prompt / answer_template: Override the prompt and template the model was trained with (with
            ``override_trained`` only, as for `phi3v evaluate`).
        override_trained: Allow ``num_crops`` / ``prompt`` / ``answer_template`` other than the trained ones.
        max_batch_size: Most requests per `generate_answers` call.
        batch_timeout_ms: How long the first request of a batch waits for requests being received.
        batching: False = one request per call (``--no-batching``; the benchmark baseline).
        max_queue: Requests waiting for the worker; more get 503.
        max_new_tokens: Answer length bound when a request gives no ``max_tokens``.
        max_tokens_limit: Largest ``max_tokens`` a request may ask for (more: 422).
        request_timeout: Seconds from receiving a request to its answer (else 504).
        max_body_bytes: Largest request body (else 413).
        max_image_pixels: Largest ``width * height`` decoded (else 422).
        max_prompt_chars: Longest chat text, all messages together (else 422).
        allow_remote_images: Fetch http(s) image URLs (public addresses only).
        remote_image_timeout: Seconds for one remote image, redirects included.
        remote_image_max_bytes: Largest remote image.
        remote_image_max_redirects: Redirects followed per remote image.
        warmup: Answer one blank image before reporting ready.
        log_level / access_log: uvicorn's logging.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    device: str | None = None
    dtype: str = "auto"
    num_crops: int | None = None
    base_model: str | None = None
    qlora_base: Literal["nf4", "original"] = "nf4"
    prompt: str | None = None
    answer_template: str | None = None
    override_trained: bool = False
    max_batch_size: int = 8
    batch_timeout_ms: float = 10.0
    batching: bool = True
    max_queue: int = 64
    max_new_tokens: int = 64
    max_tokens_limit: int = 256
    request_timeout: float = 120.0
    max_body_bytes: int = 20_000_000
    max_image_pixels: int = 25_000_000
    max_prompt_chars: int = 4000
    allow_remote_images: bool = False
    remote_image_timeout: float = 10.0
    remote_image_max_bytes: int = 20_000_000
    remote_image_max_redirects: int = 3
    warmup: bool = True
    log_level: str = "info"
    access_log: bool = True

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "max_batch_size": self.max_batch_size >= 1,
            "batch_timeout_ms": self.batch_timeout_ms >= 0,
            "max_queue": self.max_queue >= 1,
            "max_new_tokens": 1 <= self.max_new_tokens <= self.max_tokens_limit,
            "max_tokens_limit": self.max_tokens_limit >= 1,
            "request_timeout": self.request_timeout > 0,
            "max_body_bytes": self.max_body_bytes >= 1,
            "max_image_pixels": self.max_image_pixels >= 1,
            "max_prompt_chars": self.max_prompt_chars >= 1,
            "remote_image_timeout": self.remote_image_timeout > 0,
            "remote_image_max_bytes": self.remote_image_max_bytes >= 1,
            "remote_image_max_redirects": self.remote_image_max_redirects >= 0,
        }
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid serve options: {', '.join(bad)} (max_new_tokens must be <= max_tokens_limit)")
        if self.prompt is not None and self.prompt.count(IMAGE_TAG) != 1:
            raise ValueError(f"--prompt must hold the image tag {IMAGE_TAG} exactly once, got {self.prompt!r}")

    @property
    def batch_size(self) -> int:
        """Requests per `generate_answers` call: ``max_batch_size``, or 1 without batching."""
        return self.max_batch_size if self.batching else 1

    @property
    def model_name(self) -> str:
        """The id the service answers under."""
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model)
        return path.resolve().name if path.is_dir() else self.model


class ServeError(RuntimeError):
    """The service could not start (the model did not load); the message says why."""


class ApiError(Exception):
    """An error answered as JSON ``{"error": {"message", "type"}}`` with an HTTP status."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.type, self.message, self.headers)


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body every failure of the service is answered with."""
    return JSONResponse({"error": {"message": message, "type": type_, "code": status}}, status, headers=headers)


# ------------------------------------------------------------------------------------------------------------ images
# Raster formats a product photo comes in; Pillow's others (EPS runs Ghostscript, ...) are refused before decoding.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an uploaded image with the project's loader (RGB, EXIF orientation applied, first frame).

    The size is read from the header first: an image of more than ``max_pixels`` pixels is refused before any
    pixel is decoded (decompression bombs).

    Raises:
        ApiError: 422 ``invalid_image`` for an empty body, an unknown format, a truncated or corrupt file or too many
            pixels.
    """
    if not data:
        raise ApiError(422, "invalid_image", "the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:  # never EPS (Ghostscript) and kin
            width, height = probe.size
    except Image.DecompressionBombError as err:
        raise ApiError(422, "invalid_image", f"refused: possible decompression bomb ({err})") from err
    except Exception as err:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError ... on garbage
        raise ApiError(422, "invalid_image", f"not a recognised image format ({type(err).__name__})") from err
    if width * height > max_pixels:
        raise ApiError(
            422,
            "invalid_image",
            f"the image is {width}x{height} = {width * height} pixels, above this server's limit of {max_pixels} "
            "(--max-image-pixels); refused before decoding",
        )
    try:
        return load_image(data, name="the image")
    except ImageLoadError as err:
        raise ApiError(422, "invalid_image", str(err)) from err


def decode_base64(text: str) -> bytes:
    """Base64 (standard or URL-safe alphabet, line breaks and missing padding tolerated) -> bytes.

    Raises:
        ApiError: 422 ``invalid_image`` when the text is not base64.
    """
    compact = "".join(text.split()).replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(422, "invalid_image", f"the image is not valid base64 ({err})") from err


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:[<media type>][;base64],<data>`` URL (base64 only).

    Raises:
        ApiError: 422 ``invalid_image`` for a malformed data URL, a non-base64 one or a non-image media type.
    """
    header, comma, payload = url.partition(",")
    if not comma:
        raise ApiError(422, "invalid_image", "malformed data URL: no ',' before the data")
    parameters = header[len("data:") :].split(";")
    media_type = parameters[0].strip().lower()
    if "base64" not in (p.strip().lower() for p in parameters[1:]):
        raise ApiError(422, "invalid_image", "data URLs must be base64-encoded (data:image/jpeg;base64,...)")
    if media_type and not media_type.startswith("image/") and media_type != "application/octet-stream":
        raise ApiError(422, "invalid_image", f"data URL media type {media_type!r} is not an image type")
    return decode_base64(payload)


# ----------------------------------------------------------------------------------------------------- remote images
def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a globally routable unicast address; False for private, loopback, link-local, multicast, reserved,
    unspecified, shared (100.64/10), documentation addresses, and IPv6 forms embedding such an IPv4 address
    (IPv4-mapped, 6to4, Teredo, NAT64)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 address a.b.c.d
            return is_public_address(address.ipv4_mapped)
        if address in _NAT64_PREFIX:  # 64:ff9b::a.b.c.d reaches a.b.c.d through a NAT64 gateway
            return is_public_address(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        candidates += [e for e in (address.sixtofour, *(address.teredo or ())) if e is not None]
    for candidate in candidates:
        if (
            not candidate.is_global
            or candidate.is_multicast
            or candidate.is_private
            or candidate.is_loopback
            or candidate.is_link_local
            or candidate.is_reserved
            or candidate.is_unspecified
            or (isinstance(candidate, ipaddress.IPv6Address) and candidate.is_site_local)  # fec0::/10, deprecated
        ):
            return False
    return True


class RemoteImageFetcher:
    """Fetch an http(s) image URL without reaching private networks (no SSRF).

    For the URL and every redirect: the host is resolved, and **every** address it resolves to must pass
    ``address_allowed`` (default `is_public_address`), else the fetch is refused before any connection. The
    request then goes to the checked address itself (the ``Host`` header and TLS server name keep the host name, so
    certificates are verified against it), so a second DNS answer cannot redirect it (DNS rebinding). Proxies from
    the environment are ignored, and no connection is kept alive. The whole fetch, redirects included, has one
    deadline, and the body is read only up to ``max_bytes`` (after content decoding).

    Args:
        max_bytes: Largest body accepted.
        timeout: Seconds for the whole fetch.
        max_redirects: Redirects followed.
        address_allowed: Policy for resolved addresses (tests pass one that admits a loopback address).
    """

    def __init__(
        self,
        max_bytes: int,
        timeout: float,
        max_redirects: int = 3,
        address_allowed: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool] = is_public_address,
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.address_allowed = address_allowed
        self._client = httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(timeout),
            # identity only: a compressed body could expand far past max_bytes inside one decoded chunk
            headers={"User-Agent": USER_AGENT, "Accept": "image/*;q=0.9,*/*;q=0.5", "Accept-Encoding": "identity"},
            # no keep-alive: connections are pooled by address, and a TLS connection verified for one host name
            # must not be reused for another host name that resolves to the same address
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=0),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> bytes:
        """The body of ``url`` (an http(s) URL), following redirects.

        Raises:
            ApiError: 400 ``image_url_refused`` (not http(s), or a disallowed address), 422 ``image_fetch_failed``
                (DNS failure, HTTP error status, too large, too many redirects, connection error, timeout).
        """
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException) as err:
            raise ApiError(
                422, "image_fetch_failed", f"fetching the image took longer than {self.timeout:g} s"
            ) from err

    async def _fetch(self, url: str) -> bytes:
        for _hop in range(self.max_redirects + 1):
            target = self._parse(url)
            address = await self._checked_address(target)
            pinned = target.copy_with(host=address)
            host = target.raw_host.decode("ascii")  # IDNA form: what DNS, the Host header and SNI take
            host_header = host if target.port is None else f"{host}:{target.port}"
            if ":" in host and target.port is None:
                host_header = f"[{host}]"
            elif ":" in host:
                host_header = f"[{host}]:{target.port}"
            extensions = {"sni_hostname": host} if target.scheme == "https" else {}
            try:
                async with self._client.stream(
                    "GET", pinned, headers={"Host": host_header}, extensions=extensions
                ) as response:
                    if response.status_code in _REDIRECT_STATUSES:
                        location = response.headers.get("location")
                        if not location:
                            raise ApiError(422, "image_fetch_failed", f"{url}: redirect without a Location header")
                        url = str(target.join(location))
                        continue
                    if response.status_code != 200:
                        raise ApiError(422, "image_fetch_failed", f"{url}: HTTP {response.status_code}")
                    return await self._read(response, url)
            except httpx.TimeoutException:
                raise
            except httpx.HTTPError as err:
                raise ApiError(422, "image_fetch_failed", f"{url}: {type(err).__name__}: {err}") from err
        raise ApiError(422, "image_fetch_failed", f"more than {self.max_redirects} redirects")

    @staticmethod
    def _parse(url: str) -> httpx.URL:
        try:
            target = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as err:
            raise ApiError(400, "image_url_refused", f"not a valid URL: {url[:200]!r}") from err
        if target.scheme not in ("http", "https") or not target.host:
            raise ApiError(400, "image_url_refused", f"only http(s) URLs are fetched, not {url[:200]!r}")
        return target

    async def _checked_address(self, target: httpx.URL) -> str:
        port = target.port or (443 if target.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                target.raw_host.decode("ascii"), port, type=socket.SOCK_STREAM
            )
        except (socket.gaierror, UnicodeError) as err:
            raise ApiError(422, "image_fetch_failed", f"{target.host}: the host does not resolve ({err})") from err
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise ApiError(422, "image_fetch_failed", f"{target.host}: the host does not resolve")
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            if not self.address_allowed(address):
                raise ApiError(
                    400,
                    "image_url_refused",
                    f"{target.host} resolves to {address}, a private, loopback, link-local, multicast or reserved "
                    "address: refused",
                )
        return addresses[0].split("%", 1)[0]

    async def _read(self, response: httpx.Response, url: str) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise ApiError(422, "image_fetch_failed", f"{url}: {declared} bytes, above the limit of {self.max_bytes}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ApiError(
                422, "image_fetch_failed", f"{url}: Content-Encoding {encoding[:40]!r} refused (only identity)"
            )
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > self.max_bytes:
                raise ApiError(422, "image_fetch_failed", f"{url}: the image is larger than {self.max_bytes} bytes")
        return bytes(body)


# ------------------------------------------------------------------------------------------------- request schemas
class PredictRequest(BaseModel):
    """JSON body of ``POST /v1/predict``."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(min_length=1, description="base64 image, a data: URL, or (with --allow-remote-images) a URL")
    max_tokens: StrictInt | None = None


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    """JSON body of ``POST /v1/chat/completions`` (sampling options such as ``temperature`` are accepted and
    ignored: decoding is greedy)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    stream: bool | None = False
    n: StrictInt | None = 1


def _validation_message(err: ValidationError) -> str:
    parts = []
    for problem in err.errors()[:5]:
        where = ".".join(str(x) for x in problem["loc"]) or "body"
        parts.append(f"{where}: {problem['msg']}")
    return "invalid request: " + "; ".join(parts)


def chat_conversation(
    messages: Sequence[ChatMessage], trained_prompt: str, max_chars: int
) -> tuple[list[dict[str, str]], str]:
    """OpenAI messages -> a Phi-3 conversation with one ``<|image_1|>`` tag, and the image URL.

    Parts of a message are joined with a newline, the image part becoming the tag (``[image, text]`` ->
    ``"<|image_1|>\\nWhat is it?"``). When the user message holding the image has no text, its content is the model's
    trained prompt, so a bare image gets exactly what `/v1/predict` (and `phi3v evaluate`) send.

    Raises:
        ApiError: 422 for anything but exactly one image (in a user message), an unknown part type, an image tag
            typed in the text, or text longer than ``max_chars``.
    """
    conversation: list[dict[str, str]] = []
    urls: list[str] = []
    image_message = -1
    image_message_has_text = False
    total_chars = 0
    for position, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = (
            [ContentPart(type="text", text=message.content or "")]
            if message.content is None or isinstance(message.content, str)
            else message.content
        )
        pieces: list[str] = []
        has_text = False
        for part in parts:
            if part.type == "text":
                text = part.text or ""
                if "<|image_" in text:
                    raise ApiError(422, "invalid_request_error", "image tags (<|image_N|>) are not allowed in text")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:  # a lone surrogate (JSON "\ud800") is no text a tokenizer takes
                    raise ApiError(422, "invalid_request_error", "the text is not valid Unicode") from err
                total_chars += len(text)
                if text.strip():
                    has_text = True
                    pieces.append(text)
            elif part.type == "image_url":
                if role != "user":
                    raise ApiError(422, "invalid_request_error", "the image must be in a user message")
                url = (
                    part.image_url
                    if isinstance(part.image_url, str)
                    else (part.image_url.url if part.image_url else "")
                )
                if not url:
                    raise ApiError(422, "invalid_request_error", "an image_url part without a url")
                urls.append(url)
                image_message = position
                pieces.append(IMAGE_TAG)
            else:
                raise ApiError(
                    422, "invalid_request_error", f"unsupported content part type {part.type!r} (text, image_url)"
                )
        if position == image_message:
            image_message_has_text = has_text
        conversation.append({"role": role, "content": "\n".join(pieces)})
    if len(urls) != 1:
        raise ApiError(422, "invalid_request_error", f"exactly one image per request is supported, got {len(urls)}")
    if total_chars > max_chars:
        raise ApiError(
            422, "invalid_request_error", f"the text is {total_chars} characters, above the limit of {max_chars}"
        )
    if not image_message_has_text:
        conversation[image_message] = {"role": "user", "content": trained_prompt}
    return conversation, urls[0]


# ------------------------------------------------------------------------------------------------------ batching
@dataclass
class Job:
    """One request waiting for an answer."""

    image: Image.Image
    prompt: str  # chat-formatted, one <|image_1|> tag
    max_tokens: int
    future: asyncio.Future | None = None  # set by the service; None when a batch is run directly


@dataclass
class Answer:
    """A generated answer and its token counts: the prompt's exact, the completion's from the text tokenised again
    (capped at ``max_tokens``; `generate_answers` does not report per-answer counts)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


@dataclass
class EngineStats:
    """Counters reported by ``/healthz``."""

    requests: int = 0
    answered: int = 0
    failed: int = 0
    rejected: int = 0
    timed_out: int = 0
    batches: int = 0
    largest_batch: int = 0


class BatchEngine:
    """A bounded queue of `Job` s, a dispatcher task forming batches, and one worker thread running them.

    Args:
        run_batch: Answers a batch on the worker thread: one `Answer` or `ApiError` per job, in order.
        batch_size: Most jobs per batch.
        batch_timeout: Seconds the first job of a batch may wait for more, while requests are being received
            (`arrival`); with none on the way the batch goes at once.
        max_queue: Jobs waiting at most (`submit` raises `asyncio.QueueFull` beyond).
    """

    def __init__(
        self,
        run_batch: Callable[[list[Job]], list[Answer | ApiError]],
        batch_size: int,
        batch_timeout: float,
        max_queue: int,
    ) -> None:
        self.run_batch = run_batch
        self.batch_size = batch_size
        self.batch_timeout = batch_timeout
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phi3v-serve-worker")
        self.stats = EngineStats()
        self.in_flight = 0
        self.arriving = 0  # requests being received (body, image decode) that will soon be submitted
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="phi3v-serve-dispatcher")

    async def run_in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread (model loading, warm-up), between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """Around receiving a request, up to its `submit`: a batch waits for company only while some is coming."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            self._wakeup.set()

    def submit(self, job: Job) -> None:
        if self.queue.full():  # requests that timed out while waiting give their places back first
            waiting = [self.queue.get_nowait() for _ in range(self.queue.qsize())]
            for live in filter(self._live, waiting):
                self.queue.put_nowait(live)
        self.queue.put_nowait(job)  # asyncio.QueueFull when full
        self.stats.requests += 1
        self._wakeup.set()

    @staticmethod
    def _live(job: Job) -> bool:
        return job.future is not None and not job.future.done()  # done: it timed out (504) while waiting

    async def _collect(self) -> list[Job]:
        batch = [await self.queue.get()]
        while not self._live(batch[0]):
            batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_timeout
        while len(batch) < self.batch_size:
            try:
                job = self.queue.get_nowait()
                if self._live(job):
                    batch.append(job)
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if self.arriving == 0 or remaining <= 0:  # nobody on the way: waiting would only add latency
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)  # a submit, or a request that failed early
            except asyncio.TimeoutError:
                break
        return batch

    async def _dispatch(self) -> None:
        while True:
            batch = await self._collect()
            # requests that timed out while waiting are dropped here
            batch = [job for job in batch if self._live(job)]
            if not batch:
                continue
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            self.in_flight = len(batch)
            try:
                outcomes = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, batch)
            except Exception as err:  # run_batch handles its own failures; this is a last line of defence
                logger.exception("a batch of %d requests failed", len(batch))
                outcomes = [ApiError(500, "generation_failed", f"{type(err).__name__}: {err}")] * len(batch)
            finally:
                self.in_flight = 0
            for job, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, ApiError):
                    self.stats.failed += 1
                    if not job.future.done():
                        job.future.set_exception(outcome)
                else:
                    self.stats.answered += 1
                    if not job.future.done():
                        job.future.set_result(outcome)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(ApiError(503, "shutting_down", "the server is shutting down"))
        self.executor.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------------- the model
class ModelRunner:
    """The loaded model, its prompt and answer template, and the batch function the worker thread runs."""

    def __init__(self, options: ServeOptions) -> None:
        from phi3v.inference import load_for_inference

        self.loaded = load_for_inference(
            options.model,
            base_model=options.base_model,
            device=options.device,
            dtype=options.dtype,
            num_crops=options.num_crops,
            prompt=options.prompt,
            answer_template=options.answer_template,
            override_trained=options.override_trained,
            qlora_base=options.qlora_base,
        )
        self.prompt = self.loaded.prompt(options.prompt)
        self.template = self.loaded.answer_template(options.answer_template)
        self.processor = self.loaded.processor
        self.chat_prompt = self.render([{"role": "user", "content": self.prompt}])
        self._text_tokens: dict[str, int] = {}

    def render(self, conversation: list[dict[str, str]]) -> str:
        """The chat-formatted prompt of a conversation (with the generation prompt)."""
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def _generate(self, prompt: str, max_tokens: int, images: list[Image.Image]) -> list[str | ApiError]:
        from phi3v.generation import generate_answers

        generation = generate_answers(
            self.loaded.model,
            self.processor,
            prompt,
            range(len(images)),
            images.__getitem__,
            batch_size=len(images),
            max_new_tokens=max_tokens,
        )
        return [
            generation.answers[i]
            if i in generation.answers
            else ApiError(422, "invalid_image", generation.failures.get(i, "the image could not be processed"))
            for i in range(len(images))
        ]

    def _prompt_tokens(self, prompt: str, image: Image.Image) -> int:
        """Prompt length as the processor builds it: each text chunk with its BOS, plus the image's tokens."""
        from phi3v.model.processing import IMAGE_TAG_PATTERN

        if prompt not in self._text_tokens:
            if len(self._text_tokens) > 1024:
                self._text_tokens.clear()
            chunks = IMAGE_TAG_PATTERN.split(prompt)
            self._text_tokens[prompt] = sum(len(self.processor.tokenizer(chunk)["input_ids"]) for chunk in chunks)
        return self._text_tokens[prompt] + self.processor.image_processor.num_image_tokens_for_size(*image.size)

    def _answer(self, job: Job, text: str) -> Answer:
        retokenised = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        finish: Literal["stop", "length"] = "length" if retokenised >= job.max_tokens else "stop"
        return Answer(text, self._prompt_tokens(job.prompt, job.image), min(retokenised, job.max_tokens), finish)

    def run_batch(self, jobs: list[Job]) -> list[Answer | ApiError]:
        """Answer ``jobs`` (on the worker thread): one `generate_answers` call per (prompt, max_tokens) group; a
        group that fails is answered one request at a time, so only the failing request fails."""
        outcomes: list[Answer | ApiError | None] = [None] * len(jobs)
        groups: dict[tuple[str, int], list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault((job.prompt, job.max_tokens), []).append(index)
        for (prompt, max_tokens), members in groups.items():
            started = time.perf_counter()
            try:
                texts = self._generate(prompt, max_tokens, [jobs[i].image for i in members])
            except Exception as err:
                if len(members) == 1:
                    logger.exception("generation failed for one request")
                    texts = [ApiError(500, "generation_failed", f"{type(err).__name__}: {err}")]
                else:
                    if isinstance(err, torch.OutOfMemoryError):
                        torch.cuda.empty_cache()
                    logger.warning(
                        "a batch of %d failed (%s: %s); answering its requests one at a time",
                        len(members),
                        type(err).__name__,
                        err,
                    )
                    texts = []
                    for i in members:
                        try:
                            texts += self._generate(prompt, max_tokens, [jobs[i].image])
                        except Exception as single:
                            logger.exception("generation failed for one request")
                            texts.append(ApiError(500, "generation_failed", f"{type(single).__name__}: {single}"))
            for i, text in zip(members, texts, strict=True):
                outcomes[i] = text if isinstance(text, ApiError) else self._answer(jobs[i], text)
            logger.debug("answered %d requests in %.3f s", len(members), time.perf_counter() - started)
        return [outcome for outcome in outcomes if outcome is not None]

    def warm_up(self) -> None:
        """One answer for a blank image: first-call costs (allocator, kernels, thread pools) before ready."""
        image = Image.new("RGB", (336, 336), (255, 255, 255))
        self._generate(self.chat_prompt, 1, [image])


# ------------------------------------------------------------------------------------------------------ the service
class BodyLimitMiddleware:
    """ASGI middleware: 413 for a body above ``max_bytes`` (by Content-Length before reading, or while streaming)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ApiError(
            413, "request_too_large", f"the request body is above this server's limit of {self.max_bytes} bytes"
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():
                    await error_response(400, "invalid_request_error", "invalid Content-Length")(scope, receive, send)
                    return
                if int(value) > self.max_bytes:
                    await too_large.response()(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


class Phi3VService:
    """The FastAPI application of `phi3v serve` and its state (model loading, batching engine, counters).

    The model loads on the worker thread once the server has started; until then ``/healthz`` answers 503 with
    ``"status": "loading"`` and the model endpoints 503 ``not_ready``. ``ready`` is a `threading.Event` set once the
    model is ready or failed to load (then ``load_error`` says why and ``on_load_failure`` is called).
    """

    def __init__(self, options: ServeOptions, on_load_failure: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.on_load_failure = on_load_failure
        self.status: Literal["starting", "loading", "ready", "failed", "stopping"] = "starting"
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.runner: ModelRunner | None = None
        self.engine: BatchEngine | None = None
        self.fetcher: RemoteImageFetcher | None = None
        self.created = int(time.time())
        self.app = self._build_app()

    # ---- lifecycle -------------------------------------------------------------------------------------------
    async def _start(self) -> None:
        options = self.options
        self.engine = BatchEngine(
            self._run_batch, options.batch_size, options.batch_timeout_ms / 1000.0, options.max_queue
        )
        if options.allow_remote_images:
            self.fetcher = RemoteImageFetcher(
                options.remote_image_max_bytes, options.remote_image_timeout, options.remote_image_max_redirects
            )
        self.status = "loading"
        self._loader = asyncio.get_running_loop().create_task(self._load(), name="phi3v-serve-loader")

    async def _load(self) -> None:
        assert self.engine is not None
        started = time.perf_counter()
        logger.info("loading %s", self.options.model)
        try:
            self.runner = await self.engine.run_in_worker(lambda: ModelRunner(self.options))
            if self.options.warmup:
                await self.engine.run_in_worker(self.runner.warm_up)
        except Exception as err:
            self.status = "failed"
            self.load_error = f"could not load {self.options.model}: {type(err).__name__}: {err}"
            logger.error("%s", self.load_error)
            self.ready.set()
            if self.on_load_failure is not None:
                self.on_load_failure(self.load_error)
            return
        self.engine.start()
        self.status = "ready"
        loaded = self.runner.loaded
        logger.info(
            "ready in %.1f s: %s (%s) on %s, %s; batches of up to %d, queue %d",
            time.perf_counter() - started,
            self.options.model_name,
            loaded.kind,
            loaded.device,
            str(loaded.dtype).removeprefix("torch."),
            self.options.batch_size,
            self.options.max_queue,
        )
        self.ready.set()

    async def _stop(self) -> None:
        self.status = "stopping"
        loader = getattr(self, "_loader", None)
        if loader is not None and not loader.done():
            loader.cancel()
        if self.engine is not None:
            await self.engine.stop()
        if self.fetcher is not None:
            await self.fetcher.aclose()

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _run_batch(self, jobs: list[Job]) -> list[Answer | ApiError]:
        assert self.runner is not None
        return self.runner.run_batch(jobs)

    def _require_ready(self) -> tuple[ModelRunner, BatchEngine]:
        if self.status != "ready" or self.runner is None or self.engine is None:
            message = self.load_error or f"the model is not ready yet ({self.status})"
            raise ApiError(503, "not_ready", message, headers={"Retry-After": "5"})
        return self.runner, self.engine

    async def _deadline(self, work: Awaitable[JSONResponse]) -> JSONResponse:
        try:
            return await asyncio.wait_for(work, self.options.request_timeout)
        except asyncio.TimeoutError as err:
            if self.engine is not None:
                self.engine.stats.timed_out += 1
            raise ApiError(
                504, "timeout", f"no answer within {self.options.request_timeout:g} s (--request-timeout)"
            ) from err

    def _max_tokens(self, *values: int | None) -> int:
        value = next((v for v in values if v is not None), self.options.max_new_tokens)
        if not 1 <= value <= self.options.max_tokens_limit:
            raise ApiError(
                422,
                "invalid_request_error",
                f"max_tokens must be between 1 and {self.options.max_tokens_limit}, got {value}",
            )
        return value

    @staticmethod
    def _media_type(request: Request) -> str:
        return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    async def _json(self, request: Request) -> Any:
        media_type = self._media_type(request)
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise ApiError(415, "unsupported_media_type", f"expected application/json, got {media_type or 'nothing'!r}")
        body = await request.body()
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, int digit limit, nesting
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {str(err)[:200]}") from err

    async def _image_bytes(self, source: str, *, raw_base64: bool) -> bytes:
        """The bytes behind an image string: a data URL, an http(s) URL, or (``raw_base64``) plain base64."""
        lowered = source[:16].lower()
        if lowered.startswith("data:"):
            return decode_data_url(source)
        if lowered.startswith(("http://", "https://")):
            if self.fetcher is None:
                raise ApiError(
                    400,
                    "image_url_refused",
                    "remote image URLs are disabled on this server (start it with --allow-remote-images); "
                    "send the image inline as a data: URL",
                )
            return await self.fetcher.fetch(source)
        if raw_base64:
            return decode_base64(source)
        raise ApiError(422, "invalid_request_error", "image_url.url must be a data: URL or an http(s) URL")

    def _enqueue(self, engine: BatchEngine, image: Image.Image, prompt: str, max_tokens: int) -> Job:
        job = Job(image, prompt, max_tokens, asyncio.get_running_loop().create_future())
        try:
            engine.submit(job)
        except asyncio.QueueFull as err:
            engine.stats.rejected += 1
            raise ApiError(
                503,
                "server_overloaded",
                f"the request queue is full ({engine.queue.maxsize} waiting); retry later",
                headers={"Retry-After": "1"},
            ) from err
        return job

    async def _decode(self, data: bytes) -> Image.Image:
        return await asyncio.to_thread(decode_image, data, self.options.max_image_pixels)

    # ---- endpoints -------------------------------------------------------------------------------------------
    async def _predict(self, request: Request) -> JSONResponse:
        runner, engine = self._require_ready()
        with engine.arrival():
            image, max_tokens = await self._predict_input(request)
            job = self._enqueue(engine, image, runner.chat_prompt, max_tokens)
        answer: Answer = await job.future
        fields = runner.template.parse(answer.text)
        return JSONResponse(
            {
                "title": fields.title,
                "category": fields.category,
                "price": fields.price,
                "raw": answer.text,
                "model": self.options.model_name,
            }
        )

    async def _predict_input(self, request: Request) -> tuple[Image.Image, int]:
        media_type = self._media_type(request)
        if media_type == "multipart/form-data":
            async with request.form(max_files=4, max_fields=8, max_part_size=self.options.max_body_bytes) as form:
                uploads = [item for item in form.getlist("image") if not isinstance(item, str)]
                if len(uploads) != 1 or len(form.getlist("image")) != 1:
                    raise ApiError(422, "invalid_request_error", "send exactly one file in the multipart field 'image'")
                data = await uploads[0].read()
                max_tokens_field = form.get("max_tokens")
            if max_tokens_field is None:
                max_tokens = self._max_tokens(None)
            else:
                digits = max_tokens_field.strip() if isinstance(max_tokens_field, str) else ""
                if not (digits.isascii() and digits.isdecimal() and len(digits) <= 9):
                    raise ApiError(422, "invalid_request_error", "max_tokens must be an integer")
                max_tokens = self._max_tokens(int(digits))
        elif media_type == "application/json" or media_type.endswith("+json"):
            body = await self._json(request)
            try:
                parsed = PredictRequest.model_validate(body)
            except ValidationError as err:
                raise ApiError(422, "invalid_request_error", _validation_message(err)) from err
            max_tokens = self._max_tokens(parsed.max_tokens)
            data = await self._image_bytes(parsed.image, raw_base64=True)
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"expected multipart/form-data (field 'image') or application/json, got {media_type or 'nothing'!r}",
            )
        return await self._decode(data), max_tokens

    async def _chat(self, request: Request) -> JSONResponse:
        runner, engine = self._require_ready()
        with engine.arrival():
            image, prompt, max_tokens = await self._chat_input(request, runner)
            job = self._enqueue(engine, image, prompt, max_tokens)
        answer: Answer = await job.future
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.options.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer.text},
                        "finish_reason": answer.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": answer.prompt_tokens,
                    "completion_tokens": answer.completion_tokens,
                    "total_tokens": answer.prompt_tokens + answer.completion_tokens,
                },
            }
        )

    async def _chat_input(self, request: Request, runner: ModelRunner) -> tuple[Image.Image, str, int]:
        body = await self._json(request)
        try:
            parsed = ChatCompletionRequest.model_validate(body)
        except ValidationError as err:
            raise ApiError(422, "invalid_request_error", _validation_message(err)) from err
        if parsed.stream:
            raise ApiError(422, "invalid_request_error", "stream=true is not supported: answers are short")
        if parsed.n not in (None, 1):
            raise ApiError(422, "invalid_request_error", "only n=1 is supported (decoding is greedy)")
        max_tokens = self._max_tokens(parsed.max_completion_tokens, parsed.max_tokens)
        conversation, url = chat_conversation(parsed.messages, runner.prompt, self.options.max_prompt_chars)
        data = await self._image_bytes(url, raw_base64=False)
        return await self._decode(data), runner.render(conversation), max_tokens

    def health(self) -> tuple[int, dict[str, Any]]:
        engine = self.engine
        body: dict[str, Any] = {
            "status": self.status,
            "ready": self.status == "ready",
            "model": self.options.model_name,
            "queue_depth": engine.queue.qsize() if engine is not None else 0,
            "in_flight": engine.in_flight if engine is not None else 0,
            "max_queue": self.options.max_queue,
            "max_batch_size": self.options.batch_size,
            "stats": vars(engine.stats) if engine is not None else vars(EngineStats()),
        }
        if self.load_error:
            body["error"] = self.load_error
        return (200 if body["ready"] else 503), body

    def _build_app(self) -> FastAPI:
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(_app: FastAPI):
            await self._start()
            yield
            await self._stop()

        app = FastAPI(title="phi3v serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
        app.add_middleware(BodyLimitMiddleware, max_bytes=self.options.max_body_bytes)

        @app.exception_handler(ApiError)
        async def on_api_error(_request: Request, err: ApiError) -> JSONResponse:
            return err.response()

        @app.exception_handler(StarletteHTTPException)
        async def on_http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
            kinds = {404: "not_found", 405: "method_not_allowed", 400: "invalid_request_error"}
            return error_response(
                err.status_code, kinds.get(err.status_code, "http_error"), str(err.detail), headers=err.headers
            )

        @app.exception_handler(ClientDisconnect)
        async def on_disconnect(request: Request, _err: ClientDisconnect) -> JSONResponse:
            # the client went away mid-body: nothing failed here, and nobody is left to read the answer
            logger.info("client disconnected before sending its whole body: %s %s", request.method, request.url.path)
            return error_response(400, "client_disconnected", "the connection closed before the whole body arrived")

        @app.exception_handler(Exception)
        async def on_error(_request: Request, err: Exception) -> JSONResponse:
            logger.exception("unexpected error")
            return error_response(500, "internal_error", f"{type(err).__name__}: {err}")

        @app.get("/", include_in_schema=False)
        async def page() -> HTMLResponse:
            from phi3v.page import page_headers, page_html

            return HTMLResponse(page_html(), headers=page_headers())

        @app.get("/healthz")
        async def healthz() -> JSONResponse:
            status, body = self.health()
            return JSONResponse(body, status)

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            entry = {"id": self.options.model_name, "object": "model", "created": self.created, "owned_by": "phi3v"}
            return JSONResponse({"object": "list", "data": [entry]})

        @app.post("/v1/predict")
        async def predict(request: Request) -> JSONResponse:
            return await self._deadline(self._predict(request))

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> JSONResponse:
            return await self._deadline(self._chat(request))

        return app


# ------------------------------------------------------------------------------------------------------- running it
def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket. ``IPPROTO_TCP`` must be explicit: asyncio sets ``TCP_NODELAY`` on accepted connections
    only for sockets whose ``proto`` says TCP, and without it a keep-alive client waits ~40 ms per response (Nagle's
    algorithm against delayed ACKs)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def serve(options: ServeOptions) -> None:
    """Run the service in the foreground until interrupted (Ctrl-C / SIGTERM: graceful shutdown).

    Raises:
        ServeError: The model failed to load (the server stops at once).
    """
    import uvicorn

    server: uvicorn.Server | None = None

    def stop(_reason: str) -> None:
        if server is not None:
            server.should_exit = True

    service = Phi3VService(options, on_load_failure=stop)
    config = uvicorn.Config(
        service.app,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        access_log=options.access_log,
        timeout_graceful_shutdown=max(5, int(options.request_timeout)),
    )
    server = uvicorn.Server(config)
    server.run()
    if service.load_error:
        raise ServeError(service.load_error)


class ServerThread:
    """The service on a daemon thread (in-process uvicorn): for tests, benchmarks and notebooks.

    Example::

        with ServerThread(ServeOptions(model="runs/tiny-model", port=0)) as server:
            httpx.post(f"{server.url}/v1/predict", files={"image": open("shirt.jpg", "rb")})
    """

    def __init__(self, options: ServeOptions) -> None:
        import uvicorn

        self.options = options
        self.service = Phi3VService(options, on_load_failure=lambda _reason: None)
        self._socket = _bind(options.host, options.port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.service.app, log_level=options.log_level, access_log=options.access_log, lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True, name="phi3v-serve"
        )

    @property
    def url(self) -> str:
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 600.0, *, stop_on_failure: bool = True) -> ServerThread:
        """Start serving and wait until the model is ready (or failed to load).

        Raises:
            ServeError: The model did not load (unless ``stop_on_failure`` is False: then the server goes on
                answering 503 with the reason), or was not ready within ``timeout`` seconds.
        """
        self._thread.start()
        if not self.service.ready.wait(timeout):
            self.stop()
            raise ServeError(f"the model was not ready within {timeout:g} s")
        if self.service.load_error and stop_on_failure:
            self.stop()
            raise ServeError(self.service.load_error)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "ApiError",
    "BatchEngine",
    "Phi3VService",
    "RemoteImageFetcher",
    "ServeError",
    "ServeOptions",
    "ServerThread",
    "chat_conversation",
    "decode_image",
    "is_public_address",
    "serve",
]
