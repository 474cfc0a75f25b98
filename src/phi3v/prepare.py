"""`phi3v prepare`: a product catalog -> a validated, training-ready image dataset, with a failure report.

    phi3v prepare DBQ/Burberry.Product.prices.United.States --out data/burberry
    phi3v prepare catalog.csv --out data/shop --image-column photo --price-column price --max-side 1024

Steps, top to bottom (`prepare`):

1. Read the catalog (hub id, CSV, Parquet, JSONL) and map its columns.
2. Parse each row's title, category and price; a row without a usable title or price fails here, with its reason.
3. Fetch every distinct image source once (`phi3v.data.download`): concurrent, retried, size-capped, verified,
   stored under content-hash names. Each result is journaled in DIR/.phi3v-state/journal.sqlite as it arrives,
   so a run killed at any moment (kill -9 included) resumes where it stopped; a re-run fetches only what is not
   journaled (and, by default, retries transient failures: timeouts, connection errors, 5xx, 429).
4. Give every row one outcome: kept, failed (reason), or duplicate (same image content, title, category and price
   as an earlier kept row). Rows in = kept + failed + duplicates, always.
5. Split kept rows into train / validation / test by normalised title, so near-duplicate products never cross.
6. Write the outputs (each replaced atomically): `dataset/` (HF `datasets`, `save_to_disk`, an `Image` column),
   `catalog.csv` (original columns + `local_image_path` + `split`), `failures.csv`, `duplicates.csv` and
   `manifest.json` (source, mapping, counts by outcome and reason, category vocabulary, price summary, splits,
   versions). Nothing is written outside DIR (but for the `datasets` cache of a hub catalog), and no file name is
   built from a data value. One run at a time works on a DIR (a lock file says so at once).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import itertools
import json
import logging
import os
import platform
import shutil
import sqlite3
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from phi3v import __version__
from phi3v.data.catalog import (
    MISSING_CATEGORY,
    SPLITS,
    ColumnMap,
    assign_splits,
    check_columns,
    clean_text,
    is_missing,
    load_catalog,
    normalize_title,
    parse_price,
)
from phi3v.data.download import DownloadConfig, FetchResult, ImageStore, fetch_sources, source_kind
from phi3v.progress import Progress

logger = logging.getLogger(__name__)

STATE_DIR = ".phi3v-state"
IMAGES_DIR = "images"
TRANSIENT_REASONS = ("timeout", "connection_error", "http_429", "http_5")  # prefixes re-fetched on a re-run


@dataclass
class PrepareOptions:
    """Everything `prepare` can be told (the CLI flags map one to one)."""

    columns: ColumnMap = field(default_factory=ColumnMap)
    hub_split: str = "train"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    download: DownloadConfig = field(default_factory=DownloadConfig)
    retry_failed: bool = True
    progress: bool = True


@dataclass
class PrepareReport:
    """What a run produced; `manifest.json` holds the same and more."""

    out_dir: Path
    rows_in: int
    kept: int
    failed: int
    duplicates: int
    failure_reasons: dict[str, int]
    splits: dict[str, int]
    fetched_now: int

    def invariant_holds(self) -> bool:
        return self.rows_in == self.kept + self.failed + self.duplicates


@dataclass
class Row:
    index: int
    id: str
    source: str
    title: str | None
    category: str
    price: float | None
    reason: str | None = None  # set when the row fails
    detail: str = ""


def prepare(source: str, out_dir: str | os.PathLike, options: PrepareOptions | None = None) -> PrepareReport:
    """Run the whole catalog build (see the module docstring). Re-running on the same `out_dir` resumes."""
    options = options or PrepareOptions()
    out = Path(out_dir)
    with _exclusive(out):
        return _prepare_locked(source, out, options)


def _prepare_locked(source: str, out: Path, options: PrepareOptions) -> PrepareReport:
    columns = options.columns

    # 1. read and map
    frame, base_dir = load_catalog(source, split=options.hub_split)
    check_columns(frame, columns, source)
    for name in ("local_image_path", "split"):
        if name in frame.columns:
            logger.warning("the catalog has a %r column; catalog.csv replaces it with phi3v's", name)

    # 2. parse fields (only the mapped columns are turned into Python objects)
    mapped = frame[list(dict.fromkeys(columns.as_dict().values()))]
    rows = [_parse_row(i, record, columns, hub=base_dir is None) for i, record in enumerate(mapped.to_dict("records"))]

    # 3. fetch distinct sources, journaled
    journal = Journal(out / STATE_DIR / "journal.sqlite", _download_fingerprint(options.download))
    try:
        done = journal.results()
        store = ImageStore(out / IMAGES_DIR)
        store.remove_partial_files()  # left by a killed run; one prepare at a time writes to DIR
        wanted = list(dict.fromkeys(row.source for row in rows if row.reason is None))
        todo = [
            s
            for s in wanted
            if s not in done
            or (options.retry_failed and _transient(done[s]))
            or (done[s].ok and not store.exists(done[s].path))  # journaled, but lost (e.g. an OS crash)
        ]
        logger.info(
            "%d distinct image sources: %d journaled, %d to fetch", len(wanted), len(wanted) - len(todo), len(todo)
        )
        with Progress(len(todo), "fetching images", unit="img", enabled=options.progress) as bar:
            failures = 0

            def record(result: FetchResult) -> None:
                nonlocal failures
                journal.record(result)
                if not result.ok:
                    failures += 1
                    bar.set_postfix(failed=failures)
                bar.update(1)

            if todo:
                fetch_sources(todo, store, options.download, record, base_dir=base_dir)
        results = journal.results()
    finally:
        journal.close()

    # 4. one outcome per row
    seen: dict[tuple, int] = {}
    kept: list[Row] = []
    duplicates: list[tuple[Row, int]] = []
    for row in rows:
        if row.reason is None:
            result = results[row.source]
            if not result.ok:
                row.reason, row.detail = result.reason, result.detail
        if row.reason is not None:
            continue
        key = (results[row.source].sha256, normalize_title(row.title), row.category, row.price)
        if key in seen:
            duplicates.append((row, seen[key]))
        else:
            seen[key] = row.index
            kept.append(row)
    failed = [row for row in rows if row.reason is not None]

    # 5. splits by normalised title
    split_of = dict(
        zip(
            (row.index for row in kept),
            assign_splits([normalize_title(row.title) for row in kept], options.fractions, options.seed),
            strict=True,
        )
    )

    # 6. outputs
    report = PrepareReport(
        out_dir=out,
        rows_in=len(rows),
        kept=len(kept),
        failed=len(failed),
        duplicates=len(duplicates),
        failure_reasons=dict(sorted(Counter(row.reason for row in failed).items())),
        splits={name: sum(1 for s in split_of.values() if s == name) for name in SPLITS},
        fetched_now=len(todo),
    )
    if not report.invariant_holds():  # cannot happen: every row took exactly one branch above
        raise AssertionError(f"rows in {report.rows_in} != kept + failed + duplicates")
    for name, size in report.splits.items():
        if size == 0:
            logger.warning(
                "split %r is empty (%d kept rows); training or evaluating on it will fail", name, report.kept
            )
    _write_dataset(out, kept, results, split_of)
    _write_catalog_csv(out, frame, kept, results, split_of)
    _write_csv(
        out / "failures.csv",
        ["row_index", "id", "url", "reason", "detail"],
        [[r.index, r.id, r.source, r.reason, r.detail] for r in failed],
    )
    _write_csv(
        out / "duplicates.csv",
        ["row_index", "id", "url", "duplicate_of_row"],
        [[r.index, r.id, r.source, first] for r, first in duplicates],
    )
    _write_manifest(out, source, options, report, kept, results, shared_images=_shared_images(kept, results))
    return report


# -- rows -------------------------------------------------------------------------------------------------------------
def _parse_row(index: int, record: dict[str, Any], columns: ColumnMap, *, hub: bool) -> Row:
    image = record[columns.image]
    raw_id = record[columns.id]
    if isinstance(raw_id, float) and raw_id.is_integer():
        raw_id = int(raw_id)  # an integer id column with nulls is float in pandas: 1001.0 -> "1001"
    row = Row(
        index=index,
        id=clean_text(raw_id) or "",
        source=image.strip() if isinstance(image, str) else "",
        title=clean_text(record[columns.title]),
        category=clean_text(record[columns.category]) or MISSING_CATEGORY,
        price=parse_price(record[columns.price]),
    )
    raw_price = record[columns.price]
    if not isinstance(image, str) and not is_missing(image):
        row.reason, row.detail = "invalid_source", f"the image column holds a {type(image).__name__}, not a URL or path"
    elif hub and source_kind(row.source) == "path":
        row.reason, row.detail = "invalid_source", "a hub catalog may only name http(s) URLs, not local files"
    elif row.title is None:
        row.reason = "missing_title"
    elif row.price is None:
        row.reason = "missing_price" if clean_text(raw_price) is None else "invalid_price"
        row.detail = "" if row.reason == "missing_price" else f"not a positive number: {raw_price!r}"
    return row


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold DIR's lock for the whole run: a second `prepare` on the same DIR fails at once instead of racing."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise RuntimeError(f"another phi3v prepare is using {out}; wait for it or use another --out") from err
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _transient(result: FetchResult) -> bool:
    return not result.ok and result.reason.startswith(TRANSIENT_REASONS)


def _shared_images(kept: list[Row], results: dict[str, FetchResult]) -> int:
    """Kept rows whose image content another kept row also uses (with different labels)."""
    counts = Counter(results[row.source].sha256 for row in kept)
    return sum(1 for row in kept if counts[results[row.source].sha256] > 1)


# -- journal ----------------------------------------------------------------------------------------------------------
class Journal:
    """Append-as-you-go record of fetch results (SQLite in WAL mode: a killed process loses nothing committed)."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS results (source TEXT PRIMARY KEY, result TEXT)")
        wanted = json.dumps(fingerprint, sort_keys=True)
        stored = self.db.execute("SELECT value FROM meta WHERE key = 'download'").fetchone()
        if stored is None:
            self.db.execute("INSERT INTO meta VALUES ('download', ?)", (wanted,))
        elif stored[0] != wanted:
            self.db.close()
            raise ValueError(
                f"{path.parent.parent} was prepared with other image settings ({stored[0]}; now {wanted}): "
                "use a new --out folder, or delete it to start over"
            )
        self.db.commit()

    def record(self, result: FetchResult) -> None:
        self.db.execute("INSERT OR REPLACE INTO results VALUES (?, ?)", (result.source, json.dumps(asdict(result))))
        self.db.commit()

    def results(self) -> dict[str, FetchResult]:
        return {s: FetchResult(**json.loads(r)) for s, r in self.db.execute("SELECT source, result FROM results")}

    def close(self) -> None:
        self.db.close()


def _download_fingerprint(config: DownloadConfig) -> dict[str, Any]:
    """The settings that change what is stored: a resumed run must use the same ones."""
    return {"max_side": config.max_side, "max_pixels": config.max_pixels, "max_bytes": config.max_bytes}


# -- outputs ----------------------------------------------------------------------------------------------------------
def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    _atomic_text(path, buffer.getvalue())


def _local_path(result: FetchResult) -> str:
    return f"{IMAGES_DIR}/{result.path}"


def _write_dataset(out: Path, kept: list[Row], results: dict[str, FetchResult], split_of: dict[int, str]) -> None:
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "title": datasets.Value("string"),
            "category": datasets.Value("string"),
            "price": datasets.Value("float64"),
            "id": datasets.Value("string"),
            "row_index": datasets.Value("int64"),
            "source": datasets.Value("string"),
            "image_path": datasets.Value("string"),
        }
    )
    splits = {}
    for name in SPLITS:
        members = [row for row in kept if split_of[row.index] == name]
        columns: dict[str, list] = {key: [] for key in features}
        for row in members:
            result = results[row.source]
            columns["image"].append(str(out / _local_path(result)))
            columns["title"].append(row.title)
            columns["category"].append(row.category)
            columns["price"].append(row.price)
            columns["id"].append(row.id)
            columns["row_index"].append(row.index)
            columns["source"].append(row.source)
            columns["image_path"].append(_local_path(result))
        splits[name] = datasets.Dataset.from_dict(columns, features=features)
    target, tmp = out / "dataset", out / "dataset.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the run's own summary says what was written
    try:
        # An empty split needs an explicit shard, else `load_from_disk` fails on it (datasets 5).
        empty = {name: 1 for name, split in splits.items() if len(split) == 0}
        datasets.DatasetDict(splits).save_to_disk(str(tmp), num_shards=empty or None)
    finally:
        if bars:
            datasets.enable_progress_bars()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _write_catalog_csv(
    out: Path, frame: pd.DataFrame, kept: list[Row], results: dict[str, FetchResult], split_of: dict[int, str]
) -> None:
    table = frame.iloc[[row.index for row in kept]].copy()
    table["local_image_path"] = [_local_path(results[row.source]) for row in kept]
    table["split"] = [split_of[row.index] for row in kept]
    _atomic_text(out / "catalog.csv", table.to_csv(index=False))


def _price_summary(prices: list[float]) -> dict[str, Any]:
    if not prices:
        return {}
    series = pd.Series(prices, dtype="float64")
    edges = [10.0**k for k in range(0, 7)]
    histogram = {f"{lo:g}-{hi:g}": int(((series >= lo) & (series < hi)).sum()) for lo, hi in itertools.pairwise(edges)}
    return {
        "count": len(prices),
        "min": float(series.min()),
        "median": float(series.median()),
        "mean": round(float(series.mean()), 4),
        "p99": float(series.quantile(0.99)),
        "max": float(series.max()),
        "log10_histogram": histogram,
    }


def _write_manifest(
    out: Path,
    source: str,
    options: PrepareOptions,
    report: PrepareReport,
    kept: list[Row],
    results: dict[str, FetchResult],
    shared_images: int,
) -> None:
    import datasets
    import PIL

    categories = Counter(row.category for row in kept)
    manifest = {
        "source": source,
        "columns": options.columns.as_dict(),
        "counts": {
            "rows_in": report.rows_in,
            "kept": report.kept,
            "failed": report.failed,
            "duplicates": report.duplicates,
            "failure_reasons": report.failure_reasons,
            "kept_rows_sharing_an_image": shared_images,
            "distinct_images_kept": len({results[row.source].sha256 for row in kept}),
        },
        "splits": report.splits,
        "empty_splits": [name for name, size in report.splits.items() if size == 0],
        "split_fractions": list(options.fractions),
        "seed": options.seed,
        "categories": dict(sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))),
        "price": _price_summary([row.price for row in kept]),
        "download": {k: v for k, v in asdict(options.download).items() if k != "user_agent"},
        "versions": {
            "phi3v": __version__,
            "python": platform.python_version(),
            "datasets": datasets.__version__,
            "pillow": PIL.__version__,
        },
    }
    _atomic_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def summary_table(report: PrepareReport) -> str:
    """The end-of-run summary a person reads (printed by the CLI)."""
    lines = [
        f"phi3v prepare -> {report.out_dir}",
        f"  rows in     {report.rows_in:>8}",
        f"  kept        {report.kept:>8}   " + "  ".join(f"{k} {v}" for k, v in report.splits.items()),
        f"  failed      {report.failed:>8}",
    ]
    lines += [f"    {reason:<22}{count:>6}" for reason, count in report.failure_reasons.items()]
    lines.append(f"  duplicates  {report.duplicates:>8}")
    lines.append(
        f"  rows in = kept + failed + duplicates: {report.rows_in} = {report.kept} + {report.failed} + "
        f"{report.duplicates}"
    )
    lines.append(
        f"  images fetched this run: {report.fetched_now}; "
        "files: dataset/ catalog.csv failures.csv duplicates.csv manifest.json"
    )
    return "\n".join(lines)


__all__ = ["PrepareOptions", "PrepareReport", "prepare", "summary_table"]
