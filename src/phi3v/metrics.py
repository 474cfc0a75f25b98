"""Answer templates, and the scores of parsed answers (price, category, title) against the truth.

One `AnswerTemplate` both writes the training target (``"Product: {title}, Category: {category}, Full Price:
{price}"`` by default, the reference recipe's answer) and parses a generated answer back into fields, so training,
the in-training generation check and `phi3v evaluate` all read answers the same way.

Parsing (`AnswerTemplate.parse`)
--------------------------------
Anything from ``<|end|>`` on is ignored. First the whole answer is matched against the template (literal text as
written, whitespace loosened). When that fails, each field is looked up by its *label*: the template's literal text
just before the field, without leading separators and whitespace (``"Product:"``, ``"Category:"``,
``"Full Price:"`` for the default template). Labels are found case-insensitively with flexible whitespace
(``"full  price :"``) and in any order; a field's value runs from its label to the next label found (of any field)
or to the end, without surrounding whitespace and trailing ``,`` / ``;``. A field whose label is absent, whose
value is empty, or which has no label in the template (``"{title} - {price}"`` has none for ``title``) is None.
Prices are read with `phi3v.data.catalog.parse_price` ("$1,290.00", "USD 1 290", "€1.290,00" give 1290.0; "0",
"cheap" or two numbers give None).

Scores
------
All scores are plain numbers (JSON-friendly); a mean over nothing is NaN. Categories and titles are compared after
*folding*: case folded and runs of whitespace collapsed to one space.

`score_predictions` returns one flat dict over ``n`` samples:

- ``n``: number of samples; ``parse_failures``: samples missing at least one scored field; ``parse_rate``:
  ``1 - parse_failures / n``.
- Price (`price_metrics`), over the ``price_n`` samples **with a parsed price only** (a missing price is never
  scored as 0; how often it is missing is ``price_coverage``). With p the predicted and t the true price:

  - ``price_n``: samples with a price; ``price_coverage``: ``price_n / n``;
  - ``price_mae``: mean of ``|p - t|``;
  - ``price_mape``: mean absolute percentage error, mean of ``|p - t| / t``; ``price_ape_median``: its median;
  - ``price_smape``: mean of ``2 |p - t| / (|p| + |t|)`` (in [0, 2]);
  - ``price_within_10`` / ``price_within_25``: share of priced samples with ``|p - t| / t <= 0.10`` / ``0.25``;
  - ``price_rmse_log``: ``sqrt(mean((ln p - ln t)^2))``, an error on ratios (0.0953 for 10 % too high).

- Category (`category_metrics`), over **all** samples:

  - ``category_accuracy``: share of samples whose folded category equals the truth's (no category = wrong);
  - ``category_macro_f1``: unweighted mean, over every folded category among the truths and the predictions, of
    that category's F1 = 2 P R / (P + R) (0 when P + R = 0), with precision P = TP / (TP + FP) and recall
    R = TP / (TP + FN) (each 0 when its denominator is 0). A missing category is a false negative for its true
    category and a false positive for none.

- Title (`title_metrics`), over **all** samples, a missing title read as ``""``:

  - ``title_exact_match``: share of folded titles equal to the truth's;
  - ``title_similarity``: mean normalised Levenshtein similarity ``1 - distance / max(len)`` of the folded
    titles (rapidfuzz ``Levenshtein.normalized_similarity``; 1.0 for two empty titles, 0.0 for one);
  - ``title_token_f1``: mean SQuAD-style token F1: tokens are the whitespace-separated words of the folded title
    with punctuation and symbols (Unicode categories P*, S*) removed; with ``c`` the size of the multiset
    intersection, P = c / predicted tokens, R = c / true tokens, F1 = 2 P R / (P + R); 0 when c = 0, 1 when
    both titles have no token.

Only the groups of the scored fields appear (by default the template's fields). `per_category` gives the same
dict within each true category (without ``category_macro_f1``), `confusion_matrix` the category confusion counts,
`sample_scores` one sample's errors, and `baseline_predictions` the trivial predictions any model must beat.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
import string
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rapidfuzz.distance import Levenshtein

from phi3v.data.catalog import parse_price

DEFAULT_PROMPT = "<|image_1|>What is shown in this image?"
DEFAULT_ANSWER_TEMPLATE = "Product: {title}, Category: {category}, Full Price: {price}"
TEMPLATE_FIELDS = ("title", "category", "price")
UNPARSED_COLUMN = "(unparsed)"

_FORMATTER = string.Formatter()
_WITHIN_TOLERANCE = 1e-9  # "APE <= 0.10" must hold for 110 vs 100 despite float rounding


@dataclass(frozen=True)
class ParsedAnswer:
    """Fields read back from a generated answer; None where the answer does not hold them."""

    title: str | None
    category: str | None
    price: float | None
    fields: tuple[str, ...] = TEMPLATE_FIELDS  # the template's fields (a template may hold fewer than three)

    @property
    def ok(self) -> bool:
        """True when every field of the template parsed (the price as one positive number)."""
        return not self.missing

    @property
    def missing(self) -> tuple[str, ...]:
        """The template's fields that did not parse, in template order."""
        return tuple(name for name in self.fields if getattr(self, name) is None)


def _label_pattern(label: str) -> re.Pattern[str]:
    """Case-insensitive regex for a label: whitespace between words required but flexible, optional around marks."""
    tokens = re.findall(r"\w+|[^\w\s]", label)
    pattern = re.escape(tokens[0])
    for before, token in itertools.pairwise(tokens):
        both_words = re.fullmatch(r"\w+", before) and re.fullmatch(r"\w+", token)
        pattern += (r"\s+" if both_words else r"\s*") + re.escape(token)
    if re.match(r"\w", tokens[0]):
        pattern = r"(?<!\w)" + pattern
    if re.match(r"\w", tokens[-1]):
        pattern += r"(?!\w)"
    return re.compile(pattern, re.IGNORECASE)


class AnswerTemplate:
    """A ``str.format`` answer template over the catalog fields ``title``, ``category`` and ``price``.

    Each field may appear at most once and may carry a format spec (``{price:.2f}``); literal text separates
    fields. Parsing first matches the whole template (literal parts as written, surrounding whitespace loosened,
    fields lazily, the last field to the end of the answer), then falls back to finding each field by its label
    (see the module docstring).

    Args:
        template (`str`): The template, e.g. `DEFAULT_ANSWER_TEMPLATE`.

    Attributes:
        template (`str`): The template text.
        fields (`tuple[str, ...]`): The template's fields, in order.
        parts (`list[tuple[str, str | None]]`): ``(literal, field)`` pairs in order, as `string.Formatter.parse`
            gives them (``field`` None for trailing literal text).
        labels (`dict[str, str]`): Field -> label used by the fallback parse, for fields that have one.

    Raises:
        ValueError: On an unknown or repeated field, a positional ``{}`` field, or a malformed template.
    """

    def __init__(self, template: str = DEFAULT_ANSWER_TEMPLATE) -> None:
        try:
            parsed = list(_FORMATTER.parse(template))
        except ValueError as err:
            raise ValueError(f"answer template {template!r} is malformed: {err}") from err
        seen: list[str] = []
        labels: dict[str, str] = {}
        pattern = "^\\s*"
        for literal, field, _spec, _conversion in parsed:
            pattern += r"\s*".join(re.escape(piece) for piece in literal.split()) if literal.strip() else ""
            if literal and literal[-1].isspace():
                pattern += r"\s*"
            if field is None:
                continue
            if field not in TEMPLATE_FIELDS:
                raise ValueError(
                    f"answer template {template!r}: unknown field {{{field}}}; the fields are "
                    + ", ".join(f"{{{name}}}" for name in TEMPLATE_FIELDS)
                )
            if field in seen:
                raise ValueError(f"answer template {template!r}: field {{{field}}} appears twice")
            seen.append(field)
            pattern += f"(?P<{field}>.*?)"
            label = re.sub(r"^[\W_]+", "", literal).rstrip()
            if label:
                labels[field] = label
        if not seen:
            raise ValueError(f"answer template {template!r} has no field: the model would learn a constant")
        self.template = template
        self.fields = tuple(seen)
        self.parts: list[tuple[str, str | None]] = [(literal, field) for literal, field, _, _ in parsed]
        self.labels = labels
        self._regex = re.compile(pattern + r"\s*$", re.DOTALL)
        self._label_regexes = {field: _label_pattern(label) for field, label in labels.items()}

    def format(self, row: Mapping[str, object]) -> str:
        """The answer for a catalog row (a mapping with at least the template's fields)."""
        missing = [name for name in self.fields if name not in row]
        if missing:
            raise KeyError(f"row has no {', '.join(missing)} for the answer template {self.template!r}")
        return self.template.format(**{name: row[name] for name in self.fields})

    def parse(self, text: str) -> ParsedAnswer:
        """Read the fields back from a generated answer (``<|end|>`` and anything after it ignored).

        The whole-template match is tried first, then the label fallback; fields not found are None.
        """
        text = text.split("<|end|>", 1)[0]
        match = self._regex.match(text)
        values = match.groupdict() if match is not None else self._parse_labels(text)
        title = _clean_value(values.get("title"))
        category = _clean_value(values.get("category"))
        price_text = _clean_value(values.get("price"))
        return ParsedAnswer(title, category, parse_price(price_text) if price_text else None, self.fields)

    def _parse_labels(self, text: str) -> dict[str, str]:
        """Field values found after their labels, each running to the next label found or the end."""
        found: list[tuple[int, int, str]] = []  # (start, end, field) of every label occurrence
        for field, regex in self._label_regexes.items():
            found += [(m.start(), m.end(), field) for m in regex.finditer(text)]
        kept: list[tuple[int, int, str]] = []  # longest first, so "Full Price:" wins over a "Price:" inside it
        for start, end, field in sorted(found, key=lambda item: (item[0] - item[1], item[0])):
            if all(end <= other_start or start >= other_end for other_start, other_end, _ in kept):
                kept.append((start, end, field))
        kept.sort()
        values: dict[str, str] = {}
        for i, (_start, end, field) in enumerate(kept):
            if field not in values:  # a label seen twice: its first value counts
                values[field] = text[end : kept[i + 1][0] if i + 1 < len(kept) else len(text)]
        return values


def _clean_value(value: str | None) -> str | None:
    """A field's text without surrounding whitespace and trailing ``,`` / ``;``; None when nothing is left."""
    if value is None:
        return None
    value = re.sub(r"[\s,;]+$", "", value).strip()
    return value or None


# ------------------------------------------------------------------------------------------------------- helpers
def _fold(text: str | None) -> str:
    return " ".join((text or "").casefold().split())


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def _check_lengths(predicted: Sequence[object], true: Sequence[object]) -> None:
    if len(predicted) != len(true):
        raise ValueError(f"got {len(predicted)} predictions for {len(true)} samples")


def _true_price(value: object) -> float:
    price = float(value)  # type: ignore[arg-type]
    if not math.isfinite(price) or price <= 0:
        raise ValueError(f"true prices must be positive numbers, got {value!r}")
    return price


def _has_price(price: float | None) -> bool:
    return price is not None and math.isfinite(price) and price > 0


def _tokens(text: str | None) -> list[str]:
    """Folded whitespace tokens with punctuation and symbols removed (tokens left empty dropped)."""
    kept = "".join(ch for ch in _fold(text) if unicodedata.category(ch)[0] not in "PS")
    return kept.split()


def _token_f1(predicted: str | None, true: str | None) -> float:
    pred_tokens, true_tokens = _tokens(predicted), _tokens(true)
    if not pred_tokens or not true_tokens:
        return float(not pred_tokens and not true_tokens)
    common = sum((Counter(pred_tokens) & Counter(true_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(true_tokens)
    return 2 * precision * recall / (precision + recall)


def _title_similarity(predicted: str | None, true: str | None) -> float:
    return float(Levenshtein.normalized_similarity(_fold(predicted), _fold(true)))


def _category_key(predicted: str | None) -> str | None:
    """Folded category, None when missing or blank."""
    folded = _fold(predicted)
    return folded or None


# ------------------------------------------------------------------------------------------------------- single
def price_ape(predicted: float | None, true: float) -> float | None:
    """Absolute percentage error ``|predicted - true| / true`` of one price; None when no price was read."""
    return None if predicted is None else abs(predicted - true) / true


def category_matches(predicted: str | None, true: str) -> bool:
    """Exact category match after case and whitespace folding (False when no category was read)."""
    return predicted is not None and _fold(predicted) == _fold(true)


def sample_scores(prediction: ParsedAnswer, truth: Mapping[str, object]) -> dict[str, object]:
    """One sample's scores against its catalog row (``title``, ``category``, ``price``).

    Returns:
        `dict`: ``price_ape`` and ``price_abs_error`` (None without a parsed price), ``category_ok`` (bool),
        ``title_exact`` (bool), ``title_similarity`` and ``title_token_f1`` (floats in [0, 1]).
    """
    true_price = _true_price(truth["price"])
    has_price = _has_price(prediction.price)
    true_title = str(truth["title"])
    return {
        "price_ape": price_ape(prediction.price, true_price) if has_price else None,
        "price_abs_error": abs(prediction.price - true_price) if has_price else None,  # type: ignore[operator]
        "category_ok": category_matches(prediction.category, str(truth["category"])),
        "title_exact": _fold(prediction.title) == _fold(true_title),
        "title_similarity": _title_similarity(prediction.title, true_title),
        "title_token_f1": _token_f1(prediction.title, true_title),
    }


# ------------------------------------------------------------------------------------------------------- groups
def price_metrics(predicted: Sequence[float | None], true: Sequence[float]) -> dict[str, float]:
    """Price errors over the samples with a predicted price (see the module docstring).

    A prediction that is None (or not a positive finite number) is left out of every error and lowers only
    ``price_coverage``. Errors are NaN when no sample has a price.

    Raises:
        ValueError: If the sequences differ in length or a true price is not positive.
    """
    _check_lengths(predicted, true)
    pairs = [(float(p), _true_price(t)) for p, t in zip(predicted, true, strict=True) if _has_price(p)]  # type: ignore[arg-type]
    ape = [abs(p - t) / t for p, t in pairs]
    return {
        "price_n": len(pairs),
        "price_coverage": len(pairs) / len(true) if true else math.nan,
        "price_mae": _mean([abs(p - t) for p, t in pairs]),
        "price_mape": _mean(ape),
        "price_smape": _mean([2 * abs(p - t) / (abs(p) + abs(t)) for p, t in pairs]),
        "price_ape_median": statistics.median(ape) if ape else math.nan,
        "price_within_10": _mean([float(e <= 0.10 + _WITHIN_TOLERANCE) for e in ape]),
        "price_within_25": _mean([float(e <= 0.25 + _WITHIN_TOLERANCE) for e in ape]),
        "price_rmse_log": math.sqrt(_mean([(math.log(p) - math.log(t)) ** 2 for p, t in pairs])),
    }


def category_metrics(predicted: Sequence[str | None], true: Sequence[str]) -> dict[str, float]:
    """``category_accuracy`` and ``category_macro_f1`` over all samples (see the module docstring).

    Raises:
        ValueError: If the sequences differ in length.
    """
    _check_lengths(predicted, true)
    pred_keys = [_category_key(p) for p in predicted]
    true_keys = [_fold(t) for t in true]
    labels = sorted(set(true_keys) | {p for p in pred_keys if p is not None})
    tp: Counter[str] = Counter(t for p, t in zip(pred_keys, true_keys, strict=True) if p == t)
    n_pred: Counter[str] = Counter(p for p in pred_keys if p is not None)
    n_true: Counter[str] = Counter(true_keys)
    f1s = []
    for label in labels:
        precision = tp[label] / n_pred[label] if n_pred[label] else 0.0
        recall = tp[label] / n_true[label] if n_true[label] else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {
        "category_accuracy": _mean([float(p == t) for p, t in zip(pred_keys, true_keys, strict=True)]),
        "category_macro_f1": _mean(f1s),
    }


def confusion_matrix(predicted: Sequence[str | None], true: Sequence[str]) -> dict[str, list]:
    """Category confusion counts, rows the true categories and columns the predictions (folded comparison).

    Returns:
        `dict`: ``labels``: the true categories sorted by folded name, each spelled as first seen in the truth;
        ``columns``: those labels, then the other predicted categories (sorted, spelled as first predicted), then
        ``"(unparsed)"`` for a missing category; ``matrix``: one row of int counts per label, one count per column.

    Raises:
        ValueError: If the sequences differ in length.
    """
    _check_lengths(predicted, true)
    spelling: dict[str, str] = {}
    for category in true:
        spelling.setdefault(_fold(category), category)
    true_keys = sorted(spelling)
    other: dict[str, str] = {}
    for category in predicted:
        key = _category_key(category)
        if key is not None and key not in spelling:
            other.setdefault(key, category)  # type: ignore[arg-type]
    column_keys: list[str | None] = [*true_keys, *sorted(other), None]
    column_index = {key: i for i, key in enumerate(column_keys)}
    row_index = {key: i for i, key in enumerate(true_keys)}
    matrix = [[0] * len(column_keys) for _ in true_keys]
    for category, truth in zip(predicted, true, strict=True):
        matrix[row_index[_fold(truth)]][column_index[_category_key(category)]] += 1
    return {
        "labels": [spelling[key] for key in true_keys],
        "columns": [spelling[key] for key in true_keys] + [other[key] for key in sorted(other)] + [UNPARSED_COLUMN],
        "matrix": matrix,
    }


def title_metrics(predicted: Sequence[str | None], true: Sequence[str]) -> dict[str, float]:
    """``title_exact_match``, ``title_similarity`` and ``title_token_f1`` over all samples (module docstring).

    Raises:
        ValueError: If the sequences differ in length.
    """
    _check_lengths(predicted, true)
    pairs = list(zip(predicted, true, strict=True))
    return {
        "title_exact_match": _mean([float(_fold(p) == _fold(t)) for p, t in pairs]),
        "title_similarity": _mean([_title_similarity(p, t) for p, t in pairs]),
        "title_token_f1": _mean([_token_f1(p, t) for p, t in pairs]),
    }


# ------------------------------------------------------------------------------------------------------- overall
def _scored_fields(predictions: Sequence[ParsedAnswer], fields: Sequence[str] | None) -> tuple[str, ...]:
    if fields is None:
        return tuple(dict.fromkeys(name for p in predictions for name in p.fields))
    unknown = [name for name in fields if name not in TEMPLATE_FIELDS]
    if unknown or not fields:
        raise ValueError(f"fields must be a non-empty selection of {TEMPLATE_FIELDS}, got {list(fields)}")
    return tuple(dict.fromkeys(fields))


def score_predictions(
    predictions: Sequence[ParsedAnswer], truths: Sequence[Mapping[str, object]], fields: Sequence[str] | None = None
) -> dict[str, float]:
    """Scores of parsed answers against catalog rows, as one flat dict (see the module docstring).

    Args:
        predictions: Parsed answers, one per sample.
        truths: The samples' rows with ``title``, ``category`` and ``price``.
        fields: The fields to score, in output order; by default the predictions' template fields. A sample
            parses when all of them are present (`ParsedAnswer.ok` by default).

    Returns:
        `dict[str, float]`: ``n``, ``parse_rate``, ``parse_failures``, then for each scored field its group:
        ``title_exact_match``, ``title_similarity``, ``title_token_f1``; ``category_accuracy``,
        ``category_macro_f1``; ``price_n``, ``price_coverage``, ``price_mae``, ``price_mape``, ``price_smape``,
        ``price_ape_median``, ``price_within_10``, ``price_within_25``, ``price_rmse_log``.

    Raises:
        ValueError: If the two sequences differ in length or are empty, or on an unknown field.
    """
    _check_lengths(predictions, truths)
    if not predictions:
        raise ValueError("no samples to score")
    scored = _scored_fields(predictions, fields)
    if fields is None:
        failures = sum(not p.ok for p in predictions)
    else:
        failures = sum(any(getattr(p, name) is None for name in scored) for p in predictions)
    scores: dict[str, float] = {
        "n": len(predictions),
        "parse_rate": 1 - failures / len(predictions),
        "parse_failures": failures,
    }
    for name in scored:
        if name == "price":
            scores.update(price_metrics([p.price for p in predictions], [_true_price(t["price"]) for t in truths]))
        elif name == "category":
            scores.update(category_metrics([p.category for p in predictions], [str(t["category"]) for t in truths]))
        else:
            scores.update(title_metrics([p.title for p in predictions], [str(t["title"]) for t in truths]))
    return scores


def per_category(
    predictions: Sequence[ParsedAnswer], truths: Sequence[Mapping[str, object]], fields: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """`score_predictions` within each true category (keyed by the truth's first spelling, sorted by folded name).

    ``category_macro_f1`` is left out: within one true category it says nothing beyond the accuracy.

    Raises:
        ValueError: As `score_predictions`.
    """
    _check_lengths(predictions, truths)
    if not predictions:
        raise ValueError("no samples to score")
    _scored_fields(predictions, fields)  # raises on unknown fields even without a group
    groups: dict[str, list[int]] = {}
    spelling: dict[str, str] = {}
    for i, truth in enumerate(truths):
        key = _fold(str(truth["category"]))
        spelling.setdefault(key, str(truth["category"]))
        groups.setdefault(key, []).append(i)
    result: dict[str, dict[str, float]] = {}
    for key in sorted(groups):
        members = groups[key]
        scores = score_predictions([predictions[i] for i in members], [truths[i] for i in members], fields)
        scores.pop("category_macro_f1", None)
        result[spelling[key]] = scores
    return result


# ------------------------------------------------------------------------------------------------------- baselines
@dataclass(frozen=True)
class Baseline:
    """Trivial predictions for the test rows, learnt from the training rows alone; scored on ``fields`` only."""

    name: str
    description: str
    fields: tuple[str, ...]
    predictions: list[ParsedAnswer]


def _most_frequent(values: Sequence[str]) -> str:
    """The most frequent value by folded text (ties: alphabetically first folded), spelled as first seen."""
    spelling: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for value in values:
        key = _fold(value)
        spelling.setdefault(key, value)
        counts[key] += 1
    key = min(counts, key=lambda k: (-counts[k], k))
    return spelling[key]


def baseline_predictions(
    train_rows: Sequence[Mapping[str, object]], test_rows: Sequence[Mapping[str, object]]
) -> dict[str, Baseline]:
    """The baselines, from the training rows, for every test row (score each on its ``fields``).

    - ``global_median_price``: the median training price for every row.
    - ``category_median_price``: the median training price of the row's **true** category (the global median for
      a category unseen in training): an upper bound for any predictor that prices by category alone.
    - ``majority_category``: the most frequent training category (ties: alphabetically first).
    - ``most_frequent_title``: the most frequent training title (ties: alphabetically first).

    Raises:
        ValueError: If there are no training rows.
    """
    if not train_rows:
        raise ValueError("baselines need at least one training row")
    prices = [_true_price(row["price"]) for row in train_rows]
    global_median = statistics.median(prices)
    by_category: dict[str, list[float]] = {}
    for row, price in zip(train_rows, prices, strict=True):
        by_category.setdefault(_fold(str(row["category"])), []).append(price)
    category_median = {key: statistics.median(values) for key, values in by_category.items()}
    majority = _most_frequent([str(row["category"]) for row in train_rows])
    title = _most_frequent([str(row["title"]) for row in train_rows])
    n = len(test_rows)
    baselines = [
        Baseline(
            "global_median_price",
            f"Every product priced at the median training price ({global_median:g}).",
            ("price",),
            [ParsedAnswer(None, None, global_median, ("price",)) for _ in range(n)],
        ),
        Baseline(
            "category_median_price",
            "Every product priced at the median training price of its true category (the global median for an "
            "unseen category): the best a category-only pricer could do.",
            ("price",),
            [
                ParsedAnswer(None, None, category_median.get(_fold(str(row["category"])), global_median), ("price",))
                for row in test_rows
            ],
        ),
        Baseline(
            "majority_category",
            f"Every product given the most frequent training category ({majority}).",
            ("category",),
            [ParsedAnswer(None, majority, None, ("category",)) for _ in range(n)],
        ),
        Baseline(
            "most_frequent_title",
            f"Every product given the most frequent training title ({title}).",
            ("title",),
            [ParsedAnswer(title, None, None, ("title",)) for _ in range(n)],
        ),
    ]
    return {baseline.name: baseline for baseline in baselines}
