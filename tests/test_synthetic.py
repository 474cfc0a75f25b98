"""Synthetic DBQ catalogs: determinism, schema, file names, quirks, and labels that follow from the drawn pixels."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from phi3v.data.synthetic import (
    CATEGORIES,
    CATEGORY1,
    CATEGORY2,
    CLEAN_HEAD,
    COLOURS,
    DBQ_COLUMNS,
    MISSING_IMAGE,
    NOUNS,
    PATTERNS,
    PRICES,
    PRODUCT_CODE_RANGE,
    TIERS,
    QuirkCounts,
    draw_product,
    full_price,
    image_seed,
    make_synthetic_catalog,
    make_title,
    quirk_counts,
)

N = 200
SEED = 7


def read(csv: Path) -> pd.DataFrame:
    """The catalog as a downstream reader sees it (no NA guessing: "N.A." stays a string)."""
    return pd.read_csv(csv, keep_default_na=False)


def normalise(title: str) -> str:
    return " ".join(title.lower().split())


def features(row: pd.Series) -> tuple[str, str, str, int]:
    """(category, colour, pattern, tier) recovered from the labels alone: title words, category, price."""
    colour, pattern, noun = normalise(row["title"]).split()
    category = row["category3_code"]
    assert noun == NOUNS[category].lower()
    colour = next(c for c in COLOURS if c.lower() == colour)
    pattern = next(p for p in PATTERNS if p.lower() == pattern)
    tier = PRICES[category].index(row["full_price"]) + 1
    return category, colour, pattern, tier


def at_336(image: Image.Image) -> np.ndarray:
    return np.asarray(image.resize((336, 336), Image.Resampling.BILINEAR), dtype=np.float32)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    """n=200 JPEG catalog with quirks (default arguments otherwise)."""
    return make_synthetic_catalog(tmp_path_factory.mktemp("synthetic") / "cat", N, seed=SEED)


@pytest.fixture(scope="module")
def frame(catalog) -> pd.DataFrame:
    return read(catalog)


def test_deterministic_bytes(tmp_path):
    paths = [make_synthetic_catalog(tmp_path / name, 45, seed=3, image_size=256) for name in ("a", "b")]
    assert paths[0] == tmp_path / "a" / "catalog.csv"
    assert paths[0].read_bytes() == paths[1].read_bytes()
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b" / "images").iterdir())
    for name in names:
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    other = make_synthetic_catalog(tmp_path / "c", 45, seed=4, image_size=256)
    assert other.read_bytes() != paths[0].read_bytes()


def test_draw_product_deterministic_and_seed_jitter():
    a = draw_product("COATS", "Navy", "Check", 2, size=256, seed=1)
    assert a.mode == "RGB" and a.size == (256, 256)
    assert np.array_equal(np.asarray(a), np.asarray(draw_product("COATS", "Navy", "Check", 2, size=256, seed=1)))
    b = draw_product("COATS", "Navy", "Check", 2, size=256, seed=2)
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # jitter, noise, lighting


def test_schema_and_constant_columns(frame):
    assert tuple(frame.columns) == DBQ_COLUMNS and len(DBQ_COLUMNS) == 17
    assert len(frame) == N
    for column in ("product_code", "flg_discount"):
        assert frame[column].dtype == np.int64
    for column in ("full_price", "price", "full_price_eur", "price_eur"):
        assert frame[column].dtype == np.float64
    for column in (*DBQ_COLUMNS[:8], "title", "itemurl", "imageurl"):
        assert pd.api.types.is_string_dtype(frame[column]), column
    constants = {
        "website_name": "Burberry",
        "competence_date": "2023-11-17",
        "country_code": "USA",
        "currency_code": "USD",
        "brand": "BURBERRY",
        "flg_discount": 0,
    }
    for column, value in constants.items():
        assert (frame[column] == value).all(), column
    assert set(frame["category1_code"]) <= set(CATEGORY1)
    assert set(frame["category3_code"]) == set(CATEGORIES)
    assert (frame["category2_code"] == frame["category3_code"].map(CATEGORY2)).all()
    assert (frame["price"] == frame["full_price"]).all()
    assert np.allclose(frame["full_price_eur"], (frame["full_price"] * 0.92).round(2))
    assert (frame["price_eur"] == frame["full_price_eur"]).all()


def test_product_codes_and_item_urls(frame):
    codes = frame["product_code"]
    assert codes.is_unique
    assert codes.between(*PRODUCT_CODE_RANGE).all()
    for title, code, url in zip(frame["title"], codes, frame["itemurl"], strict=True):
        slug = "-".join(normalise(title).split())
        assert url == f"https://us.burberry.com/{slug}-p{code}"
        assert int(re.search(r"-p(\d+)$", url).group(1)) == code


def test_image_files_named_by_row_index(catalog, frame):
    own = [i for i, url in enumerate(frame["imageurl"]) if url == f"images/{i:05d}.jpg"]
    files = sorted(p.name for p in (catalog.parent / "images").iterdir())
    assert files == [f"{i:05d}.jpg" for i in own]
    others = frame.drop(index=own)["imageurl"]
    # every other row is a quirk: a placeholder, or the URL of an earlier row's file
    assert all(url == MISSING_IMAGE or url in set(frame.loc[own, "imageurl"]) for url in others)
    with Image.open(catalog.parent / "images" / files[0]) as image:
        assert image.format == "JPEG" and image.size == (512, 512) and image.mode == "RGB"


def test_base_url_variant(tmp_path):
    plain = read(make_synthetic_catalog(tmp_path / "plain", 60, seed=1, image_size=128))
    based = read(make_synthetic_catalog(tmp_path / "based", 60, seed=1, image_size=128, base_url="http://x.test/c/"))
    assert plain.drop(columns="imageurl").equals(based.drop(columns="imageurl"))
    for rel, url in zip(plain["imageurl"], based["imageurl"], strict=True):
        assert url == (MISSING_IMAGE if rel == MISSING_IMAGE else "http://x.test/c/" + rel)
    assert (tmp_path / "plain" / "images" / "00000.jpg").read_bytes() == (
        tmp_path / "based" / "images" / "00000.jpg"
    ).read_bytes()


def test_labels_follow_from_drawn_features(tmp_path):
    """Every title word, the category and the price are the features the photo was drawn from."""
    csv = make_synthetic_catalog(tmp_path, 40, seed=5, image_size=192, image_format="PNG")
    frame = read(csv)
    for index, row in frame.iterrows():
        category, colour, pattern, tier = features(row)
        title = make_title(category, colour, pattern)
        assert row["title"] == title or (index >= CLEAN_HEAD and normalise(row["title"]) == normalise(title))
        assert row["full_price"] == full_price(category, tier)
        if row["imageurl"] == MISSING_IMAGE:
            continue
        with Image.open(csv.parent / row["imageurl"]) as stored:
            pixels = np.asarray(stored.convert("RGB"))
        drawn_for = int(Path(row["imageurl"]).stem)  # the row itself, or the earlier row whose photo it shares
        assert drawn_for == index or row["imageurl"] in set(frame["imageurl"].iloc[:index])
        drawn = draw_product(category, colour, pattern, tier, size=192, seed=image_seed(5, drawn_for))
        assert np.array_equal(pixels, np.asarray(drawn)), index


def test_jpeg_close_to_drawn_pixels(catalog, frame):
    row = frame.iloc[0]
    with Image.open(catalog.parent / row["imageurl"]) as stored:
        pixels = np.asarray(stored.convert("RGB"), dtype=np.float32)
    drawn = draw_product(*features(row), seed=image_seed(SEED, 0))
    assert mean_abs_diff(pixels, np.asarray(drawn, dtype=np.float32)) < 2.0


@pytest.mark.parametrize(
    ("name", "variants", "threshold"),
    [
        ("category", [(c, "Navy", "Check", 2) for c in CATEGORIES], 8.0),
        ("colour", [("COATS", c, "Plain", 2) for c in COLOURS], 5.0),
        ("pattern", [("SHIRTS", "Red", p, 2) for p in PATTERNS], 3.0),
        ("pattern on a scarf", [("SCARVES", "Beige", p, 2) for p in PATTERNS], 3.0),
        ("tier", [("HATS", "Green", "Striped", t) for t in TIERS], 0.6),
    ],
)
def test_features_clearly_visible_at_336(name, variants, threshold):
    """Changing one feature (same seed, so the same jitter) changes the 336-px image by more than `threshold`."""
    images = [at_336(draw_product(*v, seed=11)) for v in variants]
    worst = min(mean_abs_diff(a, b) for a, b in itertools.combinations(images, 2))
    assert worst > threshold, (name, worst)


def test_price_is_a_function_of_category_and_tier(frame):
    prices = [p for row in PRICES.values() for p in row]
    assert len(set(prices)) == len(prices) == len(CATEGORIES) * len(TIERS)  # price alone names (category, tier)
    for category in CATEGORIES:
        assert [full_price(category, t) for t in TIERS] == list(PRICES[category])
    assert (frame.groupby("full_price")["category3_code"].nunique() == 1).all()
    assert all(p in PRICES[c] for c, p in zip(frame["category3_code"], frame["full_price"], strict=True))


def test_quirks_counts_and_placement(frame):
    expected = quirk_counts(N)
    assert expected == QuirkCounts(missing_image=4, shared_image=2, near_duplicate_title=2)
    head = frame.iloc[:CLEAN_HEAD]
    assert (head["imageurl"] != MISSING_IMAGE).all() and head["imageurl"].is_unique
    assert all(t == make_title(*_title_parts(t)) for t in head["title"])

    assert (frame["imageurl"] == MISSING_IMAGE).sum() == expected.missing_image

    urls = frame.loc[frame["imageurl"] != MISSING_IMAGE, "imageurl"]
    shared = frame[frame["imageurl"].isin(urls[urls.duplicated()])]
    assert len(shared) == 2 * expected.shared_image
    for _, pair in shared.groupby("imageurl"):
        assert len(pair) == 2
        assert pair["title"].nunique() == pair["full_price"].nunique() == pair["category3_code"].nunique() == 1
        assert pair["category1_code"].nunique() == 2 and pair["product_code"].is_unique

    messy = frame[frame["title"] != frame["title"].map(lambda t: " ".join(w.capitalize() for w in t.split()))]
    assert len(messy) == expected.near_duplicate_title
    for index, row in messy.iterrows():
        assert row["title"] == row["title"].lower() != normalise(row["title"])
        assert "  " in row["title"] and row["title"].endswith(" ")
        earlier = frame.iloc[:index]
        twin = earlier[
            (earlier["title"].map(normalise) == normalise(row["title"])) & (earlier["title"] != row["title"])
        ]
        assert len(twin) >= 1
        assert (twin["full_price"] == row["full_price"]).any()
        assert row["imageurl"] == f"images/{index:05d}.jpg"  # its own photo of the same product


def _title_parts(title: str) -> tuple[str, str, str]:
    colour, pattern, noun = title.split()
    return next(c for c in CATEGORIES if NOUNS[c] == noun), colour, pattern


def test_quirks_off(tmp_path, frame):
    clean = read(make_synthetic_catalog(tmp_path, N, seed=SEED, image_size=64, quirks=False))
    assert quirk_counts(N, quirks=False) == QuirkCounts()
    assert (clean["imageurl"] != MISSING_IMAGE).all() and clean["imageurl"].is_unique
    assert list(clean["imageurl"]) == [f"images/{i:05d}.jpg" for i in range(N)]
    assert all(t == make_title(*_title_parts(t)) for t in clean["title"])
    # quirks only touch their own rows: every other row is the same with or without them
    same = (clean.drop(columns="imageurl") == frame.drop(columns="imageurl")).all(axis=1)
    assert (~same).sum() <= quirk_counts(N).rows
    assert same.iloc[:CLEAN_HEAD].all()
    assert len(list((tmp_path / "images").iterdir())) == N


def test_small_catalogs_have_no_quirks(tmp_path):
    assert quirk_counts(CLEAN_HEAD + 19) == QuirkCounts()
    assert quirk_counts(CLEAN_HEAD + 20).rows > 0
    frame = read(make_synthetic_catalog(tmp_path, 5, seed=0, image_size=64))
    assert len(frame) == 5 and list(frame["imageurl"]) == [f"images/{i:05d}.jpg" for i in range(5)]


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="category"):
        draw_product("SOCKS", "Navy", "Check", 1)
    with pytest.raises(ValueError, match="colour"):
        draw_product("COATS", "Purple", "Check", 1)
    with pytest.raises(ValueError, match="pattern"):
        draw_product("COATS", "Navy", "Dots", 1)
    with pytest.raises(ValueError, match="tier"):
        draw_product("COATS", "Navy", "Check", 4)
    with pytest.raises(ValueError, match="image_format"):
        make_synthetic_catalog(tmp_path, 3, image_format="GIF")
    with pytest.raises(ValueError, match="n must be"):
        make_synthetic_catalog(tmp_path, 0)
