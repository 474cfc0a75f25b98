"""Catalog image fetcher: concurrent, retried, size-capped, verified, stored under content-hash names.

``fetch_all`` takes image sources (http(s) URLs or local paths, as a catalog gives them) and reports exactly one
:class:`FetchResult` per *distinct* source through ``on_result``, as soon as that source is finished. Every failure
is a result with a short stable ``reason`` code (:data:`REASONS`); nothing per-source is raised or only logged.

Pipeline for one source::

    placeholder / invalid?  -> result at once, no request
    URL:  GET (shared httpx.AsyncClient, <= concurrency in flight, redirects <= max_redirects, whole attempt
          <= timeout) -> status -> Content-Length <= max_bytes -> streamed body <= max_bytes;
          retried with exponential backoff + jitter on timeouts, connection errors, 5xx and 429 (Retry-After
          honoured up to max_backoff, and the host is paused for that long)
    path: stat (regular file, <= max_bytes) -> read
    then, in a thread pool (``workers``): Image.open -> width*height <= max_pixels (before decoding) -> load()
          (full decode) -> EXIF orientation, RGB (``to_rgb``), first frame, optional resize -> JPEG
          -> sha256 -> ``ImageStore`` (``<sha[:2]>/<sha>.jpg``, tmp + fsync + os.replace)

A baseline RGB JPEG that needs no rotation and no resize is stored byte for byte (no generation loss); anything
else is re-encoded as JPEG quality 95, 4:4:4. Reference behaviour this replaces (``docs`` dataset facts §3): a
sequential ``requests.get`` per row with no timeout and no retry, failures dropped silently, files named
``{product_code}.jpg``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import importlib.util
import io
import math
import os
import random
import re
import stat
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import httpx
from PIL import Image

from phi3v import __version__
from phi3v.model.image_io import to_rgb

__all__ = [
    "PLACEHOLDERS",
    "REASONS",
    "DownloadConfig",
    "FetchResult",
    "ImageStore",
    "fetch_all",
    "fetch_sources",
    "is_placeholder",
    "parse_retry_after",
    "source_key",
    "source_kind",
]

PLACEHOLDERS = frozenset({"", "n.a.", "na", "n/a", "none", "null", "nan", "-"})
"""Values meaning "no image" (compared stripped and case-insensitively). DBQ catalogs write ``N.A.``."""

REASONS: dict[str, str] = {
    "ok": "stored",
    "placeholder": "no image given (None, NaN, '', 'N.A.', ...); no request made",
    "invalid_source": "neither an http(s) URL nor a plausible local path (ftp:, javascript:, //host/..., garbage)",
    "http_<status>": "final HTTP status: any 4xx but 429 at once; 5xx and 429 once the retries are spent",
    "timeout": "an attempt took longer than config.timeout (connect + response + body), on every attempt",
    "connection_error": "connection refused / reset / closed early, DNS or TLS failure, on every attempt",
    "too_many_redirects": "more than config.max_redirects redirects (or a redirect loop)",
    "invalid_redirect": "a redirect to a non-http(s) URL",
    "decoding_error": "the body's Content-Encoding (gzip, br, ...) could not be decoded",
    "encoded_body": "a Content-Encoding other than identity despite Accept-Encoding: identity (a compressed body could "
    "expand far past max_bytes inside one decoded chunk, so it is not read)",
    "too_large": "Content-Length, body or file above config.max_bytes (the body is not read past the cap)",
    "empty": "zero bytes",
    "not_an_image": "not a format Pillow recognises (HTML error pages, JSON, text ...)",
    "truncated": "image data ends before the image does",
    "corrupt_image": "recognised format whose data fails to decode",
    "unsupported_image": "decodes, but the mode cannot be converted to RGB",
    "decompression_bomb": "width * height above config.max_pixels (checked before decoding)",
    "file_not_found": "local path does not exist",
    "read_error": "local path is not a regular file or cannot be read",
}
"""Every ``FetchResult.reason`` this module produces (``http_<status>`` stands for ``http_404``, ``http_503`` ...)."""

RETRYABLE_STATUSES = frozenset({429})
"""Besides every 5xx: statuses that are retried."""

DEFAULT_USER_AGENT = f"phi3v/{__version__} (+https://github.com/; catalog image fetcher)"
ACCEPT = "image/jpeg,image/png;q=0.9,image/*;q=0.8,*/*;q=0.5"
"""Prefer JPEG: image CDNs that negotiate formats then send a file the fast path can store as is."""

JPEG_QUALITY = 95
_ORIENTATION_TAG = 0x0112
_RELPATH_RE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}\.jpg$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_MAX_SOURCE_CHARS = 8192
_SMALL_BODY = 64 * 1024  # error bodies up to this size are read so that the connection can be reused


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------


def source_key(value: object) -> str:
    """The string a source is reported (and de-duplicated) under: ``FetchResult.source``.

    Strings are kept exactly as given (not stripped); ``os.PathLike`` becomes its path string; None becomes ``""``;
    anything else ``str(value)`` (NaN -> ``"nan"``). Map catalog rows to results with
    ``results[source_key(row_value)]``.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fsdecode(os.fspath(value))
    if value is None:
        return ""
    return str(value)


def is_placeholder(value: object) -> bool:
    """True for values that mean "no image": None, NaN, non-strings, and :data:`PLACEHOLDERS` (any case, stripped).

    ``os.PathLike`` values are sources, not placeholders.
    """
    if isinstance(value, str):
        return value.strip().lower() in PLACEHOLDERS
    return not isinstance(value, os.PathLike)  # None, float NaN, pandas NA, numbers, bytes ... are placeholders


def source_kind(value: str) -> Literal["url", "path", "invalid"]:
    """Classify a (non-placeholder) source string.

    * ``"url"``: ``http://`` or ``https://`` (any case) with a host, parseable by httpx;
    * ``"path"``: no URL scheme (a one-letter "scheme" is a Windows drive, ``C:\\``), no control characters;
    * ``"invalid"``: everything else: other schemes (``ftp:``, ``file:``, ``data:``, ``javascript:``),
      scheme-relative ``//host/x.jpg``, control characters, placeholders, absurdly long strings.

    Leading/trailing whitespace is ignored (and stripped before fetching).
    """
    if not isinstance(value, str) or is_placeholder(value):
        return "invalid"
    text = value.strip()
    if len(text) > _MAX_SOURCE_CHARS or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        return "invalid"
    if text.lower().startswith(("http://", "https://")):
        try:
            url = httpx.URL(text)
        except (httpx.InvalidURL, ValueError, TypeError):
            return "invalid"
        return "url" if url.scheme in ("http", "https") and url.host else "invalid"
    if text.startswith("//"):
        return "invalid"  # scheme-relative URL: not fetched without knowing the scheme
    match = _SCHEME_RE.match(text)
    if match is not None and len(match.group(1)) > 1:
        return "invalid"
    return "path"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date); None if absent/unparseable."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    reference = datetime.now(timezone.utc).timestamp() if now is None else now
    return max(0.0, when.timestamp() - reference)


# --------------------------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DownloadConfig:
    """Download settings.

    Args:
        concurrency (int): simultaneous HTTP requests (also the connection-pool size).
        timeout (float): seconds per attempt, everything included (connect, response, whole body).
        retries (int): extra attempts for timeouts, connection errors, 5xx and 429.
        backoff (float): base of the exponential backoff: attempt n waits ``backoff * 2**(n-1)`` seconds scaled by a
            random factor in [0.5, 1] ("equal jitter"), capped at ``max_backoff``.
        max_backoff (float): cap of one wait, also of an honoured ``Retry-After``.
        max_bytes (int): per image: a larger Content-Length fails before reading, a larger body fails as soon as
            the cap is passed. Bodies are asked for uncompressed (``Accept-Encoding: identity``) and one sent with
            a Content-Encoding anyway fails (``encoded_body``): a gzip bomb never reaches a decoder.
        max_redirects (int): redirects followed per request.
        max_pixels (int): ``width * height`` above this fails before decoding (decompression-bomb guard).
        max_side (int | None): resize so that the long side is at most this (LANCZOS); None keeps the size.
        user_agent (str): User-Agent header.
        workers (int): threads for decode / verify / encode / write (Pillow and hashlib release the GIL).
        seed (int | None): seed of the backoff jitter (None: from the OS).
    """

    concurrency: int = 32
    timeout: float = 20.0
    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    max_pixels: int = 50_000_000
    max_side: int | None = None
    user_agent: str = DEFAULT_USER_AGENT
    workers: int = 2
    seed: int | None = 0

    def __post_init__(self) -> None:
        checks = {
            "concurrency": self.concurrency >= 1,
            "timeout": self.timeout > 0,
            "retries": self.retries >= 0,
            "backoff": self.backoff >= 0,
            "max_backoff": self.max_backoff >= 0,
            "max_bytes": self.max_bytes >= 1,
            "max_redirects": self.max_redirects >= 0,
            "max_pixels": self.max_pixels >= 1,
            "max_side": self.max_side is None or self.max_side >= 1,
            "workers": self.workers >= 1,
        }
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid DownloadConfig: {', '.join(bad)}")


@dataclass(frozen=True)
class FetchResult:
    """The outcome for one distinct source (JSON-friendly: ``dataclasses.asdict`` / ``FetchResult(**d)``).

    Attributes:
        source: the source as given (see :func:`source_key`).
        ok: True when an image was stored.
        reason: ``"ok"`` or a code from :data:`REASONS`.
        detail: human-readable explanation (exception text, status after N attempts, how the image was stored).
        sha256: hex digest of the stored file's bytes.
        path: stored file, relative to the store root: ``<sha[:2]>/<sha>.jpg``.
        width, height: of the stored image.
        nbytes: bytes downloaded (body after Content-Encoding decoding) or read from disk.
        http_status: final HTTP status (None for local paths and when no response came).
        attempts: HTTP attempts made (1 for local paths, 0 when nothing was attempted).
    """

    source: str
    ok: bool
    reason: str
    detail: str = ""
    sha256: str | None = None
    path: str | None = None
    width: int | None = None
    height: int | None = None
    nbytes: int | None = None
    http_status: int | None = None
    attempts: int = 0


class _SourceError(Exception):
    """Per-source failure inside the pipeline; becomes a FetchResult."""

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        http_status: int | None = None,
        nbytes: int | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after
        self.http_status = http_status
        self.nbytes = nbytes


# --------------------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------------------


class ImageStore:
    """Content-addressed JPEG store: ``root/<sha[:2]>/<sha>.jpg``, sha256 of the file bytes.

    Names come only from the hash, never from a data value. Writes are atomic: a hidden ``.tmp`` file in the same
    folder, ``fsync``, ``os.replace``, so a reader (or a run killed with ``kill -9``) never sees a partial file. A
    file that already exists is not rewritten. Safe to use from several threads.

    Folder entries (the renames) are made durable against power loss by :meth:`sync`, which ``fetch_all`` calls
    when it ends, not after every file (two fsyncs per image cost throughput); after an OS crash, check journaled
    results with :meth:`exists`.

    Args:
        root (Path): store folder (created).
        fsync (bool): fsync each file before its rename, and folders in :meth:`sync` (default). False is faster and
            still atomic, but not durable.
    """

    def __init__(self, root: Path | str, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._folders: set[str] = set()  # sub-folders known to exist
        self._dirty: set[Path] = set()  # folders with renames not yet fsynced

    @staticmethod
    def relpath_for(sha256: str) -> str:
        """Relative path of the file with this digest."""
        return f"{sha256[:2]}/{sha256}.jpg"

    def path_of(self, relpath: str) -> Path:
        """Absolute path of a stored file; refuses anything that is not a ``<2 hex>/<64 hex>.jpg`` name."""
        if not isinstance(relpath, str) or _RELPATH_RE.fullmatch(relpath) is None:
            raise ValueError(f"not a store path: {relpath!r}")
        return self.root / relpath

    def exists(self, relpath: str) -> bool:
        """Whether the stored file is present (e.g. to check journaled results on resume)."""
        return self.path_of(relpath).is_file()

    def put_bytes(self, data: bytes) -> tuple[str, str]:
        """Store encoded JPEG bytes as they are; return ``(sha256, relpath)``."""
        sha = hashlib.sha256(data).hexdigest()
        relpath = self.relpath_for(sha)
        final = self.root / relpath
        if final.exists():
            return sha, relpath
        folder = final.parent
        if sha[:2] not in self._folders:
            folder.mkdir(exist_ok=True)
            with self._lock:
                self._folders.add(sha[:2])
                self._dirty.add(self.root)
        tmp = folder / f".{sha[:16]}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            self._dirty.add(folder)
        return sha, relpath

    def sync(self) -> None:
        """fsync the folders that received files since the last call (no-op with ``fsync=False``)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        if self.fsync:
            for folder in sorted(dirty, key=lambda p: len(p.parts), reverse=True):  # sub-folders before the root
                _fsync_dir(folder)

    def put_image(self, image: Image.Image, *, original: bytes | None = None) -> tuple[str, str, int, int]:
        """Store an image; return ``(sha256, relpath, width, height)``.

        Args:
            image (Image.Image): the image as it should be stored (mode RGB unless ``original`` is given).
            original (bytes | None): encoded bytes to store verbatim instead of encoding ``image``; the caller
                vouches they are a baseline RGB JPEG whose decoded pixels are ``image``.
        """
        data = original if original is not None else encode_jpeg(image)
        sha, relpath = self.put_bytes(data)
        return sha, relpath, image.width, image.height

    def remove_partial_files(self) -> int:
        """Delete ``.tmp`` files left by a killed run (only when no other process writes here); return the count."""
        removed = 0
        for tmp in self.root.glob("[0-9a-f][0-9a-f]/.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """Encode an RGB image as a baseline JPEG, 4:4:4, no metadata."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------
# Verification (runs in the worker threads)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    sha256: str
    path: str
    width: int
    height: int
    detail: str


def _sniff(data: bytes, content_type: str | None) -> str:
    head = data[:24]
    kind = f"Content-Type {content_type!r}, " if content_type else ""
    return f"{kind}{len(data)} bytes starting {head!r}"


def _decode_failure(exc: BaseException) -> _SourceError:
    """Map an exception from Pillow's decoding to a reason."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return _SourceError("decompression_bomb", text)
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return _SourceError("truncated", text)
    return _SourceError("corrupt_image", text)


def _verify_and_store(
    data: bytes, store: ImageStore, config: DownloadConfig, content_type: str | None = None
) -> _Stored:
    """Decode ``data`` fully, normalise it and store it. Raises ``_SourceError`` for anything wrong with the data."""
    if not data:
        raise _SourceError("empty", "0 bytes" + (f" (Content-Type {content_type!r})" if content_type else ""))
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as exc:
        raise _SourceError("not_an_image", f"not a recognised image format ({_sniff(data, content_type)})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _SourceError("decompression_bomb", f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # a plugin choked on the header (SyntaxError, struct.error, ValueError ...)
        raise _decode_failure(exc) from exc
    with image:
        width, height = image.size
        fmt = image.format or "?"
        if width * height > config.max_pixels:
            raise _SourceError(
                "decompression_bomb",
                f"{fmt} header says {width}x{height} = {width * height} pixels > max_pixels {config.max_pixels}",
            )
        if width < 1 or height < 1:
            raise _SourceError("corrupt_image", f"{fmt} header says {width}x{height}")
        try:
            image.decodermaxblock = max(image.decodermaxblock, len(data))  # one decoder call, one GIL release
            image.load()  # full decode: truncated or corrupt data fails here
            orientation = image.getexif().get(_ORIENTATION_TAG, 1)
        except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError ...
            raise _decode_failure(exc) from exc
        rotate = orientation in (2, 3, 4, 5, 6, 7, 8)
        too_big = config.max_side is not None and max(width, height) > config.max_side
        progressive = bool(image.info.get("progressive") or image.info.get("progression"))
        if fmt == "JPEG" and image.mode == "RGB" and not progressive and not rotate and not too_big:
            sha, relpath = store.put_bytes(data)
            return _Stored(sha, relpath, width, height, "stored the original JPEG bytes")
        source_desc = f"{fmt} {image.mode} {width}x{height}" + (" progressive" if progressive else "")
        try:
            rgb = to_rgb(image)
        except Exception as exc:  # to_rgb: ValueError for modes Pillow cannot convert; decoders may fail here too
            raise _SourceError("unsupported_image", f"{source_desc}: {type(exc).__name__}: {exc}") from exc
        steps = []
        if rotate:
            steps.append(f"EXIF orientation {orientation} applied")
        if too_big:
            rgb, before = _resize_long_side(rgb, config.max_side), rgb.size
            steps.append(f"resized {before[0]}x{before[1]} -> {rgb.width}x{rgb.height}")
        sha, relpath, out_w, out_h = store.put_image(rgb)
        how = f"re-encoded {source_desc} as RGB JPEG q{JPEG_QUALITY}" + (f" ({', '.join(steps)})" if steps else "")
        return _Stored(sha, relpath, out_w, out_h, how)


def _resize_long_side(image: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None:
        return image
    width, height = image.size
    scale = max_side / max(width, height)
    if scale >= 1:
        return image
    size = (max(1, min(max_side, round(width * scale))), max(1, min(max_side, round(height * scale))))
    return image.resize(size, Image.Resampling.LANCZOS)


def _read_local(path: Path, max_bytes: int) -> bytes:
    """Read a local image file (regular files only, at most ``max_bytes``). Raises ``_SourceError``."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise _SourceError("file_not_found", f"{path}: no such file") from exc
    except OSError as exc:
        raise _SourceError("read_error", f"{path}: {type(exc).__name__}: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise _SourceError("read_error", f"{path}: not a regular file")
    if info.st_size > max_bytes:
        raise _SourceError("too_large", f"{path}: {info.st_size} bytes > max_bytes {max_bytes}", nbytes=0)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise _SourceError("file_not_found", f"{path}: no such file") from exc
    except OSError as exc:
        raise _SourceError("read_error", f"{path}: {type(exc).__name__}: {exc}") from exc
    if len(data) > max_bytes:
        raise _SourceError("too_large", f"{path}: more than max_bytes {max_bytes} bytes", nbytes=len(data))
    return data


def _process_local(path: Path, store: ImageStore, config: DownloadConfig) -> tuple[int, _Stored]:
    data = _read_local(path, config.max_bytes)
    try:
        return len(data), _verify_and_store(data, store, config)
    except _SourceError as failure:
        failure.nbytes = len(data)
        raise


# --------------------------------------------------------------------------------------------------------------
# The fetcher
# --------------------------------------------------------------------------------------------------------------


SHARD_SIZE = 4
"""Connections per pool of the sharded transport (see ``_ShardedTransport``)."""


class _ReleasingStream(httpx.AsyncByteStream):
    """Response body stream that tells its shard when the response is closed."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> Any:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class _ShardedTransport(httpx.AsyncBaseTransport):
    """Several small httpx connection pools behind one transport; each request goes to the least busy one.

    httpcore's pool re-examines every connection it holds each time a request starts or finishes (with a
    ``getpeername`` system call per idle connection, and an idle count that is quadratic in the pool size). With one
    pool of 32 connections that bookkeeping cost more CPU than downloading and decoding the images (measured in
    ``benchmarks/RESULTS.md``); pools of ``SHARD_SIZE`` connections keep it negligible. Total connections stay
    ``concurrency``; a request keeps its shard's slot until its response is closed.
    """

    def __init__(self, concurrency: int, keepalive_expiry: float = 30.0, shard_size: int = SHARD_SIZE) -> None:
        ssl_context = httpx.create_ssl_context()  # one CA bundle load for all shards (~30 ms each otherwise)
        sizes = [shard_size] * (concurrency // shard_size)
        if concurrency % shard_size:
            sizes.append(concurrency % shard_size)
        self._shards = [
            httpx.AsyncHTTPTransport(
                verify=ssl_context,
                limits=httpx.Limits(
                    max_connections=size, max_keepalive_connections=size, keepalive_expiry=keepalive_expiry
                ),
            )
            for size in sizes
        ]
        self._spare = list(sizes)  # free slots per shard

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = max(range(len(self._shards)), key=self._spare.__getitem__)
        self._spare[index] -= 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._spare[index] += 1

        try:
            response = await self._shards[index].handle_async_request(request)
        except BaseException:
            release()
            raise
        response.stream = _ReleasingStream(response.stream, release)  # type: ignore[arg-type]
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


def _cache_missing_sniffio() -> None:
    """Make httpcore's per-request ``import sniffio`` fail fast when sniffio is not installed.

    httpcore (1.0.x) runs ``import sniffio`` each time it sets up a lock, several times per request; anyio 4.x no
    longer depends on sniffio, and a failed import is not cached, so each one searched ``sys.path`` again (about
    1.5 ms of CPU per request on the benchmark machine). Recording the absence in ``sys.modules`` gives the same
    ImportError, instantly. Nothing changes when sniffio is installed.
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def _env_proxies() -> bool:
    """Whether the environment configures an HTTP(S) proxy (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``)."""
    proxies = urllib.request.getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


def make_client(config: DownloadConfig) -> httpx.AsyncClient:
    """The shared client ``fetch_all`` builds when it is not given one.

    Direct connections go through ``_ShardedTransport``; when the environment sets a proxy, httpx's own transport
    (which honours ``HTTP(S)_PROXY`` / ``NO_PROXY``) is used with one pool instead.
    """
    limits = httpx.Limits(
        max_connections=config.concurrency, max_keepalive_connections=config.concurrency, keepalive_expiry=30.0
    )
    return httpx.AsyncClient(
        follow_redirects=True,
        max_redirects=config.max_redirects,
        limits=limits,
        transport=None if _env_proxies() else _ShardedTransport(config.concurrency),
        timeout=httpx.Timeout(config.timeout),
        headers={"User-Agent": config.user_agent, "Accept": ACCEPT, "Accept-Encoding": "identity"},
    )


class _Fetcher:
    """State of one ``fetch_all`` call (runs on the event loop; decoding goes to ``pool``)."""

    def __init__(
        self,
        store: ImageStore,
        config: DownloadConfig,
        on_result: Callable[[FetchResult], None],
        base_dir: Path | None,
        client: httpx.AsyncClient,
        pool: ThreadPoolExecutor,
    ) -> None:
        self.store = store
        self.config = config
        self.on_result = on_result
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.client = client
        self.pool = pool
        self.slots = asyncio.Semaphore(config.concurrency)
        self.bodies = asyncio.Semaphore(config.concurrency + 2 * config.workers)
        self.rng = random.Random(config.seed)
        self.host_pause: dict[str, float] = {}  # host -> loop time before which no new request starts

    # ---- one source ---------------------------------------------------------------------------------------------

    async def run_one(self, source: str, kind: str) -> None:
        if kind == "url":
            result = await self._fetch_url(source)
        else:
            result = await self._fetch_path(source)
        self.on_result(result)

    async def _fetch_path(self, source: str) -> FetchResult:
        path = Path(source.strip())
        if not path.is_absolute():
            path = (self.base_dir if self.base_dir is not None else Path.cwd()) / path
        loop = asyncio.get_running_loop()
        try:
            nbytes, stored = await loop.run_in_executor(self.pool, _process_local, path, self.store, self.config)
        except _SourceError as failure:
            return _failed(source, failure, attempts=1)
        return _succeeded(source, stored, nbytes=nbytes, http_status=None, attempts=1)

    async def _fetch_url(self, source: str) -> FetchResult:
        url = source.strip()
        host = httpx.URL(url).host
        config = self.config
        loop = asyncio.get_running_loop()
        attempts = 0
        while True:
            await self._wait_for_host(host)
            attempts += 1
            async with self.bodies:  # held from the request until the body is decoded (bounds memory)
                try:
                    async with self.slots:  # held while talking to the server (bounds concurrency)
                        status, body, content_type = await _with_timeout(self._attempt(url), config.timeout)
                except _SourceError as failure:
                    final = failure
                except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
                    final = _SourceError("timeout", _timeout_text(exc, config.timeout), retryable=True)
                else:
                    try:
                        stored = await loop.run_in_executor(
                            self.pool, _verify_and_store, body, self.store, self.config, content_type
                        )
                    except _SourceError as failure:
                        failure.http_status, failure.nbytes = status, len(body)
                        return _failed(source, failure, attempts=attempts)
                    return _succeeded(source, stored, nbytes=len(body), http_status=status, attempts=attempts)
            if not final.retryable or attempts > config.retries:
                if final.retryable and attempts > 1:
                    final.detail = f"{final.detail} (after {attempts} attempts)"
                return _failed(source, final, attempts=attempts)
            await asyncio.sleep(self._delay(attempts, final.retry_after, host))  # holds no slot meanwhile

    async def _attempt(self, url: str) -> tuple[int, bytes, str | None]:
        """One GET; returns ``(status, body, content_type)`` for a 2xx, raises ``_SourceError`` otherwise."""
        max_bytes = self.config.max_bytes
        try:
            async with self.client.stream("GET", url, follow_redirects=True) as response:
                status = response.status_code
                if status >= 300 or status < 200:
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                    await _drain_small(response)
                    retryable = status >= 500 or status in RETRYABLE_STATUSES
                    detail = f"HTTP {status} {response.reason_phrase}".rstrip()
                    if retry_after is not None:
                        detail += f", Retry-After {retry_after:g} s"
                    raise _SourceError(
                        f"http_{status}", detail, retryable=retryable, retry_after=retry_after, http_status=status
                    )
                content_type = response.headers.get("Content-Type")
                declared = _content_length(response)
                if declared is not None and declared > max_bytes:
                    raise _SourceError(
                        "too_large",
                        f"Content-Length {declared} > max_bytes {max_bytes} (body not read)",
                        http_status=status,
                        nbytes=0,
                    )
                encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise _SourceError(
                        "encoded_body",
                        f"Content-Encoding {encoding[:40]!r} (body not read)",
                        http_status=status,
                        nbytes=0,
                    )
                chunks: list[bytes] = []
                received = 0
                async for chunk in response.aiter_raw():
                    received += len(chunk)
                    if received > max_bytes:
                        raise _SourceError(
                            "too_large",
                            f"body passed max_bytes {max_bytes} (stopped after {received} bytes)",
                            http_status=status,
                            nbytes=received,
                        )
                    chunks.append(chunk)
                return status, b"".join(chunks), content_type
        except httpx.TooManyRedirects as exc:
            raise _SourceError("too_many_redirects", f"{exc} (max_redirects {self.config.max_redirects})") from exc
        except httpx.UnsupportedProtocol as exc:
            raise _SourceError("invalid_redirect", str(exc)) from exc
        except httpx.InvalidURL as exc:
            raise _SourceError("invalid_source", str(exc)) from exc
        except httpx.DecodingError as exc:
            raise _SourceError("decoding_error", f"{type(exc).__name__}: {exc}") from exc
        except httpx.TimeoutException:
            raise
        except httpx.TransportError as exc:
            raise _SourceError("connection_error", _describe(exc), retryable=True) from exc

    async def _wait_for_host(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self.host_pause.get(host, 0.0) - loop.time()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    def _delay(self, attempts: int, retry_after: float | None, host: str) -> float:
        """Wait before attempt ``attempts + 1``; a Retry-After also pauses new requests to the host."""
        config = self.config
        if retry_after is not None:
            delay = min(retry_after, config.max_backoff)
            loop = asyncio.get_running_loop()
            self.host_pause[host] = max(self.host_pause.get(host, 0.0), loop.time() + delay)
            return delay
        base = min(config.max_backoff, config.backoff * 2 ** (attempts - 1))
        return base * (0.5 + 0.5 * self.rng.random())


async def _with_timeout(coroutine: Any, seconds: float) -> Any:
    """Await with a deadline (``asyncio.timeout`` where available: no extra task per attempt)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await coroutine
    return await asyncio.wait_for(coroutine, seconds)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


async def _drain_small(response: httpx.Response) -> None:
    """Read a small error body so that the connection goes back to the pool; leave big ones unread."""
    length = _content_length(response)
    if length is None or length > _SMALL_BODY:
        return
    with contextlib.suppress(httpx.HTTPError):
        await response.aread()


def _timeout_text(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"{type(exc).__name__} (timeout {timeout:g} s)"
    return f"no complete response within {timeout:g} s"


def _describe(exc: BaseException) -> str:
    """``Type: message``, with the first underlying cause that has a message when this one has none."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause, depth = exc.__cause__ or exc.__context__, 0
    while not str(exc) and cause is not None and depth < 5:
        if str(cause):
            return f"{text} ({type(cause).__name__}: {cause})"
        cause, depth = cause.__cause__ or cause.__context__, depth + 1
    return text


def _failed(source: str, failure: _SourceError, *, attempts: int) -> FetchResult:
    return FetchResult(
        source=source,
        ok=False,
        reason=failure.reason,
        detail=failure.detail,
        nbytes=failure.nbytes,
        http_status=failure.http_status,
        attempts=attempts,
    )


def _succeeded(source: str, stored: _Stored, *, nbytes: int, http_status: int | None, attempts: int) -> FetchResult:
    return FetchResult(
        source=source,
        ok=True,
        reason="ok",
        detail=stored.detail,
        sha256=stored.sha256,
        path=stored.path,
        width=stored.width,
        height=stored.height,
        nbytes=nbytes,
        http_status=http_status,
        attempts=attempts,
    )


async def fetch_all(
    sources: Iterable[Any],
    store: ImageStore,
    config: DownloadConfig,
    on_result: Callable[[FetchResult], None],
    *,
    base_dir: Path | None = None,
    client: httpx.AsyncClient | None = None,
) -> None:
    """Fetch, verify and store every distinct source; call ``on_result`` once per distinct source.

    Args:
        sources (Iterable): URLs / paths as the catalog gives them (duplicates, placeholders and junk allowed);
            consumed lazily. Distinct means distinct :func:`source_key`.
        store (ImageStore): where images go.
        config (DownloadConfig): limits and retry policy.
        on_result (Callable[[FetchResult], None]): called on the event-loop thread (the thread that runs this
            coroutine), as each source finishes, never concurrently with itself. An exception from it stops the
            run and is raised here.
        base_dir (Path | None): folder that relative local paths are resolved against (default: the working
            directory). Local files are only read.
        client (httpx.AsyncClient | None): a client to use instead of one built from ``config`` (its limits,
            headers and max_redirects then apply; it is not closed here).

    Raises:
        Only for errors that are not about one source: an exception from ``on_result``, a failing store (disk
        full, permissions), cancellation, programming errors.
    """
    _cache_missing_sniffio()
    own_client = client is None
    http = make_client(config) if client is None else client
    pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="phi3v-fetch")
    fetcher = _Fetcher(store, config, on_result, base_dir, http, pool)
    # Enough tasks to keep every request slot busy while others wait for the decoder or sleep in a backoff. Bodies
    # held in memory are bounded by ``_Fetcher.bodies``: (concurrency + 2 * workers) * max_bytes at worst.
    n_tasks = 2 * config.concurrency + 2 * config.workers
    queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize=n_tasks)

    async def worker() -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            await fetcher.run_one(*item)

    async def producer() -> None:
        seen: set[str] = set()
        for value in sources:
            key = source_key(value)
            if key in seen:
                continue
            seen.add(key)
            if is_placeholder(value):
                on_result(FetchResult(source=key, ok=False, reason="placeholder", detail=f"no image: {value!r}"))
                continue
            kind = source_kind(key)
            if kind == "invalid":
                on_result(
                    FetchResult(
                        source=key,
                        ok=False,
                        reason="invalid_source",
                        detail=f"not an http(s) URL or a local path: {key[:200]!r}",
                    )
                )
                continue
            await queue.put((key, kind))
        for _ in range(n_tasks):
            await queue.put(None)

    tasks = [asyncio.ensure_future(producer())] + [asyncio.ensure_future(worker()) for _ in range(n_tasks)]
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if own_client:
            await http.aclose()
        pool.shutdown(wait=True, cancel_futures=True)
        store.sync()


def fetch_sources(
    sources: Iterable[Any],
    store: ImageStore,
    config: DownloadConfig,
    on_result: Callable[[FetchResult], None],
    *,
    base_dir: Path | None = None,
) -> None:
    """Blocking wrapper around :func:`fetch_all` (``asyncio.run``); ``on_result`` runs on the calling thread."""
    asyncio.run(fetch_all(sources, store, config, on_result, base_dir=base_dir))
