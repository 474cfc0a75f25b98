"""The human report of a `phi3v evaluate` run: OUT/report.md (+ OUT/plots/*.png) and a self-contained OUT/report.html.

`write_report(out_dir, results, records, load_image)` takes the content of metrics.json (``results``), the lines of
predictions.jsonl (``records``) and a function that returns a test row's image, and writes:

- ``report.md``: summary, verdicts, headline table, plots (linked as ``plots/<name>.png``), examples, per-category
  table, parse failures, data failures, run details and a legend;
- ``plots/price_scatter.png``, ``plots/ape_histogram.png``, ``plots/confusion_matrix.png``, ``plots/examples.png``;
- ``report.html``: the same content with the plots embedded as base64 data URIs and inline CSS; it loads nothing
  from anywhere (no scripts, no links, no fonts).

Both documents are built from one list of blocks (`_build_blocks`), so they always say the same things. Everything
that comes from the data or the model is escaped for its target (HTML entities, Markdown backslash escapes, code
spans with a long enough backtick fence). Missing and NaN numbers print as "—".

`verdicts(results)` gives the plain-English conclusions (the model's price coverage, baselines beaten or not on the
same rows and the same score, whether the model uses the image, a model that never followed the template, the effect
of constrained decoding); the evaluator also prints them. Every price score compared covers every row, a missing
price scored as a predicted price of 0 (`phi3v.metrics.price_metrics`); the scores over the priced answers only
(``*_parsed``) have a row of their own in the headline table and are never used to call a winner.
`render_plots(results, records, load_image)` gives the PNG bytes of each plot by name. Plots are drawn with the Agg
backend on `matplotlib.figure.Figure` objects (no pyplot state), so this module is safe in any thread or process.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from phi3v.metrics import SPLIT_OPTIMAL

logger = logging.getLogger(__name__)

NA = "—"
"""What a missing or NaN number prints as."""

PLOT_NAMES = ("price_scatter", "ape_histogram", "confusion_matrix", "examples")
"""The plots `render_plots` draws, in report order; each is written as ``plots/<name>.png``."""

MAX_PLOT_BYTES = 100_000
"""A plot PNG above this size is re-encoded with fewer colours, then at a lower resolution, until it fits."""

THUMBNAIL_SIDE = 160
"""Example images are shrunk to fit a square of this many pixels."""

MAX_EXAMPLES = 12
MAX_PARSE_FAILURES_SHOWN = 10
_RAW_SHOWN_CHARS = 400

_GREEN = "#2e7d32"
_RED = "#c62828"

# Percent-like metrics print as percentages (SMAPE, a fraction in [0, 2], as 0% to 200%); the rest as plain numbers.
# A ``_parsed`` score prints as its all-rows counterpart.
_PARSED = "_parsed"
_PERCENT_KEYS = frozenset(
    {
        "parse_rate",
        "price_coverage",
        "price_mape",
        "price_smape",
        "price_ape_median",
        "price_within_10",
        "price_within_25",
        "category_accuracy",
        "title_exact_match",
    }
)
_COUNT_KEYS = frozenset({"n", "price_n", "parse_failures"})

# (column header, metric key) of the headline table.
HEADLINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Parse rate", "parse_rate"),
    ("Price coverage", "price_coverage"),
    ("Price median APE", "price_ape_median"),
    ("Price MAPE", "price_mape"),
    ("Price SMAPE", "price_smape"),
    ("Price within 10%", "price_within_10"),
    ("Price within 25%", "price_within_25"),
    ("Price RMSLE", "price_rmsle"),
    ("Category accuracy", "category_accuracy"),
    ("Category macro-F1", "category_macro_f1"),
    ("Title exact", "title_exact_match"),
    ("Title similarity", "title_similarity"),
    ("Title token F1", "title_token_f1"),
)

PER_CATEGORY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("n", "n"),
    ("Parse rate", "parse_rate"),
    ("Price median APE", "price_ape_median"),
    ("Price SMAPE", "price_smape"),
    ("Price within 25%", "price_within_25"),
    ("Price coverage", "price_coverage"),
    ("Category accuracy (recall)", "category_accuracy"),
    ("Title similarity", "title_similarity"),
)

# The field a baseline predicts -> the metric compared when the baseline names none (its ``metric``).
_FIELD_METRIC: dict[str, str] = {
    "price": "price_ape_median",
    "category": "category_accuracy",
    "title": "title_similarity",
}
# Metric -> (higher is better, how it is named in a sentence).
_METRIC_INFO: dict[str, tuple[bool, str]] = {
    "price_ape_median": (False, "median price APE"),
    "price_mape": (False, "price MAPE"),
    "price_smape": (False, "price SMAPE"),
    "price_within_10": (True, "share of prices within 10%"),
    "price_within_25": (True, "share of prices within 25%"),
    "price_rmsle": (False, "price RMSLE"),
    "price_mae": (False, "price MAE"),
    "category_accuracy": (True, "category accuracy"),
    "title_similarity": (True, "title similarity"),
}
_KEY_METRICS = ("price_ape_median", "category_accuracy", "title_similarity")  # the image and constrained verdicts
_METRIC_LABEL = {metric: label for metric, (_higher, label) in _METRIC_INFO.items()}
_METRIC_HIGHER_BETTER = {metric: higher for metric, (higher, _label) in _METRIC_INFO.items()}

_MODEL_KIND = {"adapter": "LoRA adapter", "full": "fully fine-tuned model", "base": "base model, not fine-tuned"}

LEGEND: tuple[tuple[str, str], ...] = (
    ("Parse rate", "share of answers that follow the answer template with every field readable."),
    (
        "Price coverage",
        "share of answers with a usable price: one number of 0 or more (an answer of 0 is a price, and scored).",
    ),
    (
        "Missing prices",
        "every price score covers every row, the model's and the baselines' alike: a row without a usable price "
        "is scored as a predicted price of 0, which is an APE of 100%, an SMAPE of 200% (the worst), a miss for "
        "within 10% / 25%, and ln(1 + true price) for RMSLE. Leaving a price out never helps SMAPE or a within "
        "share, and helps APE only over a price more than twice the truth. The row "
        "“Model, priced answers only” gives the same scores over the answers with a price alone; it describes the "
        "prices given and is never compared with a baseline.",
    ),
    (
        "APE",
        "absolute percentage error of a price, |predicted - true| / true; the median APE is the typical error, "
        "MAPE its mean, which large misses dominate.",
    ),
    ("Within 10% / 25%", "share of rows priced no more than 10% / 25% off."),
    (
        "SMAPE",
        "symmetric APE, mean of 2 |predicted - true| / (|predicted| + |true|), the Amazon ML Challenge 2025 pricing "
        "metric: over- and under-estimates weigh alike; printed in percent, 0% to 200% (metrics.json holds the "
        "fraction, 0 to 2).",
    ),
    (
        "RMSLE",
        "root mean squared error of ln(1 + price): a ratio error (0.1 ≈ 10% off for prices well above 1) that "
        "penalises big misses.",
    ),
    ("Category accuracy", "share of answers with exactly the right category (case and spaces ignored)."),
    (
        "Macro-F1",
        "the F1 score (harmonic mean of precision and recall) of each category, averaged with equal weight, so "
        "rare categories count as much as common ones.",
    ),
    ("Title exact", "share of titles that match the truth exactly (case and spaces ignored)."),
    ("Title similarity", "normalised edit-distance similarity of the title to the truth, 0 to 1."),
    ("Token F1", "F1 of the words of the predicted title against the words of the true title, 0 to 1."),
    (
        "Blank-image ablation",
        "the same model answers again with a blank image in place of each photo; if its scores hardly change, "
        "it is answering from the prompt and its priors, not from the photo.",
    ),
    (
        "Baselines",
        "simple predictors without the model, learnt from the training split and scored on the same rows with "
        "the same definitions: the median price, the most frequent category or title, and the price baselines "
        "per true category (given the category the model must read from the photo). A “category … optimal "
        "price” baseline predicts, for each category, the single price that scores best on its metric over the "
        "training split. No predictor with one price per category does better on the training split (for the "
        "median APE: within each category, since a median is no sum over categories); on the evaluated split it "
        "is a reference, not a bound (a constant fitted to these rows could do better). Each is compared on its "
        "own metric; a useful model beats each on its field.",
    ),
)


# --------------------------------------------------------------------------------------------------- formatting


def _num(value: Any) -> float | None:
    """A finite float, or None for None, NaN, infinities, booleans and non-numbers."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def format_percent(value: Any, digits: int = 1) -> str:
    """``0.123`` -> ``"12.3%"``; missing or NaN -> ``"—"``."""
    number = _num(value)
    return NA if number is None else f"{number * 100:.{digits}f}%"


def format_number(value: Any, digits: int = 3) -> str:
    """``0.12345`` -> ``"0.123"``; missing or NaN -> ``"—"``."""
    number = _num(value)
    return NA if number is None else f"{number:.{digits}f}"


def format_price(value: Any) -> str:
    """``2490.0`` -> ``"2,490"``, ``89.9`` -> ``"89.90"``; missing or NaN -> ``"—"``."""
    number = _num(value)
    if number is None:
        return NA
    return f"{number:,.0f}" if number == round(number) else f"{number:,.2f}"


def format_metric(key: str, value: Any) -> str:
    """One metric as the report prints it: rates as percentages, counts as integers, MAE as a price (a ``_parsed``
    score as the score it restricts)."""
    key = key.removesuffix(_PARSED)
    if key in _PERCENT_KEYS:
        return format_percent(value)
    if key in _COUNT_KEYS:
        number = _num(value)
        return NA if number is None else f"{number:.0f}"
    if key == "price_mae":
        return format_price(value)
    return format_number(value)


def _baseline_name(key: str) -> str:
    return key.replace("_", " ")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _metrics(mapping: Any) -> Mapping[str, Any]:
    return mapping if isinstance(mapping, Mapping) else {}


# ----------------------------------------------------------------------------------------------------- verdicts


def _comparison_details(before: Mapping[str, Any], after: Mapping[str, Any], joiner: str) -> str:
    parts = [
        f"{_METRIC_LABEL[key]} {format_metric(key, before.get(key))}{joiner}{format_metric(key, after.get(key))}"
        for key in _KEY_METRICS
    ]
    return ", ".join(parts)


def _worse_count(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[int, int]:
    """How many of the key metrics get worse / better from ``before`` to ``after``."""
    worse = better = 0
    for key in _KEY_METRICS:
        b, a = _num(before.get(key)), _num(after.get(key))
        if a is None or b is None or a == b:
            continue
        if (a < b) == _METRIC_HIGHER_BETTER[key]:
            worse += 1
        else:
            better += 1
    return worse, better


def _coverage_verdict(model: Mapping[str, Any]) -> str | None:
    coverage = _num(model.get("price_coverage"))
    if coverage is None or coverage >= 1:
        return None
    priced = format_metric("price_n", model.get("price_n"))
    parsed = format_metric("price_ape_median", model.get("price_ape_median_parsed"))
    return (
        f"The model gave a usable price for {format_percent(coverage)} of the rows ({priced} answers). Every price "
        "score compared below covers every row: a row without a price is scored as a predicted price of 0 (APE "
        f"100%, SMAPE 200%, outside every tolerance). Over its {priced} priced answers alone the median APE is "
        f"{parsed}, a figure that says nothing about the rows it left unpriced."
    )


def _baseline_note(key: str, baseline: Mapping[str, Any], metric: str, split: str) -> str:
    """What a price baseline is given and what it is optimal for, in one or two sentences (or nothing)."""
    note = ""
    if key.startswith("category_"):
        note += " That baseline uses the true category, which the model must read from the photo."
    optimal = baseline.get("optimal_for")
    label = _METRIC_LABEL.get(metric, metric)
    if optimal == metric and metric in SPLIT_OPTIMAL:
        note += (
            f" No predictor with one price per category has a better {label} on the training split; on the {split} "
            "split it is a reference, not a bound."
        )
    elif optimal == metric:
        note += (
            f" Its price for each category has the lowest {label} over that category's training prices (over the "
            f"whole training split other prices per category can do better: a median is no sum); on the {split} "
            "split it is a reference, not a bound."
        )
    elif isinstance(optimal, str):
        note += (
            f" Its price per category is the constant with the lowest {_METRIC_LABEL.get(optimal, optimal)} on the "
            f"training split, not the best for {_METRIC_LABEL.get(metric, metric)}."
        )
    return note


def _baseline_verdicts(model: Mapping[str, Any], baselines: Mapping[str, Any], split: str) -> list[str]:
    sentences = []
    for key, baseline in baselines.items():
        baseline = _metrics(baseline)
        fields = baseline.get("fields") or []
        scores = _metrics(baseline.get("metrics"))
        name = _baseline_name(str(key))
        for field in fields:
            if field not in _FIELD_METRIC:
                continue
            metric = _FIELD_METRIC[field]
            named = baseline.get("metric")
            if field == "price" and isinstance(named, str) and named in _METRIC_INFO:
                metric = named
            higher_better, label = _METRIC_INFO[metric]
            ours, theirs = _num(model.get(metric)), _num(scores.get(metric))
            shown = f"{label} {format_metric(metric, model.get(metric))} vs {format_metric(metric, scores.get(metric))}"
            direction = "higher" if higher_better else "lower"
            if ours is None or theirs is None:
                sentence = f"The model cannot be compared with the {name} baseline on {field} ({shown})."
            else:
                beats = ours > theirs if higher_better else ours < theirs
                verb = "beats" if beats else "does not beat"
                sentence = f"The model {verb} the {name} baseline on {field} ({shown}; {direction} is better)."
            if field == "price":
                sentence += _baseline_note(str(key), baseline, metric, split)
            sentences.append(sentence)
    return sentences


def _image_verdict(model: Mapping[str, Any], ablation: Any) -> str:
    if not isinstance(ablation, Mapping):
        return "The blank-image ablation was not run, so this report cannot say whether the model uses the image."
    blank = _metrics(ablation.get("metrics"))
    changed = _num(ablation.get("answers_changed"))
    changed_text = "" if changed is None else f"; {format_percent(changed)} of answers change"
    if not ablation.get("uses_image"):
        return (
            "The model is not using the image: with a blank image its answers score about the same "
            f"({_comparison_details(model, blank, ' with the photo vs ')} blank{changed_text})."
        )
    worse, better = _worse_count(model, blank)
    verb = "drop" if worse >= better else "change"
    return (
        f"The model uses the image: with a blank image its scores {verb} from "
        f"{_comparison_details(model, blank, ' to ')}{changed_text}."
    )


def _constrained_verdict(constrained: Any) -> str | None:
    if not isinstance(constrained, Mapping):
        return None
    free, forced = _metrics(constrained.get("free")), _metrics(constrained.get("constrained"))
    a, b = _num(free.get("parse_rate")), _num(forced.get("parse_rate"))
    if a is None or b is None or a == b:
        verb = "leaves the parse rate" if a is not None and a == b else "changes the parse rate"
        parse = f"{verb} {format_percent(a)} (free) vs {format_percent(b)} (constrained)"
    else:
        verb = "raises" if b > a else "lowers"
        parse = f"{verb} the parse rate from {format_percent(a)} (free) to {format_percent(b)} (constrained)"
    return f"Constrained decoding {parse}; {_comparison_details(free, forced, ' → ')}."


def verdicts(results: Mapping[str, Any]) -> list[str]:
    """Plain-English conclusions of an evaluation, one sentence (or two) per item.

    In order: a warning when no row was scored or no answer followed the template; the model's price coverage
    when it left rows unpriced; for each baseline and field it predicts, whether the model beats it on the same rows
    and the same score (price: the baseline's ``metric``, median APE by default, every row scored, a missing price
    as 0; category: higher accuracy; title: higher similarity; ties do not beat), with what a price baseline is
    given and optimal for; whether the model uses the image (blank-image ablation); the effect of constrained
    decoding when it was compared.

    Args:
        results (`Mapping`): The content of metrics.json.

    Returns:
        `list[str]`: The sentences.
    """
    model = _metrics(results.get("metrics"))
    counts = _metrics(results.get("counts"))
    sentences = []
    scored = _num(counts.get("scored"))
    parse_rate = _num(model.get("parse_rate"))
    if scored == 0:
        sentences.append("No row was scored (every image failed to load), so there are no model scores to judge.")
    elif parse_rate == 0:
        n = format_metric("n", model.get("n", scored))
        sentences.append(
            f"No answer followed the answer template (0 of {n} parsed), so the price, category and title scores "
            "are not meaningful."
        )
    coverage = _coverage_verdict(model) if scored != 0 else None
    if coverage:
        sentences.append(coverage)
    sentences += _baseline_verdicts(model, _metrics(results.get("baselines")), str(results.get("split") or "test"))
    sentences.append(_image_verdict(model, results.get("ablation")))
    constrained = _constrained_verdict(results.get("constrained"))
    if constrained:
        sentences.append(constrained)
    return sentences


# -------------------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _encode_png(fig: Figure, dpi: int, colours: int | None) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white", metadata={"Software": None})
    if colours is None:
        return buffer.getvalue()
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    quantized = image.quantize(colors=colours, dither=Image.Dither.NONE)
    out = io.BytesIO()
    quantized.save(out, format="PNG", optimize=True)
    return out.getvalue()


def figure_png(fig: Figure, max_bytes: int = MAX_PLOT_BYTES) -> bytes:
    """PNG bytes of a figure at 100 dpi; above ``max_bytes``, fewer colours and then fewer pixels until it fits."""
    attempts = ((100, None), (100, 256), (100, 64), (80, 64), (64, 64), (64, 32), (50, 32))
    png = b""
    for dpi, colours in attempts:
        png = _encode_png(fig, dpi, colours)
        if len(png) <= max_bytes:
            return png
    logger.warning("plot is %d bytes even at 50 dpi and 32 colours", len(png))
    return png


def _placeholder(message: str, title: str) -> bytes:
    fig = _figure(6, 3)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title, parse_math=False)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color="#666666", parse_math=False)
    return figure_png(fig)


def _scored(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if not r.get("error")]


def _parsed(record: Mapping[str, Any]) -> Mapping[str, Any]:
    return _metrics(record.get("parsed"))


def _truth(record: Mapping[str, Any]) -> Mapping[str, Any]:
    return _metrics(record.get("truth"))


def _record_scores(record: Mapping[str, Any]) -> Mapping[str, Any]:
    return _metrics(record.get("scores"))


def _record_ape(record: Mapping[str, Any]) -> float | None:
    ape = _num(_record_scores(record).get("price_ape"))
    if ape is not None:
        return ape
    predicted, true = _num(_parsed(record).get("price")), _num(_truth(record).get("price"))
    if predicted is None or true is None or true <= 0:
        return None
    return abs(predicted - true) / true


def plot_price_scatter(records: Sequence[Mapping[str, Any]]) -> bytes:
    """Predicted vs true price on log-log axes with the y = x line; parsed prices only, coloured by category_ok."""
    points = []
    for record in _scored(records):
        predicted, true = _num(_parsed(record).get("price")), _num(_truth(record).get("price"))
        if predicted is not None and true is not None and predicted > 0 and true > 0:
            points.append((true, predicted, bool(_record_scores(record).get("category_ok"))))
    title = "Predicted vs true price"
    if not points:
        return _placeholder("no parsed prices", title)
    fig = _figure(6, 5.5)
    ax = fig.add_subplot()
    data = np.array([(t, p) for t, p, _ok in points])
    ok = np.array([ok for _t, _p, ok in points])
    low, high = float(data.min()) / 1.25, float(data.max()) * 1.25
    ax.plot([low, high], [low, high], color="#555555", linewidth=1, linestyle="--", label="y = x (exact price)")
    for mask, colour, label in ((ok, _GREEN, "category right"), (~ok, _RED, "category wrong")):
        if mask.any():
            ax.scatter(data[mask, 0], data[mask, 1], s=18, alpha=0.7, color=colour, label=f"{label} ({mask.sum()})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal")
    ax.set_xlabel("true price")
    ax.set_ylabel("predicted price")
    ax.set_title(f"{title} ({len(points)} parsed prices)", parse_math=False)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def plot_ape_histogram(records: Sequence[Mapping[str, Any]]) -> bytes:
    """Histogram of the APE of parsed prices, clipped at 200% with an overflow bin, lines at 10% and 25%."""
    apes = [ape for ape in (_record_ape(r) for r in _scored(records)) if ape is not None]
    title = "Absolute percentage error of parsed prices"
    if not apes:
        return _placeholder("no parsed prices", title)
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    edges = [*np.linspace(0.0, 2.0, 21).tolist(), 2.1]
    values = np.clip(np.array(apes), 0.0, 2.05)
    counts, _edges, patches = ax.hist(values, bins=edges, color="#4c72b0", edgecolor="white")
    patches[-1].set_facecolor("#8c8c8c")
    overflow = int(counts[-1])
    for x, label in ((0.10, "10%"), (0.25, "25%")):
        ax.axvline(x, color=_RED, linestyle="--", linewidth=1)
        ax.text(x, 1.0, f" {label}", color=_RED, transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ticks = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.05]
    ax.set_xticks(ticks, [f"{t * 100:.0f}%" for t in ticks[:-1]] + [">200%"])
    ax.set_xlim(0, 2.1)
    ax.set_xlabel("APE = |predicted - true| / true")
    ax.set_ylabel("rows")
    median = float(np.median(apes))
    ax.set_title(
        f"{title} (n = {len(apes)}, median {median * 100:.1f}%, {overflow} above 200%)", parse_math=False, fontsize=10
    )
    fig.tight_layout()
    return figure_png(fig)


def plot_confusion_matrix(confusion: Mapping[str, Any]) -> bytes:
    """Heatmap of true (rows) vs predicted (columns) categories, coloured by row share, with counts annotated."""
    labels = [str(x) for x in confusion.get("labels") or []]
    columns = [str(x) for x in confusion.get("columns") or []]
    matrix = np.array(confusion.get("matrix") or [], dtype=float)
    title = "Category confusion matrix"
    if not labels or not columns or matrix.shape != (len(labels), len(columns)):
        return _placeholder("no scored categories", title)
    width = min(16.0, 3.0 + 0.45 * len(columns))
    height = min(16.0, 2.5 + 0.4 * len(labels))
    fig = _figure(width, height)
    ax = fig.add_subplot()
    row_sums = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, row_sums, out=np.zeros_like(matrix), where=row_sums > 0)
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    side = max(len(labels), len(columns))
    fontsize = 9 if side <= 15 else 8 if side <= 30 else 6
    for i in range(len(labels)):
        for j in range(len(columns)):
            count = int(matrix[i, j])
            if count == 0 and len(labels) * len(columns) > 225:
                continue  # big matrices: only non-zero cells, or the numbers drown the picture
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=fontsize, parse_math=False)
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=fontsize, parse_math=False)
    ax.set_yticks(range(len(labels)), labels, fontsize=fontsize, parse_math=False)
    ax.set_xlabel("predicted category")
    ax.set_ylabel("true category")
    ax.set_title(f"{title} (colour: share of the true category's rows)", parse_math=False, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def select_examples(records: Sequence[Mapping[str, Any]], limit: int = MAX_EXAMPLES) -> list[Mapping[str, Any]]:
    """Up to ``limit`` scored records, half with the category right and half wrong (the first ones of each, in
    file order); when one group is short the other fills in. Deterministic."""
    scored = _scored(records)
    right = [r for r in scored if _record_scores(r).get("category_ok")]
    wrong = [r for r in scored if not _record_scores(r).get("category_ok")]
    n_right = min(len(right), max(limit // 2, limit - len(wrong)))
    n_wrong = min(len(wrong), limit - n_right)
    return right[:n_right] + wrong[:n_wrong]


def _thumbnail(load_image: Callable[[int], Image.Image | None], index: int) -> Image.Image | None:
    try:
        image = load_image(index)
    except Exception as err:  # a broken image must not take the whole report down
        logger.warning("could not load the image of row %s for the report: %s", index, err)
        return None
    if image is None:
        return None
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE), "white")
    canvas.paste(image, ((THUMBNAIL_SIDE - image.width) // 2, (THUMBNAIL_SIDE - image.height) // 2))
    return canvas


def _wrap(text: str, width: int, lines: int) -> list[str]:
    wrapped = textwrap.wrap(" ".join(text.split()), width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = _truncate(wrapped[-1] + " …", width)
    return wrapped


def _printable(text: str) -> str:
    """Model output for a plot: control characters (a garbage model emits them; fonts have no glyph) shown as "�"."""
    return "".join(ch if ch.isprintable() or ch == " " else "\ufffd" for ch in text)


def _example_caption(record: Mapping[str, Any]) -> str:
    truth, parsed = _truth(record), _parsed(record)
    width = 36
    lines = [f"row {record.get('index')} · id {record.get('id')}"]
    lines += _wrap(f"True: {truth.get('title')}", width, 2)
    lines.append(f"   {truth.get('category')} · {format_price(truth.get('price'))}")
    if record.get("parse_ok"):
        lines += _wrap(f"Pred: {parsed.get('title')}", width, 2)
        ape = _record_ape(record)
        ape_text = "" if ape is None else f" (APE {ape * 100:.0f}%)"
        lines.append(f"   {parsed.get('category')} · {format_price(parsed.get('price'))}{ape_text}")
    else:
        lines += _wrap(f"Pred (did not parse): {record.get('raw') or '(empty)'}", width, 3)
    return "\n".join(_printable(line) for line in lines)


def plot_examples(records: Sequence[Mapping[str, Any]], load_image: Callable[[int], Image.Image | None]) -> bytes:
    """A grid of up to 12 example photos with truth and prediction under each, framed green (category right) or
    red (category wrong)."""
    examples = select_examples(records)
    title = "Examples"
    if not examples:
        return _placeholder("no scored rows", title)
    columns = min(4, len(examples))
    rows = math.ceil(len(examples) / columns)
    cell_w, cell_h, side, top = 2.4, 2.95, 1.6, 0.35
    fig = _figure(columns * cell_w, rows * cell_h + top)
    total_w, total_h = columns * cell_w, rows * cell_h + top
    fig.suptitle(
        "Examples: green frame = category right, red = wrong", fontsize=10, y=1 - 0.1 / total_h, parse_math=False
    )
    for k, record in enumerate(examples):
        r, c = divmod(k, columns)
        left = (c * cell_w + (cell_w - side) / 2) / total_w
        bottom = (total_h - top - r * cell_h - 0.1 - side) / total_h
        ax = fig.add_axes((left, bottom, side / total_w, side / total_h))
        thumb = _thumbnail(load_image, int(record.get("index", -1)))
        if thumb is None:
            ax.imshow(np.full((THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3), 230, dtype=np.uint8))
            ax.text(80, 80, "no image", ha="center", va="center", color="#666666", fontsize=9)
        else:
            ax.imshow(np.asarray(thumb), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        colour = _GREEN if _record_scores(record).get("category_ok") else _RED
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(4)
        ax.text(
            0.5,
            -0.05,
            _example_caption(record),
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=7.5,
            family="DejaVu Sans",
            parse_math=False,
            linespacing=1.3,
        )
    return figure_png(fig)


def render_plots(
    results: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    load_image: Callable[[int], Image.Image | None],
) -> dict[str, bytes]:
    """PNG bytes of every plot of the report, by name (`PLOT_NAMES`). A plot without data is a placeholder figure
    that says so ("no parsed prices"), never an error.

    Args:
        results (`Mapping`): The content of metrics.json (``confusion`` is read).
        records (`Sequence[Mapping]`): The lines of predictions.jsonl.
        load_image (`Callable[[int], PIL.Image.Image | None]`): A row's image by its ``index``, or None.

    Returns:
        `dict[str, bytes]`: ``price_scatter``, ``ape_histogram``, ``confusion_matrix``, ``examples``.
    """
    return {
        "price_scatter": plot_price_scatter(records),
        "ape_histogram": plot_ape_histogram(records),
        "confusion_matrix": plot_confusion_matrix(_metrics(results.get("confusion"))),
        "examples": plot_examples(records, load_image),
    }


# ------------------------------------------------------------------------------------------------ document model


class Code(NamedTuple):
    """Inline text shown verbatim (a code span)."""

    text: str


class Strong(NamedTuple):
    """Inline text shown in bold."""

    text: str


# An inline is plain text, Code, Strong, or a list of those. A block is one of:
#   ("h1" | "h2" | "h3", str)   ("p", inline)   ("ul", [inline, ...])   ("pre", str)
#   ("table", [header, ...], [[inline, ...], ...])   ("figure", plot name, alt text, caption)
Inline = Any
Block = tuple


def _headline_table(results: Mapping[str, Any]) -> list[Block]:
    model = _metrics(results.get("metrics"))
    rows: list[tuple[str, Mapping[str, Any], set[str] | None]] = [("Model", model, None)]
    if any(key.endswith(_PARSED) for key in model):  # the priced answers alone: every other cell "—"
        parsed = {key.removesuffix(_PARSED): value for key, value in model.items() if key.endswith(_PARSED)}
        rows.append((f"Model, priced answers only ({format_metric('price_n', model.get('price_n'))})", parsed, None))
    ablation = results.get("ablation")
    if isinstance(ablation, Mapping):
        rows.append((f"Model, {ablation.get('image') or 'blank'} image", _metrics(ablation.get("metrics")), None))
    constrained = results.get("constrained")
    if isinstance(constrained, Mapping):
        rows.append(("Model, free decoding", _metrics(constrained.get("free")), None))
        rows.append(("Model, constrained decoding", _metrics(constrained.get("constrained")), None))
    baselines = _metrics(results.get("baselines"))
    for key, baseline in baselines.items():
        baseline = _metrics(baseline)
        fields = set(baseline.get("fields") or [])
        rows.append((f"Baseline: {_baseline_name(str(key))}", _metrics(baseline.get("metrics")), fields))
    table_rows = []
    for name, scores, fields in rows:
        cells: list[Inline] = [name]
        for _header, key in HEADLINE_COLUMNS:
            group = key.split("_", 1)[0]
            predicted = fields is None or group not in _FIELD_METRIC or group in fields
            cells.append(format_metric(key, scores.get(key)) if predicted else NA)
        table_rows.append(cells)
    blocks: list[Block] = [("table", ["", *(h for h, _k in HEADLINE_COLUMNS)], table_rows)]
    if "price_coverage" in model:
        blocks.append(
            (
                "p",
                "Price scores cover every row: a row without a usable price is scored as a predicted price of 0 "
                "(APE 100%, SMAPE 200%, outside 10% / 25%). “Model, priced answers only” restricts them to the "
                "answers that gave a price; the baselines price every row (coverage 100%).",
            )
        )
    described = [
        [Strong(_baseline_name(str(key))), f": {_metrics(b).get('description') or 'no description'}"]
        for key, b in baselines.items()
    ]
    if described:
        blocks.append(("p", "Baselines (each predicts only its own field; the other cells show “—”):"))
        blocks.append(("ul", described))
    return blocks


def _summary(results: Mapping[str, Any], sentences: Sequence[str]) -> list[Inline]:
    counts = _metrics(results.get("counts"))
    model = _metrics(results.get("metrics"))
    kind = _MODEL_KIND.get(str(results.get("model_kind")), str(results.get("model_kind")))
    rows, scored = format_metric("n", counts.get("rows")), format_metric("n", counts.get("scored"))
    failures = _num(counts.get("image_failures")) or 0
    failed = f" ({failures:.0f} image{'s' if failures != 1 else ''} failed to load)" if failures else ""
    parse_failures, scored_n = _num(counts.get("parse_failures")), _num(counts.get("scored"))
    parsed_n = None if parse_failures is None or scored_n is None else scored_n - parse_failures
    parsed = (
        f"{format_metric('n', parsed_n)} answers followed the answer template "
        f"(parse rate {format_percent(model.get('parse_rate'))})"
    )
    return [
        "This report evaluates ",
        Code(str(results.get("model"))),
        f" ({kind}) on the {results.get('split')} split of ",
        Code(str(results.get("data"))),
        f": {scored} of {rows} rows were scored{failed}; {parsed}. ",
        *(
            [
                f"It answered with settings other than the trained ones ({', '.join(map(str, overrides))}): "
                "see Run details. "
            ]
            if (overrides := results.get("overrides"))
            else []
        ),
        " ".join(sentences),
    ]


def _examples_table(records: Sequence[Mapping[str, Any]]) -> Block:
    rows = []
    for record in select_examples(records):
        truth, parsed = _truth(record), _parsed(record)
        true_text = f"{truth.get('title')} · {truth.get('category')} · {format_price(truth.get('price'))}"
        if record.get("parse_ok"):
            predicted: Inline = (
                f"{parsed.get('title')} · {parsed.get('category')} · {format_price(parsed.get('price'))}"
            )
        else:
            predicted = ["did not parse: ", Code(_truncate(str(record.get("raw") or ""), _RAW_SHOWN_CHARS))]
        ok = "yes" if _record_scores(record).get("category_ok") else "no"
        ape = _record_ape(record)
        rows.append([str(record.get("index")), str(record.get("id")), true_text, predicted, ok, format_percent(ape)])
    return ("table", ["Row", "ID", "Truth", "Prediction", "Category right", "Price APE"], rows)


def _per_category(results: Mapping[str, Any]) -> list[Block]:
    per_category = _metrics(results.get("per_category"))
    if not per_category:
        return [("p", "No per-category scores.")]
    order = sorted(per_category, key=lambda c: (-(_num(_metrics(per_category[c]).get("n")) or 0), str(c)))
    rows = [
        [str(c), *(format_metric(key, _metrics(per_category[c]).get(key)) for _h, key in PER_CATEGORY_COLUMNS)]
        for c in order
    ]
    return [("table", ["Category", *(h for h, _k in PER_CATEGORY_COLUMNS)], rows)]


def _parse_failures(results: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> list[Block]:
    failed = [r for r in _scored(records) if not r.get("parse_ok")]
    counts = _metrics(results.get("counts"))
    count = _num(counts.get("parse_failures"))
    count_text = format_metric("n", count if count is not None else len(failed))
    scored = format_metric("n", counts.get("scored"))
    blocks: list[Block] = [("p", f"{count_text} of {scored} scored answers did not follow the answer template.")]
    if failed:
        shown = failed[:MAX_PARSE_FAILURES_SHOWN]
        if len(failed) > len(shown):
            blocks.append(("p", f"The first {len(shown)}:"))
        items = []
        for record in shown:
            missing = ", ".join(str(m) for m in record.get("missing") or []) or "nothing"
            raw = record.get("raw")
            raw_inline: Inline = "(no output)" if not raw else Code(_truncate(str(raw), _RAW_SHOWN_CHARS))
            items.append([f"Row {record.get('index')} (id {record.get('id')}), missing {missing}: ", raw_inline])
        blocks.append(("ul", items))
    return blocks


def _data_failures(results: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> list[Block]:
    failures = [dict(f) for f in results.get("image_failures") or [] if isinstance(f, Mapping)]
    listed = {f.get("index") for f in failures}
    failures += [
        {"index": r.get("index"), "id": r.get("id"), "error": r.get("error")}
        for r in records
        if r.get("error") and r.get("index") not in listed
    ]
    if not failures:
        return [("p", "None: every image loaded.")]
    rows = [[str(f.get("index")), str(f.get("id")), str(f.get("error"))] for f in failures]
    return [
        ("p", f"{len(failures)} row(s) could not be scored (their images failed; they count in no score):"),
        ("table", ["Row", "ID", "Error"], rows),
    ]


def _run_details(results: Mapping[str, Any]) -> list[Block]:
    decoding = _metrics(results.get("decoding"))
    throughput = _metrics(results.get("throughput"))
    counts = _metrics(results.get("counts"))
    settings = ", ".join(f"{str(k).replace('_', ' ')} {v}" for k, v in decoding.items()) or NA
    speed = format_number(throughput.get("images_per_second"), 2)
    seconds = format_number(throughput.get("seconds"), 1)
    count_text = ", ".join(f"{str(k).replace('_', ' ')} {format_metric('n', v)}" for k, v in counts.items()) or NA
    overrides = results.get("overrides") or {}
    changed = "; ".join(
        f"{str(name).replace('_', ' ')} {change.get('used')!r} instead of the trained {change.get('trained')!r}"
        for name, change in overrides.items()
        if isinstance(change, Mapping)
    )
    return [
        (
            "ul",
            [
                ["Model: ", Code(str(results.get("model"))), f" ({results.get('model_kind')})"],
                ["Data: ", Code(str(results.get("data"))), f", split {results.get('split')}"],
                f"Rows: {count_text}",
                f"Decoding: {settings}",
                f"Throughput: {speed} images/s ({seconds} s in total)",
                f"Trained settings overridden (--override-trained): {changed}"
                if changed
                else (
                    "Trained settings: none (a base model, answering zero-shot)"
                    if results.get("model_kind") == "base"
                    else "Trained settings: used as trained (num crops, prompt and answer template)"
                ),
            ],
        ),
        ("p", "Prompt:"),
        ("pre", str(results.get("prompt"))),
        ("p", "Answer template:"),
        ("pre", str(results.get("answer_template"))),
    ]


_CAPTIONS = {
    "price_scatter": (
        "Predicted vs true price",
        "Predicted vs true price, log-log, positive parsed prices only (rows without a price, and prices of 0, "
        "cannot be drawn; price coverage says how many rows had one); points on the dashed line are exact; green: "
        "category right, red: wrong.",
    ),
    "ape_histogram": (
        "APE histogram",
        "Absolute percentage error of the parsed prices only (the rows without a price, scored as APE 100% in the "
        "headline scores, are not in it); the last bar collects everything above 200%; dashed lines at 10% and 25%.",
    ),
    "confusion_matrix": (
        "Category confusion matrix",
        "True category (rows) vs predicted category (columns, “(unparsed)” when no category was read); numbers are "
        "counts, colour is the share of the row.",
    ),
    "examples": (
        "Examples",
        "The first answers with the category right (green frame) and the first with it wrong (red frame).",
    ),
}


def _build_blocks(
    results: Mapping[str, Any], records: Sequence[Mapping[str, Any]], sentences: Sequence[str]
) -> list[Block]:
    blocks: list[Block] = [("h1", f"Evaluation report: {results.get('model')}"), ("p", _summary(results, sentences))]
    blocks += [("h2", "Verdicts"), ("ul", list(sentences))]
    blocks += [("h2", "Headline scores"), *_headline_table(results)]
    blocks.append(("h2", "Plots"))
    for name in PLOT_NAMES[:3]:
        alt, caption = _CAPTIONS[name]
        blocks += [("h3", alt), ("figure", name, alt, caption)]
    alt, caption = _CAPTIONS["examples"]
    blocks += [("h2", "Examples"), ("figure", "examples", alt, caption), _examples_table(records)]
    blocks += [("h2", "Per category"), *_per_category(results)]
    blocks += [("h2", "Parse failures"), *_parse_failures(results, records)]
    blocks += [("h2", "Data failures"), *_data_failures(results, records)]
    blocks += [("h2", "Run details"), *_run_details(results)]
    blocks += [("h2", "How to read this report"), ("ul", [[Strong(term), f": {text}"] for term, text in LEGEND])]
    return blocks


# ------------------------------------------------------------------------------------------------------ markdown

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#])")


def markdown_text(text: str) -> str:
    """Plain text for Markdown: each whitespace run (line breaks included) made one space, Markdown and HTML
    metacharacters backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", re.sub(r"\s+", " ", str(text)))


def markdown_code(text: str, in_table: bool = False) -> str:
    """A Markdown code span showing ``text`` verbatim: the fence is one backtick longer than the longest backtick
    run inside, line breaks show as ⏎ (a code span cannot hold one safely), and in a table ``|`` is escaped."""
    text = re.sub(r"\r\n|\r|\n", "⏎", str(text))
    if not text:
        return "(empty)"
    if in_table:
        text = text.replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    if text.startswith(("`", " ")) or text.endswith(("`", " ")):
        text = f" {text} "  # CommonMark strips one space each side when both are there
    return f"{fence}{text}{fence}"


def _md_inline(item: Inline, in_table: bool = False) -> str:
    if isinstance(item, Code):
        return markdown_code(item.text, in_table)
    if isinstance(item, Strong):
        return f"**{markdown_text(item.text)}**"
    if isinstance(item, (list, tuple)):
        return "".join(_md_inline(part, in_table) for part in item)
    return markdown_text(str(item))


def _md_fence(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * (longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _is_number_cell(cell: Inline) -> bool:
    return isinstance(cell, str) and re.fullmatch(r"[\d.,%+\-—]*", cell) is not None


def render_markdown(blocks: Sequence[Block]) -> str:
    """Markdown of the report blocks; figures link ``plots/<name>.png``."""
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {markdown_text(block[1])}")
        elif kind == "p":
            out.append(_md_inline(block[1]))
        elif kind == "ul":
            out.append("\n".join(f"- {_md_inline(item)}" for item in block[1]))
        elif kind == "pre":
            out.append(_md_fence(block[1]))
        elif kind == "table":
            headers, rows = block[1], block[2]
            numeric = [k > 0 and all(_is_number_cell(row[k]) for row in rows) for k in range(len(headers))]
            lines = [
                "| " + " | ".join(markdown_text(h) for h in headers) + " |",
                "|" + "|".join("--:" if right else "---" for right in numeric) + "|",
            ]
            lines += ["| " + " | ".join(_md_inline(cell, in_table=True) for cell in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "figure":
            _kind, name, alt, caption = block
            out.append(f"![{markdown_text(alt)}](plots/{name}.png)\n\n*{markdown_text(caption)}*")
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1f2328;
       margin: 0; background: #f6f8fa; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; background: #ffffff; }
h1 { font-size: 1.7em; border-bottom: 1px solid #d0d7de; padding-bottom: 0.3em; }
h2 { font-size: 1.35em; margin-top: 1.8em; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
h3 { font-size: 1.1em; margin-top: 1.4em; }
p, li { line-height: 1.5; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; vertical-align: top; }
th.text, td.text { text-align: left; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.88em;
            background: #f0f2f4; border-radius: 4px; }
code { padding: 1px 4px; white-space: pre-wrap; word-break: break-word; }
pre { padding: 10px 12px; white-space: pre-wrap; word-break: break-word; }
figure { margin: 0.8em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.9em; margin-top: 4px; }
"""


def _html_inline(item: Inline) -> str:
    if isinstance(item, Code):
        return f"<code>{html.escape(item.text)}</code>" if item.text else "(empty)"
    if isinstance(item, Strong):
        return f"<strong>{html.escape(item.text)}</strong>"
    if isinstance(item, (list, tuple)):
        return "".join(_html_inline(part) for part in item)
    return html.escape(str(item))


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(blocks: Sequence[Block], plots: Mapping[str, bytes], title: str) -> str:
    """A self-contained HTML page of the report blocks: inline CSS, plots as data URIs, no scripts, no links."""
    body: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_html_inline(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>\n" + "\n".join(f"<li>{_html_inline(item)}</li>" for item in block[1]) + "\n</ul>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(block[1])}</pre>")
        elif kind == "table":
            headers, rows = block[1], block[2]
            numeric = [k > 0 and all(_is_number_cell(row[k]) for row in rows) for k in range(len(headers))]
            cls = ["" if right else ' class="text"' for right in numeric]
            head = (
                "<tr>" + "".join(f"<th{c}>{html.escape(h)}</th>" for c, h in zip(cls, headers, strict=True)) + "</tr>"
            )
            lines = [
                "<tr>"
                + "".join(f"<td{c}>{_html_inline(cell)}</td>" for c, cell in zip(cls, row, strict=True))
                + "</tr>"
                for row in rows
            ]
            body.append("<table>\n<thead>" + head + "</thead>\n<tbody>\n" + "\n".join(lines) + "\n</tbody>\n</table>")
        elif kind == "figure":
            _kind, name, alt, caption = block
            body.append(
                f'<figure><img src="{png_data_uri(plots[name])}" alt="{html.escape(alt)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------------------------------- the report


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(
    out_dir: Path,
    results: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    load_image: Callable[[int], Image.Image | None],
) -> dict[str, Any]:
    """Write OUT/report.md (+ the OUT/plots/*.png it links) and a self-contained OUT/report.html.

    The HTML embeds the plots and the example thumbnails as base64 data URIs and its CSS inline; it references no
    external resource. Both documents hold the same content: summary, verdicts (`verdicts`), headline table,
    plots, examples, per-category table, parse failures, data failures, run details and a legend.

    Args:
        out_dir (`Path`): The evaluation's output folder (created if missing).
        results (`Mapping`): The content of metrics.json; NaN or None numbers print as "—".
        records (`Sequence[Mapping]`): The lines of predictions.jsonl, one per test row.
        load_image (`Callable[[int], PIL.Image.Image | None]`): A row's image by its ``index``, or None when it
            failed to load (an exception is logged and treated as None).

    Returns:
        `dict`: ``{"markdown": Path, "html": Path, "plots": [Path, ...]}`` (plots in `PLOT_NAMES` order).
    """
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    sentences = verdicts(results)
    plots = render_plots(results, records, load_image)
    plot_paths = []
    for name in PLOT_NAMES:
        path = plot_dir / f"{name}.png"
        _write_atomic(path, plots[name])
        plot_paths.append(path)
    blocks = _build_blocks(results, records, sentences)
    markdown_path, html_path = out_dir / "report.md", out_dir / "report.html"
    _write_atomic(markdown_path, render_markdown(blocks).encode("utf-8"))
    title = f"Evaluation report: {results.get('model')}"
    _write_atomic(html_path, render_html(blocks, plots, title).encode("utf-8"))
    logger.info("wrote %s, %s and %d plots in %s", markdown_path.name, html_path.name, len(plot_paths), plot_dir)
    return {"markdown": markdown_path, "html": html_path, "plots": plot_paths}
