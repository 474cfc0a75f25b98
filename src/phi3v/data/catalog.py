"""Product catalogs: reading (hub dataset, CSV, Parquet, JSONL), column mapping, field parsing and splits.

Reference: the DBQ catalogs (DBQ/Burberry.Product.prices.United.States: 17 columns; image in `imageurl`, title in
`title`, category in `category3_code`, price in `full_price`, id in `product_code`) and their quirks: placeholder
`N.A.` values, categories that are navigation labels, a heavy price tail (../shared/docs/dataset-facts.md §2, §7).

Values are read as they are (CSV and JSONL as strings, so "N.A." or "1,250.00" survive) and parsed here, so every
row either yields a clean (title, category, price) or a named reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from phi3v.model.hub import is_hub_id, unresolvable_hub_host

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
MISSING_TEXT = frozenset({"", "n.a.", "na", "n/a", "none", "null", "nan", "-"})
MISSING_CATEGORY = "N.A."  # what DBQ writes; kept as a category of its own (scarves are often "N.A." in DBQ)
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ColumnMap:
    """Which catalog column holds what (defaults: the DBQ names)."""

    image: str = "imageurl"
    title: str = "title"
    category: str = "category3_code"
    price: str = "full_price"
    id: str = "product_code"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


class CatalogError(ValueError):
    """A catalog that cannot be used at all (unreadable, missing columns, empty)."""


def load_catalog(source: str, *, split: str = "train") -> tuple[pd.DataFrame, Path | None]:
    """Read a catalog into a DataFrame of its original columns.

    Args:
        source: a local `.csv`, `.parquet` or `.jsonl` file, or a hub dataset id such as
            "DBQ/Burberry.Product.prices.United.States" (read with `datasets.load_dataset`).
        split: the hub dataset's split.

    Returns:
        (rows, base_dir): base_dir resolves relative image paths (the catalog file's folder; None for hub data).

    Raises:
        CatalogError: unknown file type or an unreadable file.
        OSError: a hub id without network access (at once, with a clear message).
    """
    path = Path(source).expanduser()
    if path.exists():
        kind = LOCAL_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise CatalogError(f"{source}: unsupported catalog file type (use .csv, .parquet or .jsonl)")
        try:
            if kind == "csv":
                frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            elif kind == "parquet":
                frame = pd.read_parquet(path)
            else:
                frame = _read_jsonl(path)
        except (ValueError, OSError) as err:
            raise CatalogError(f"{source}: cannot read the {kind} file ({err})") from err
        return frame, path.resolve().parent
    if source.endswith(tuple(LOCAL_SUFFIXES)) or not is_hub_id(source):
        raise CatalogError(f"catalog file {source} does not exist (and it is not a hub dataset id like 'org/name')")
    return _load_hub_dataset(source, split), None


def _read_jsonl(path: Path) -> pd.DataFrame:
    """JSON lines with every value kept as parsed (ints stay ints, null stays None): no dtype inference, which would
    turn an id column with a null into floats ("1001.0")."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"line {number}: {err}") from err
            if not isinstance(records[-1], dict):
                raise ValueError(f"line {number}: expected a JSON object")
    columns = list(dict.fromkeys(key for record in records for key in record))
    return pd.DataFrame({c: pd.Series([r.get(c) for r in records], dtype=object) for c in columns})


def _load_hub_dataset(dataset_id: str, split: str) -> pd.DataFrame:
    import datasets
    from huggingface_hub import constants

    host = None if constants.HF_HUB_OFFLINE else unresolvable_hub_host()
    try:
        if host:
            raise ConnectionError(f"the hub host {host} does not resolve (no network?)")
        data = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # every hub/network failure becomes one clear message
        raise OSError(
            f"could not load the dataset {dataset_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Offline, export it on a machine with network access (e.g. to parquet) and pass the file."
        ) from err
    return data.to_pandas()


def check_columns(frame: pd.DataFrame, columns: ColumnMap, source: str) -> None:
    """Fail naming the missing mapped columns and listing the catalog's own."""
    missing = [f"--{role}-column {name!r}" for role, name in columns.as_dict().items() if name not in frame.columns]
    if missing:
        raise CatalogError(
            f"{source}: missing columns: {', '.join(missing)}; the catalog has: {', '.join(map(str, frame.columns))}"
        )
    if frame.empty:
        raise CatalogError(f"{source}: the catalog has no rows")


def is_missing(value: object) -> bool:
    """None, NaN, or a placeholder string such as "", "N.A.", "null"."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_TEXT


def clean_text(value: object) -> str | None:
    """Whitespace-collapsed text, or None when missing."""
    if is_missing(value):
        return None
    text = " ".join(str(value).split())
    return text or None


_NUMBER = re.compile(
    r"\d[\d.,\u00a0\u202f ]*"
)  # digits with their grouping/decimal marks (no sign: prices are positive)


def parse_price(value: object) -> float | None:
    """A price as a float, or None when missing or not one positive number.

    Accepts numbers and text with one number and optional currency words or signs: "1,250.00", "$1,250", "USD 990",
    "1 250.50", "€1.250,00" (European), "89,90" (decimal comma). The decimal mark is the last "." or "," when
    one or two digits follow it; every other mark groups thousands. Text with several numbers ("Size 2, 34.00"),
    exponents, signs or words alone gives None rather than a guess.
    """
    if is_missing(value) or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    else:
        text = str(value).strip()
        numbers = _NUMBER.findall(text)
        rest = _NUMBER.sub("", text)
        if len(numbers) != 1 or re.search(r"[\d\-+eE]", rest.replace("EUR", "").replace("USD", "")):
            return None
        digits = re.sub(r"[\u00a0\u202f ]", "", numbers[0]).rstrip(".,")
        match = re.search(r"[.,](\d{1,2})$", digits)
        if match:  # decimal mark
            whole, fraction = digits[: match.start()], match.group(1)
        else:
            whole, fraction = digits, ""
        if not re.fullmatch(r"\d+|\d{1,3}([.,]\d{3})+", whole):  # thousands come in groups of three
            return None
        whole = re.sub(r"[.,]", "", whole)
        number = float(f"{whole}.{fraction}" if fraction else whole)
    if not math.isfinite(number) or number <= 0:
        return None
    return number


def normalize_title(title: str) -> str:
    """Case, accents, punctuation and spacing folded: near-duplicate titles share one key.

    Letters of every script are kept ("手提包" and "Кошелёк" stay distinct); only accents (combining marks),
    punctuation and spacing go.
    """
    decomposed = unicodedata.normalize("NFKD", title.casefold())
    text = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text)).split())


def assign_splits(keys: Sequence[str], fractions: Sequence[float], seed: int) -> list[str]:
    """Assign rows to train/validation/test by group key, so one key never spans two splits.

    Groups are ordered by a seeded hash of the key and cut at the cumulative row fractions: deterministic for a
    (catalog, seed), independent of row order, and close to the fractions when groups are small.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    sizes: dict[str, int] = {}
    for key in keys:
        sizes[key] = sizes.get(key, 0) + 1

    def order(key: str) -> str:
        return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()

    total = len(keys)
    bounds = [fractions[0] * total, (fractions[0] + fractions[1]) * total]
    assigned: dict[str, str] = {}
    cumulative = 0
    for key in sorted(sizes, key=order):
        middle = cumulative + sizes[key] / 2  # a group goes where its middle row falls
        assigned[key] = SPLITS[0] if middle < bounds[0] else SPLITS[1] if middle < bounds[1] else SPLITS[2]
        cumulative += sizes[key]
    return [assigned[key] for key in keys]
