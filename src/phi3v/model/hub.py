"""Finding a model's files: a local folder, or a hub id resolved through the Hugging Face cache.

Used by `Phi3VForCausalLM.from_pretrained` and `Phi3VProcessor.from_pretrained`. Without network access a hub id must
fail at once with one clear message: with `HF_HUB_OFFLINE=1` the hub client does so by itself; when the hub's host
does not resolve, the client would retry for about a minute, so the name is looked up first and, if that fails,
only the local cache is consulted.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

# What a download fetches: configs, tokenizer and processor files, safetensors weights (never *.bin / *.pt).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def is_hub_id(text: str) -> bool:
    """True for an 'org/name' hub id; false for anything that reads as a local path."""
    return not text.startswith((".", "/", "~")) and text.count("/") == 1 and "\\" not in text


def unresolvable_hub_host() -> str | None:
    """The hub host's name if DNS cannot resolve it (no network), else None. Behind a proxy the local DNS does not
    decide whether the hub is reachable, so no verdict is given."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    proxied = any(
        os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")
    )
    if not host or proxied:
        return None
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        return host
    return None


def resolve_model_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local folder as is, or a hub id downloaded into the HF cache.

    `allow_patterns` picks the files of a hub download (default `HUB_ALLOW_PATTERNS`: configs, tokenizer and
    processor files, safetensors weights; a processor passes its own list without the weights).

    Raises:
        FileNotFoundError: a path that does not exist.
        NotADirectoryError: a path to a file.
        OSError: the hub could not be reached (offline, HF_HUB_OFFLINE=1, unknown repo) and the cache lacks the
            files; raised at once, never after a hang.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise NotADirectoryError(f"{text}: expected a model folder, found a file")
    if not is_hub_id(text):
        raise FileNotFoundError(f"model folder {text} does not exist (and it is not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download

    reason = None
    if not local_files_only and (host := unresolvable_hub_host()):
        reason = f"the hub host {host} does not resolve (no network?)"
        local_files_only = True  # the cache may still hold it
    try:
        folder = snapshot_download(
            repo_id=text,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=allow_patterns or HUB_ALLOW_PATTERNS,
        )
    except Exception as err:  # every hub/network failure becomes one clear message
        detail = reason or f"{type(err).__name__}: {err}"
        raise OSError(
            f"could not get {text!r} from the Hugging Face hub ({detail}). Without network access, download it on "
            f"another machine (`hf download {text}`) and pass the folder, or use a warm HF cache."
        ) from err
    return Path(folder)
