"""A small reader for an offline W&B run's ``.wandb`` file (wandb 0.31 ships no public reader).

The file is a 7-byte header (``":W&B"``, magic ``0xBEE1`` little-endian, version ``0``) followed by LevelDB-log
framing: 32 KiB blocks (the header counts in the first block), each record fragment a 7-byte header
``crc32(4) length(2) type(1)`` (little-endian; the checksum is zlib's CRC-32 over the type byte and the payload)
of type FULL / FIRST / MIDDLE / LAST; a block's tail shorter than a header is zero padding. The reassembled payloads
are protobuf `wandb.proto.wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

FILE_HEADER = struct.Struct("<4sHB")
FILE_IDENT, FILE_MAGIC, FILE_VERSION = b":W&B", 0xBEE1, 0
RECORD_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a well-formed ``.wandb`` log (bad header, checksum or fragment order)."""


def wandb_file(run_dir: str | Path) -> Path:
    """The one ``run-*.wandb`` file of an offline run folder (``.../wandb/offline-run-*``)."""
    found = sorted(Path(run_dir).glob("*.wandb"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .wandb file in {run_dir}, found {[p.name for p in found]}")
    return found[0]


def iter_payloads(path: str | Path) -> list[bytes]:
    """The reassembled record payloads of a ``.wandb`` file, in order; checksums and framing verified."""
    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size:
        raise WandbFileError(f"{path}: shorter than the file header")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (FILE_IDENT, FILE_MAGIC, FILE_VERSION):
        raise WandbFileError(f"{path}: bad header {ident!r} {magic:#x} {version}")
    payloads: list[bytes] = []
    pending: bytearray | None = None
    pos = FILE_HEADER.size
    while pos < len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:  # block trailer: zero padding
            pos += left_in_block
            continue
        if pos + RECORD_HEADER.size > len(data):
            raise WandbFileError(f"{path}: truncated record header at {pos}")
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:  # zero-filled rest of a block (or of a preallocated file)
            pos += left_in_block
            continue
        start = pos + RECORD_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) != length or length > left_in_block - RECORD_HEADER.size:
            raise WandbFileError(f"{path}: record at {pos} overruns its block or the file")
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            raise WandbFileError(f"{path}: checksum mismatch for the record at {pos}")
        pos = start + length
        if kind == FULL and pending is None:
            payloads.append(bytes(chunk))
        elif kind == FIRST and pending is None:
            pending = bytearray(chunk)
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += chunk
            if kind == LAST:
                payloads.append(bytes(pending))
                pending = None
        else:
            raise WandbFileError(f"{path}: fragment type {kind} out of order at {pos - length - RECORD_HEADER.size}")
    if pending is not None:
        raise WandbFileError(f"{path}: the file ends inside a fragmented record")
    return payloads


def read_records(run_dir: str | Path) -> list[Any]:
    """Every protobuf ``Record`` of an offline run folder's ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for payload in iter_payloads(wandb_file(run_dir)):
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _item_key(item: Any) -> str:
    """A history / config item's key: ``key``, or its ``nested_key`` parts joined with ``/``."""
    return item.key if item.key else "/".join(item.nested_key)


def _item_value(item: Any) -> Any:
    """A history item's decoded value (the typed ``value`` oneof when set, else ``value_json``)."""
    which = item.WhichOneof("value") if "value" in {o.name for o in item.DESCRIPTOR.oneofs} else None
    if which == "none":
        return None
    if which == "json":
        return json.loads(item.json)
    if which is not None:
        return getattr(item, which)
    return json.loads(item.value_json) if item.value_json else None


def _put(target: dict[str, Any], item: Any, value: Any) -> None:
    """Store ``value`` under the item's key; a ``nested_key`` (a logged dict, e.g. a table's reference) becomes
    nested dicts (``["eval/generations", "_type"]`` -> ``target["eval/generations"]["_type"]``)."""
    if item.key or not item.nested_key:
        target[item.key] = value
        return
    *parents, last = item.nested_key
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's history rows (one per committed ``wandb.log`` step): key -> decoded value, plus ``_step``,
    ``_runtime`` and ``_timestamp``. A logged media object (e.g. a ``wandb.Table``) is the dict of its reference
    (``{"_type": "table-file", "path": ..., "nrows": ..., ...}``)."""
    rows = []
    for record in read_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item, _item_value(item))
            rows.append(row)
    return rows


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config: the run record's config, then every later config update, merged (top-level keys)."""
    config: dict[str, Any] = {}
    for record in read_records(run_dir):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else ()
        for item in updates:
            _put(config, item, json.loads(item.value_json))
        if kind == "config":
            for item in record.config.remove:
                config.pop(_item_key(item), None)
    return config


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's summary updates merged in order (offline runs write no ``wandb-summary.json``)."""
    summary: dict[str, Any] = {}
    for record in read_records(run_dir):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                _put(summary, item, json.loads(item.value_json))
    return summary


def read_artifacts(run_dir: str | Path) -> list[dict[str, Any]]:
    """The artifacts the run logged: ``type``, ``name`` and ``files`` (artifact path -> local staged file; offline,
    the staged copies stay under ``WANDB_DATA_DIR``)."""
    artifacts = []
    for record in read_records(run_dir):
        if record.WhichOneof("record_type") == "artifact":
            art = record.artifact
            files = {entry.path: Path(entry.local_path) for entry in art.manifest.contents}
            artifacts.append({"type": art.type, "name": art.name, "files": files})
    return artifacts


def read_tables(run_dir: str | Path, key: str) -> list[dict[str, Any]]:
    """Every ``wandb.Table`` logged under ``key``, oldest first, from its run-table artifact: ``columns``,
    ``data`` (rows; an image cell is its ``image-file`` reference dict) and ``files`` (artifact path -> local file,
    e.g. the images' PNGs)."""
    tables = []
    for artifact in read_artifacts(run_dir):
        table_file = artifact["files"].get(f"{key}.table.json")
        if artifact["type"] != "run_table" or table_file is None:
            continue
        table = json.loads(table_file.read_text(encoding="utf-8"))
        tables.append({"columns": table["columns"], "data": table["data"], "files": artifact["files"]})
    return tables


# ------------------------------------------------------------------------------------------------ isolation
# the variables `phi3v.tracking` may set, plus what would let wandb find a key or a mode elsewhere
TRACKING_ENV = (
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_DATA_DIR",
    "WANDB_CACHE_DIR",
    "WANDB_CONFIG_DIR",
    "WANDB_PROJECT",
    "WANDB_LOG_MODEL",
    "WANDB_DISABLED",
    "WANDB_RUN_ID",
    "WANDB_RESUME",
    "WANDB_ENTITY",
    "WANDB_BASE_URL",
    "NETRC",
    "TENSORBOARD_LOGGING_DIR",
)


def isolate_tracking_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    """Unset every tracking variable (and any other ``WANDB_*``) and point HOME at an empty folder.

    Each variable is set before it is deleted so that the monkeypatch records it: on undo, whatever `train`
    later put into `os.environ` (phi3v uses ``setdefault``) is removed again, even for variables absent at first.
    """
    for name in {*TRACKING_ENV, *(key for key in os.environ if key.startswith("WANDB_"))}:
        mp.setenv(name, "")
        mp.delenv(name)
    home.mkdir(parents=True, exist_ok=True)
    mp.setenv("HOME", str(home))
