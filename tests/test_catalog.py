"""Catalog reading, field parsing and title-grouped splits (phi3v.data.catalog)."""

from __future__ import annotations

import json
import math
import random

import pandas as pd
import pytest

from phi3v.data.catalog import (
    CatalogError,
    ColumnMap,
    assign_splits,
    check_columns,
    clean_text,
    is_missing,
    load_catalog,
    normalize_title,
    parse_price,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1250.0, 1250.0),
        (990, 990.0),
        ("1,250.00", 1250.0),
        ("$1,250", 1250.0),
        ("USD 990", 990.0),
        (" 2 490.50 ", 2490.5),
        ("89,90", 89.9),
        ("12,500", 12500.0),
        ("1.250,00", 1250.0),
        ("EUR 1.250,00", 1250.0),
        ("1,250,000.5", 1250000.5),
        ("1e3", None),
        ("1,2,3", None),
        ("Size 2, 34.00", None),
        ("N.A.", None),
        ("", None),
        (None, None),
        (float("nan"), None),
        ("abc", None),
        ("1.2.3", None),
        ("-5", None),
        (0, None),
        (True, None),
        (float("inf"), None),
    ],
)
def test_parse_price(value, expected):
    assert parse_price(value) == expected


def test_missing_values_and_text_cleaning():
    assert all(is_missing(v) for v in (None, float("nan"), "", "  ", "N.A.", "n/a", "NULL", "nan"))
    assert not any(is_missing(v) for v in ("Coat", "0", 0))
    assert clean_text("  Navy   Check\tCoat ") == "Navy Check Coat"
    assert clean_text("N.A.") is None


def test_normalized_titles_fold_case_spacing_punctuation_and_accents():
    keys = {
        normalize_title(t) for t in ("Navy Check Coat", "  navy  check coat ", "NAVY-CHECK coat!", "Navy Chéck Coat")
    }
    assert keys == {"navy check coat"}
    assert normalize_title("Navy Check Coat") != normalize_title("Navy Check Scarf")
    other_scripts = [normalize_title(t) for t in ("手提包", "钱包", "Кошелёк", "حقيبة")]
    assert len(set(other_scripts)) == 4 and all(other_scripts)  # every script keeps its letters


def test_splits_keep_groups_together_follow_fractions_and_ignore_row_order():
    rng = random.Random(0)
    keys = [f"product {rng.randrange(400)}" for _ in range(2000)]
    splits = assign_splits(keys, (0.8, 0.1, 0.1), seed=3)
    by_key: dict[str, set[str]] = {}
    for key, split in zip(keys, splits, strict=True):
        by_key.setdefault(key, set()).add(split)
    assert all(len(s) == 1 for s in by_key.values())  # no group spans two splits
    counts = {name: splits.count(name) for name in ("train", "validation", "test")}
    assert abs(counts["train"] / 2000 - 0.8) < 0.03 and abs(counts["test"] / 2000 - 0.1) < 0.03
    shuffled = list(zip(keys, splits, strict=True))
    rng.shuffle(shuffled)
    again = assign_splits([k for k, _ in shuffled], (0.8, 0.1, 0.1), seed=3)
    assert all(split == by_key[k].copy().pop() for (k, _), split in zip(shuffled, again, strict=True))
    assert assign_splits(keys, (0.8, 0.1, 0.1), seed=4) != splits  # the seed matters
    with pytest.raises(ValueError, match="sum"):
        assign_splits(keys, (0.8, 0.3, 0.1), seed=0)


def test_local_catalog_formats_keep_raw_values(tmp_path):
    frame = pd.DataFrame(
        {
            "imageurl": ["a.jpg", "N.A."],
            "title": ["Coat", "Bag"],
            "category3_code": ["COATS", "N.A."],
            "full_price": ["1,250.00", "990"],
            "product_code": ["1", "2"],
        }
    )
    frame.to_csv(tmp_path / "c.csv", index=False)
    frame.to_parquet(tmp_path / "c.parquet")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")))
    for name in ("c.csv", "c.parquet", "c.jsonl"):
        loaded, base = load_catalog(str(tmp_path / name))
        assert base == tmp_path.resolve()
        assert loaded["full_price"].tolist() == ["1,250.00", "990"]
        assert loaded["imageurl"].tolist() == ["a.jpg", "N.A."]
        check_columns(loaded, ColumnMap(), name)


def test_bad_catalog_sources_fail_clearly(tmp_path):
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(CatalogError, match="unsupported catalog file type"):
        load_catalog(str(tmp_path / "c.txt"))
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(str(tmp_path / "missing.csv"))
    frame = pd.DataFrame({"photo": ["a"], "title": ["t"]})
    with pytest.raises(CatalogError, match=r"--image-column 'imageurl'.*the catalog has: photo, title"):
        check_columns(frame, ColumnMap(), "c.csv")
    with pytest.raises(CatalogError, match="no rows"):
        check_columns(frame.iloc[:0], ColumnMap(image="photo", category="title", price="title", id="title"), "c")


def test_hub_dataset_offline_fails_at_once_with_a_clear_message():
    with pytest.raises(OSError, match=r"could not load the dataset 'DBQ/Burberry.Product.prices.United.States'"):
        load_catalog("DBQ/Burberry.Product.prices.United.States")


def test_parse_price_never_returns_nan():
    assert all(v is None or not math.isnan(v) for v in map(parse_price, ["nan", "NaN", float("nan")]))


def test_jsonl_keeps_integer_ids_when_some_are_null(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"product_code": 1001, "title": "A"}\n{"product_code": null, "title": "B"}\n')
    frame, _ = load_catalog(str(tmp_path / "c.jsonl"))
    assert frame["product_code"].tolist() == [1001, None]
