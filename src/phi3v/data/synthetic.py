"""Synthetic product catalogs in the DBQ schema, whose photos determine their labels.

Every product is a flat "studio photo" drawn with Pillow: a silhouette on a light background, filled with a colour
and a pattern, with 1–3 gold emblem dots under it. Four visible features fix the whole answer
``Product: <title>, Category: <category>, Full Price: <price>``:

=============  ==========================================================  =========================================
feature        how it is drawn                                             what it determines
=============  ==========================================================  =========================================
category       silhouette: COATS long A-line body + long hanging sleeves;  ``category3_code``, the title's noun and
               BAGS trapezoid + arched handle + flap; SCARVES diagonal     ``category2_code``
               band with fringes; SHIRTS T shape + white collar; SHOES
               low sneaker profile + white sole; HATS dome + wide brim;
               and the studio backdrop's tint (`BACKDROPS`)
colour         fill colour of the silhouette (`COLOURS`: 6 distinct RGB)   first word of the title
pattern        Check = thick horizontal and vertical lines (+ thin ones)   second word of the title
               in a contrasting colour; Striped = vertical lines only;
               Plain = none
tier           1–3 gold dots in fixed slots under the product              ``full_price`` (`PRICES`)
=============  ==========================================================  =========================================

Title = ``f"{colour} {pattern} {noun}"`` (e.g. "Navy Check Coat"), price = ``PRICES[category][tier - 1]`` (all 18
values distinct, so the price alone also names category and tier). Sizes are relative to the image, and lines,
dots and outlines stay several pixels wide after the image is resized into 336×336 crops, so a small vision model can
learn every label from the pixels. Each image also gets a per-image seed (`image_seed`) that jitters position
(±3 %), scale (0.92–1.04), background tint, a lighting gradient, pattern phase and pixel noise: no two images are
identical, while the labels never depend on the seed.

Why: tests, benchmarks and the demo need a catalog that exercises the same code as the real DBQ data (17 columns,
``N.A.`` placeholders, shared image URLs, near-duplicate titles; ``../shared/docs/dataset-facts.md`` §2) and on
which a tiny model trained on a CPU for a few minutes can beat text-only baselines only by looking at the image.

Everything is deterministic: the same arguments give byte-identical ``catalog.csv`` and images (JPEG quality 92,
4:4:4, no metadata).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageChops, ImageDraw

logger = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = ("COATS", "BAGS", "SCARVES", "SHIRTS", "SHOES", "HATS")
"""``category3_code`` values, one silhouette each."""

NOUNS: dict[str, str] = {
    "COATS": "Coat",
    "BAGS": "Bag",
    "SCARVES": "Scarf",
    "SHIRTS": "Shirt",
    "SHOES": "Sneakers",
    "HATS": "Hat",
}
"""Last word of the title, by category."""

CATEGORY2: dict[str, str] = {
    "COATS": "OUTERWEAR",
    "BAGS": "BAGS",
    "SCARVES": "ACCESSORIES",
    "SHIRTS": "CLOTHES",
    "SHOES": "SHOES",
    "HATS": "ACCESSORIES",
}
"""Coarse ``category2_code`` group, by category."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "Black": (28, 28, 30),
    "Navy": (24, 38, 96),
    "Beige": (222, 200, 158),
    "Red": (172, 28, 36),
    "Green": (28, 104, 56),
    "Camel": (184, 130, 68),
}
"""Colour word → fill RGB."""

PATTERNS: tuple[str, ...] = ("Check", "Striped", "Plain")
"""Pattern words."""

TIERS: tuple[int, ...] = (1, 2, 3)
"""Price tiers, drawn as that many gold dots."""

PRICES: dict[str, tuple[float, float, float]] = {
    "COATS": (1890.0, 2490.0, 3290.0),
    "BAGS": (1350.0, 2150.0, 2950.0),
    "SCARVES": (390.0, 490.0, 690.0),
    "SHIRTS": (450.0, 590.0, 790.0),
    "SHOES": (650.0, 890.0, 1190.0),
    "HATS": (290.0, 420.0, 550.0),
}
"""USD ``full_price`` by category and tier (index ``tier - 1``); all values distinct."""

EUR_PER_USD = 0.92
"""One FX rate for the scrape date, as in DBQ (``full_price_eur = round(full_price * 0.92, 2)``)."""

DBQ_COLUMNS: tuple[str, ...] = (
    "website_name",
    "competence_date",
    "country_code",
    "currency_code",
    "brand",
    "category1_code",
    "category2_code",
    "category3_code",
    "product_code",
    "title",
    "itemurl",
    "imageurl",
    "full_price",
    "price",
    "full_price_eur",
    "price_eur",
    "flg_discount",
)
"""The 17 DBQ columns, in order (``../shared/docs/dataset-facts.md`` §2)."""

BACKDROPS: dict[str, tuple[int, int, int]] = {
    "COATS": (236, 230, 216),
    "BAGS": (214, 226, 240),
    "SCARVES": (240, 218, 228),
    "SHIRTS": (218, 236, 218),
    "SHOES": (226, 226, 226),
    "HATS": (240, 234, 196),
}
"""Studio backdrop RGB by category (each category is shot on its own backdrop, as catalogs often do): a cue a small
vision model learns in minutes, where the silhouette alone takes it far longer."""

CATEGORY1: tuple[str, ...] = ("WOMAN", "MAN", "KIDS")
_CATEGORY1_P = (0.5, 0.4, 0.1)
PRODUCT_CODE_RANGE = (34_500_000, 80_900_000)
"""Inclusive range of DBQ Burberry item numbers."""
MISSING_IMAGE = "N.A."
"""DBQ's placeholder for a missing value (a 4-character ``imageurl``)."""
CLEAN_HEAD = 20
"""The first rows never carry a quirk."""
JPEG_QUALITY = 92
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png"}

# Drawing constants (RGB).
_OUTLINE = (34, 30, 28)
_WHITE = (244, 242, 236)
_GOLD = (216, 170, 36)
_GOLD_EDGE = (92, 64, 8)
_LIGHT_LINES = (240, 230, 205)
_FIELD_OFFSET = 24  # > max |lighting| + max |noise| = 9 + 9 + 3
_DARK_LINES = (40, 30, 24)


@dataclass(frozen=True)
class QuirkCounts:
    """How many rows of a catalog carry each quirk (see `make_synthetic_catalog`).

    Attributes:
        missing_image (`int`): Rows whose ``imageurl`` is ``"N.A."`` (no image file).
        shared_image (`int`): Rows that reuse an earlier row's ``imageurl`` (one pair each).
        near_duplicate_title (`int`): Rows whose title is an earlier row's title in lower case with extra spaces.
    """

    missing_image: int = 0
    shared_image: int = 0
    near_duplicate_title: int = 0

    @property
    def rows(self) -> int:
        """Rows touched by a quirk, the partner row of each pair included."""
        return self.missing_image + 2 * self.shared_image + 2 * self.near_duplicate_title


def quirk_counts(n: int, quirks: bool = True) -> QuirkCounts:
    """Number of quirky rows `make_synthetic_catalog` puts in an `n`-row catalog.

    None below ``CLEAN_HEAD + 20`` rows; otherwise ``n // 50`` ``N.A.`` image URLs, ``n // 100`` shared image URLs
    and ``n // 100`` near-duplicate titles (at least one of each): 4, 2 and 2 for ``n = 200`` (12 rows, 6 %).

    Args:
        n (`int`): Catalog size.
        quirks (`bool`, *optional*, defaults to `True`): `False` always gives zero counts.

    Returns:
        `QuirkCounts`: The counts.
    """
    if not quirks or n < CLEAN_HEAD + 20:
        return QuirkCounts()
    return QuirkCounts(max(1, n // 50), max(1, n // 100), max(1, n // 100))


def full_price(category: str, tier: int) -> float:
    """USD list price of a product: a function of its category and tier only.

    Args:
        category (`str`): One of `CATEGORIES`.
        tier (`int`): One of `TIERS`.

    Returns:
        `float`: ``PRICES[category][tier - 1]``.
    """
    _check_features(category, next(iter(COLOURS)), PATTERNS[0], tier)
    return PRICES[category][tier - 1]


def make_title(category: str, colour: str, pattern: str) -> str:
    """Title of a product: ``f"{colour} {pattern} {noun}"``, every word visible in the photo.

    Args:
        category (`str`): One of `CATEGORIES`.
        colour (`str`): One of `COLOURS`.
        pattern (`str`): One of `PATTERNS`.

    Returns:
        `str`: E.g. ``"Navy Check Coat"``.
    """
    _check_features(category, colour, pattern, TIERS[0])
    return f"{colour} {pattern} {NOUNS[category]}"


def image_seed(seed: int, index: int) -> int:
    """Seed `make_synthetic_catalog` passes to `draw_product` for row `index` of a catalog made with `seed`.

    Args:
        seed (`int`): Catalog seed.
        index (`int`): Row index.

    Returns:
        `int`: A 32-bit seed.
    """
    return int(np.random.SeedSequence([seed, index, 0x1D]).generate_state(1)[0])


def _check_features(category: str, colour: str, pattern: str, tier: int) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")


# --- drawing -----------------------------------------------------------------------------------------------------

# A shape is a list of primitives in unit coordinates (u right, v down, product inside [-1, 1]²):
# ("poly", points) | ("ellipse", box) | ("chord", box, start, end) | ("arc", box, start, end, width)
# | ("line", points, width). Widths are in units too.
_Prim = tuple

_Point = tuple[float, float]


def _mirror(points: list[_Point]) -> list[_Point]:
    return [(-u, v) for u, v in points]


def _band(p0: _Point, p1: _Point, half_width: float) -> list[_Point]:
    """Rectangle of the given half width around the segment p0–p1."""
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    length = math.hypot(du, dv)
    nu, nv = -dv / length * half_width, du / length * half_width
    return [(p0[0] + nu, p0[1] + nv), (p1[0] + nu, p1[1] + nv), (p1[0] - nu, p1[1] - nv), (p0[0] - nu, p0[1] - nv)]


def _scarf() -> list[_Prim]:
    """A long diagonal band with fringes (short lines along the band) at both ends."""
    p0, p1, half, fringe = (-0.74, -0.64), (0.74, 0.64), 0.27, 0.17
    length = math.hypot(p1[0] - p0[0], p1[1] - p0[1])
    du, dv = (p1[0] - p0[0]) / length, (p1[1] - p0[1]) / length
    prims: list[_Prim] = [("poly", _band(p0, p1, half))]
    for k in range(7):
        off = -half + (k + 0.5) * (2 * half / 7)
        for (eu, ev), sign in ((p0, -1.0), (p1, 1.0)):
            start = (eu - dv * off, ev + du * off)
            prims.append(("line", [start, (start[0] + sign * fringe * du, start[1] + sign * fringe * dv)], 0.03))
    return prims


_SLEEVE_COAT = [(-0.40, -0.80), (-0.60, -0.70), (-0.82, 0.52), (-0.62, 0.58), (-0.42, -0.30)]
_SLEEVE_SHIRT = [(-0.44, -0.62), (-0.70, -0.62), (-0.96, -0.30), (-0.80, -0.08), (-0.44, -0.30)]

_SHAPES: dict[str, list[_Prim]] = {
    "COATS": [
        ("poly", [(-0.40, -0.84), (0.40, -0.84), (0.52, 0.98), (-0.52, 0.98)]),
        ("poly", _SLEEVE_COAT),
        ("poly", _mirror(_SLEEVE_COAT)),
    ],
    "BAGS": [
        ("poly", [(-0.56, -0.22), (0.56, -0.22), (0.82, 0.90), (-0.82, 0.90)]),
        ("arc", (-0.40, -0.86, 0.40, 0.42), 180, 360, 0.10),
    ],
    "SCARVES": _scarf(),
    "SHIRTS": [
        ("poly", [(-0.46, -0.62), (0.46, -0.62), (0.46, 0.80), (-0.46, 0.80)]),
        ("poly", _SLEEVE_SHIRT),
        ("poly", _mirror(_SLEEVE_SHIRT)),
    ],
    "SHOES": [
        (
            "poly",
            [
                (-0.92, 0.40),
                (-0.90, -0.30),
                (-0.70, -0.44),
                (-0.40, -0.36),
                (-0.10, -0.14),
                (0.40, 0.00),
                (0.80, 0.14),
                (0.94, 0.40),
            ],
        ),
    ],
    "HATS": [
        ("chord", (-0.62, -0.62, 0.62, 0.90), 180, 360),
        ("ellipse", (-0.98, 0.08, 0.98, 0.44)),
    ],
}

# Category details drawn over the filled product: (primitive, colour key) with "shade" = a darker/lighter fill.
_DETAILS: dict[str, list[tuple[_Prim, str]]] = {
    "COATS": [
        (("line", [(-0.20, -0.84), (0.0, -0.40), (0.20, -0.84)], 0.035), "shade"),
        (("line", [(0.0, -0.40), (0.0, 0.98)], 0.03), "shade"),
    ],
    "BAGS": [
        (("line", [(-0.56, -0.22), (-0.62, 0.08), (0.0, 0.22), (0.62, 0.08), (0.56, -0.22)], 0.03), "shade"),
        (("poly", [(-0.08, 0.14), (0.08, 0.14), (0.08, 0.30), (-0.08, 0.30)]), "outline"),
    ],
    "SCARVES": [],
    "SHIRTS": [
        (("poly", [(-0.26, -0.66), (-0.02, -0.62), (-0.10, -0.38)]), "white"),
        (("poly", [(0.26, -0.66), (0.02, -0.62), (0.10, -0.38)]), "white"),
        (("line", [(0.0, -0.55), (0.0, 0.80)], 0.025), "shade"),
    ],
    "SHOES": [
        (("poly", [(-0.95, 0.38), (0.97, 0.38), (0.95, 0.58), (-0.93, 0.58)]), "white"),
        (("line", [(-0.56, -0.36), (-0.40, -0.14)], 0.035), "white"),
        (("line", [(-0.38, -0.30), (-0.22, -0.08)], 0.035), "white"),
        (("line", [(-0.20, -0.20), (-0.06, -0.02)], 0.035), "white"),
    ],
    "HATS": [
        (("poly", [(-0.61, 0.08), (0.61, 0.08), (0.62, 0.22), (-0.62, 0.22)]), "outline"),
    ],
}


class _Canvas:
    """Maps unit coordinates to pixels for one image (centre, half size)."""

    def __init__(self, cx: float, cy: float, half: float) -> None:
        self.cx, self.cy, self.half = cx, cy, half

    def pt(self, p: _Point) -> tuple[float, float]:
        return (self.cx + p[0] * self.half, self.cy + p[1] * self.half)

    def box(self, b: tuple[float, float, float, float], grow: float = 0.0) -> tuple[float, float, float, float]:
        x0, y0 = self.pt((b[0], b[1]))
        x1, y1 = self.pt((b[2], b[3]))
        return (x0 - grow, y0 - grow, x1 + grow, y1 + grow)

    def width(self, w: float) -> int:
        return max(1, round(w * self.half))


def _render(draw: ImageDraw.ImageDraw, canvas: _Canvas, prim: _Prim, fill, grow: int = 0) -> None:
    """Draw one primitive filled with `fill`, grown by `grow` pixels all round (for outlines)."""
    kind = prim[0]
    if kind == "poly":
        pts = [canvas.pt(p) for p in prim[1]]
        draw.polygon(pts, fill=fill, outline=fill if grow else None, width=2 * grow if grow else 1)
    elif kind == "ellipse":
        draw.ellipse(canvas.box(prim[1], grow), fill=fill)
    elif kind == "chord":
        draw.chord(canvas.box(prim[1], grow), prim[2], prim[3], fill=fill)
    elif kind == "arc":
        draw.arc(canvas.box(prim[1], grow), prim[2], prim[3], fill=fill, width=canvas.width(prim[4]) + 2 * grow)
    elif kind == "line":
        width = canvas.width(prim[2]) + 2 * grow
        draw.line([canvas.pt(p) for p in prim[1]], fill=fill, width=width, joint="curve")
    else:  # pragma: no cover - the tables above are fixed
        raise AssertionError(kind)


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A darker version of a light colour, a lighter version of a dark one (seams, lapels, placket)."""
    if sum(rgb) > 360:
        return tuple(int(c * 0.62) for c in rgb)
    return tuple(min(255, c + 70) for c in rgb)


def _line_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return _DARK_LINES if sum(rgb) > 360 else _LIGHT_LINES


def draw_product(category: str, colour: str, pattern: str, tier: int, *, size: int = 512, seed: int = 0) -> Image.Image:
    """Draw one product photo whose visible features determine its title, category and price.

    Args:
        category (`str`): One of `CATEGORIES` (the silhouette).
        colour (`str`): One of `COLOURS` (the fill colour).
        pattern (`str`): One of `PATTERNS` (``Check`` grid, ``Striped`` vertical lines, ``Plain``).
        tier (`int`): One of `TIERS` (number of gold dots under the product).
        size (`int`, *optional*, defaults to 512): Side of the square image in pixels (at least 64).
        seed (`int`, *optional*, defaults to 0): Jitter of position, scale, lighting, background and noise; the
            features above stay the same for every seed.

    Returns:
        `PIL.Image.Image`: A ``size``×``size`` RGB image.

    Raises:
        ValueError: An unknown feature value, or ``size < 64``.
    """
    _check_features(category, colour, pattern, tier)
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    rng = np.random.default_rng(seed)
    jx, jy, scale, phase_x, phase_y = rng.uniform((-0.03, -0.03, 0.92, 0.0, 0.0), (0.03, 0.03, 1.04, 1.0, 1.0))
    tint = rng.integers(-6, 7, size=3)
    light_x, light_y = rng.uniform(-9.0, 9.0, size=2)

    background = tuple(int(c + t) for c, t in zip(BACKDROPS[category], tint, strict=True))
    image = Image.new("RGB", (size, size), background)
    canvas = _Canvas((0.5 + jx) * size, (0.45 + jy) * size, 0.36 * size * scale)
    draw = ImageDraw.Draw(image)
    shape = _SHAPES[category]

    # 1. dark outline: the silhouette grown by a few pixels
    grow = max(1, round(size / 170))
    for prim in shape:
        _render(draw, canvas, prim, _OUTLINE, grow)

    # 2. fill colour + pattern, pasted through the silhouette mask
    fill = COLOURS[colour]
    layer = Image.new("RGB", (size, size), fill)
    if pattern != "Plain":
        _draw_pattern(ImageDraw.Draw(layer), canvas, size, pattern, _line_colour(fill), (phase_x, phase_y))
    mask = Image.new("L", (size, size), 0)
    mask_draw = ImageDraw.Draw(mask)
    for prim in shape:
        _render(mask_draw, canvas, prim, 255)
    image.paste(layer, (0, 0), mask)

    # 3. category details (collar, sole, lapels, clasp, hat band)
    colours = {"shade": _shade(fill), "white": _WHITE, "outline": _OUTLINE}
    for prim, key in _DETAILS[category]:
        if prim[0] == "poly":
            draw.polygon([canvas.pt(p) for p in prim[1]], fill=colours[key], outline=_OUTLINE, width=max(1, grow))
        else:
            _render(draw, canvas, prim, colours[key])

    # 4. tier: gold dots in fixed slots (left to right) under the product
    radius = 0.065 * size  # 22 px at 336: each dot covers a 28-px image token or more
    dot_y = canvas.cy + 1.2 * 0.36 * size
    for slot in range(tier):
        dot_x = canvas.cx + (slot - 1) * 3.0 * radius
        draw.ellipse(
            (dot_x - radius, dot_y - radius, dot_x + radius, dot_y + radius),
            fill=_GOLD,
            outline=_GOLD_EDGE,
            width=max(1, round(radius / 6)),
        )

    # 5. lighting gradient + pixel noise over the whole photo, added in C by ImageChops (offset keeps it unsigned)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    light = (light_y * ramp[:, None] + light_x * ramp[None, :]).astype(np.int16) + (_FIELD_OFFSET - 3)
    field = (light + rng.integers(0, 7, size=(size, size), dtype=np.uint8)).astype(np.uint8)
    return ImageChops.add(image, Image.fromarray(field, mode="L").convert("RGB"), scale=1.0, offset=-_FIELD_OFFSET)


def _draw_pattern(
    draw: ImageDraw.ImageDraw,
    canvas: _Canvas,
    size: int,
    pattern: str,
    rgb: tuple[int, int, int],
    phase: tuple[float, float],
) -> None:
    """Lines over the whole layer (the mask clips them): vertical always, horizontal too for ``Check``."""
    spacing = 0.30 * canvas.half
    thick = max(2, round(0.055 * canvas.half))
    thin = max(1, round(0.018 * canvas.half))
    directions = (0, 1) if pattern == "Check" else (0,)
    lines = [(0.0, thick)] + ([(0.5 * spacing, thin)] if pattern == "Check" else [])
    for axis in directions:
        pos = (canvas.cx if axis == 0 else canvas.cy) - math.ceil(size / spacing) * spacing + phase[axis] * spacing
        while pos < size + spacing:
            for offset, width in lines:
                p = pos + offset
                ends = [(p, 0), (p, size)] if axis == 0 else [(0, p), (size, p)]
                draw.line(ends, fill=rgb, width=width)
            pos += spacing


# --- catalog -----------------------------------------------------------------------------------------------------


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _unique_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    low, high = PRODUCT_CODE_RANGE
    codes: list[int] = []
    seen: set[int] = set()
    while len(codes) < n:
        for code in rng.integers(low, high + 1, size=n - len(codes) + 8).tolist():
            if code not in seen and len(codes) < n:
                seen.add(code)
                codes.append(code)
    return np.asarray(codes, dtype=np.int64)


def make_synthetic_catalog(
    out_dir: Path,
    n: int,
    seed: int = 0,
    *,
    base_url: str | None = None,
    image_size: int = 512,
    image_format: str = "JPEG",
    quirks: bool = True,
) -> Path:
    """Write an `n`-product catalog in the DBQ schema, with one drawn photo per product.

    Writes ``out_dir/catalog.csv`` (the 17 `DBQ_COLUMNS` in order) and ``out_dir/images/<index:05d>.jpg`` (``.png``
    for ``image_format="PNG"``); file names come from the row index only. Constant columns are those of the DBQ US
    scrape (``Burberry``, ``2023-11-17``, ``USA``, ``USD``, ``BURBERRY``, ``flg_discount = 0``, ``price =
    full_price``, ``*_eur = round(* × 0.92, 2)``). Per row, with a generator seeded by `seed`: category, colour,
    pattern and tier (uniform), ``category1_code`` (WOMAN/MAN/KIDS), a unique ``product_code`` in
    `PRODUCT_CODE_RANGE`; ``title`` = `make_title`, ``full_price`` = `full_price`, ``itemurl`` =
    ``https://us.burberry.com/<slug>-p<product_code>``, and the photo is ``draw_product(..., seed=image_seed(seed,
    index))``.

    Quirks (``quirks=True``; counts from `quirk_counts`, e.g. 4 + 2 + 2 for ``n = 200``; never in the first
    ``CLEAN_HEAD`` rows; rows chosen by a generator of their own, so the other rows are the same either way):

    - ``imageurl = "N.A."``, DBQ's placeholder, and no image file;
    - shared image: a later row is the same product as an earlier one (same features, title, price) listed under
      another ``category1_code`` with its own ``product_code``, and reuses the earlier row's ``imageurl`` (no file
      of its own);
    - near-duplicate title: a later row is the same product as an earlier one with its own photo and
      ``product_code``, titled in lower case with a double space and a trailing space (``"navy  check coat "``),
      so it only matches the earlier title after normalisation.

    Args:
        out_dir (`Path`): Output folder (created if needed; existing files with the same names are overwritten).
        n (`int`): Number of products (rows), at least 1.
        seed (`int`, *optional*, defaults to 0): Seed of everything; the same arguments give byte-identical files.
        base_url (`str`, *optional*): If given, ``imageurl`` is ``base_url.rstrip("/") + "/images/00001.jpg"``
            instead of the relative path ``images/00001.jpg``.
        image_size (`int`, *optional*, defaults to 512): Side of the square images in pixels.
        image_format (`str`, *optional*, defaults to ``"JPEG"``): ``"JPEG"`` (quality 92, 4:4:4) or ``"PNG"``.
        quirks (`bool`, *optional*, defaults to `True`): Add the realism quirks above.

    Returns:
        `Path`: The path of ``catalog.csv``.

    Raises:
        ValueError: ``n < 1`` or an unsupported `image_format`.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    fmt = image_format.upper()
    if fmt not in _EXTENSIONS:
        raise ValueError(f"unsupported image_format {image_format!r}; expected one of {tuple(_EXTENSIONS)}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    prefix = "" if base_url is None else base_url.rstrip("/") + "/"

    rng = np.random.default_rng(seed)
    cat_idx = rng.integers(0, len(CATEGORIES), size=n)
    colour_idx = rng.integers(0, len(COLOURS), size=n)
    pattern_idx = rng.integers(0, len(PATTERNS), size=n)
    tier_idx = rng.integers(0, len(TIERS), size=n)
    cat1_idx = rng.choice(len(CATEGORY1), size=n, p=_CATEGORY1_P)
    codes = _unique_codes(rng, n)

    colour_names = tuple(COLOURS)
    rows = [
        {
            "category": CATEGORIES[cat_idx[i]],
            "colour": colour_names[colour_idx[i]],
            "pattern": PATTERNS[pattern_idx[i]],
            "tier": TIERS[tier_idx[i]],
            "category1": CATEGORY1[cat1_idx[i]],
            "image_of": i,  # row whose file this row's imageurl names; None = "N.A."
            "messy_title": False,
        }
        for i in range(n)
    ]

    counts = quirk_counts(n, quirks)
    if counts.rows:
        qrng = np.random.default_rng([seed, 0x51])
        picked = qrng.choice(np.arange(CLEAN_HEAD, n), size=counts.rows, replace=False).tolist()
        for i in picked[: counts.missing_image]:
            rows[i]["image_of"] = None
        rest = picked[counts.missing_image :]
        pairs = [sorted(rest[2 * k : 2 * k + 2]) for k in range(len(rest) // 2)]
        for k, (src, dup) in enumerate(pairs):
            for key in ("category", "colour", "pattern", "tier"):
                rows[dup][key] = rows[src][key]
            if k < counts.shared_image:
                rows[dup]["image_of"] = src
                others = [c for c in CATEGORY1 if c != rows[src]["category1"]]
                rows[dup]["category1"] = others[k % len(others)]
            else:
                rows[dup]["messy_title"] = True

    ext = _EXTENSIONS[fmt]
    records = []
    for i, row in enumerate(rows):
        title = make_title(row["category"], row["colour"], row["pattern"])
        price = full_price(row["category"], row["tier"])
        shown = title
        if row["messy_title"]:
            words = title.lower().split()
            shown = words[0] + "  " + " ".join(words[1:]) + " "
        image_url = MISSING_IMAGE if row["image_of"] is None else f"{prefix}images/{row['image_of']:05d}{ext}"
        eur = round(price * EUR_PER_USD, 2)
        records.append(
            (
                "Burberry",
                "2023-11-17",
                "USA",
                "USD",
                "BURBERRY",
                row["category1"],
                CATEGORY2[row["category"]],
                row["category"],
                int(codes[i]),
                shown,
                f"https://us.burberry.com/{_slug(title)}-p{codes[i]}",
                image_url,
                price,
                price,
                eur,
                eur,
                0,
            )
        )
    frame = pd.DataFrame.from_records(records, columns=list(DBQ_COLUMNS))
    frame = frame.astype(
        {"product_code": "int64", "flg_discount": "int64", **dict.fromkeys(DBQ_COLUMNS[12:16], "float64")}
    )
    csv_path = out_dir / "catalog.csv"
    frame.to_csv(csv_path, index=False, lineterminator="\n")

    jobs = [i for i, row in enumerate(rows) if row["image_of"] == i]
    save_kwargs = {"quality": JPEG_QUALITY, "subsampling": 0, "optimize": False} if fmt == "JPEG" else {}

    def write(i: int) -> None:
        row = rows[i]
        image = draw_product(
            row["category"], row["colour"], row["pattern"], row["tier"], size=image_size, seed=image_seed(seed, i)
        )
        image.save(out_dir / "images" / f"{i:05d}{ext}", format=fmt, **save_kwargs)

    _run_parallel(write, jobs)
    logger.info(
        "synthetic catalog %s: %d rows, %d images; quirks: %d N.A. imageurl, %d shared imageurl, "
        "%d near-duplicate titles",
        csv_path,
        n,
        len(jobs),
        counts.missing_image,
        counts.shared_image,
        counts.near_duplicate_title,
    )
    return csv_path


def _run_parallel(fn: Callable[[int], None], items: list[int], workers: int = 2) -> None:
    """Run `fn` on every item; two threads overlap JPEG encoding and numpy work (both release the GIL)."""
    if len(items) < 8:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(fn, items):
            pass


MIXED_SHAPES = ((256, 256), (448, 224), (224, 448))  # square, wide (1x2 crops at num_crops 4), tall (2x1)


def reshape_photos(catalog: Path, shapes: tuple[tuple[int, int], ...] = MIXED_SHAPES) -> None:
    """Resize a synth catalog's photos round-robin (by file name order) to ``shapes``, in place.

    Real catalogs mix portrait, landscape and square photos; this gives a drawn catalog the same spread, so its
    batches mix crop grids and token counts (what length-grouped sampling and padding are about).

    Args:
        catalog (`Path`): The ``catalog.csv`` written by `make_synthetic_catalog` (its photos are in ``images/``).
        shapes: ``(width, height)`` sizes; photo ``i`` gets ``shapes[i % len(shapes)]``.
    """
    for i, path in enumerate(sorted((Path(catalog).parent / "images").glob("*.*"))):
        with Image.open(path) as image:
            if image.size == shapes[i % len(shapes)]:
                continue
            resized = image.convert("RGB").resize(shapes[i % len(shapes)], Image.Resampling.BILINEAR)
        if path.suffix == ".jpg":
            resized.save(path, quality=90)
        else:
            resized.save(path)
