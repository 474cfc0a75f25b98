"""Answer templates, and the scores of parsed answers (price, category, title) against the truth.

One `AnswerTemplate` both writes the training target (``"Product: {title}, Category: {category}, Full Price:
{price}"`` by default, the reference recipe's answer) and parses a generated answer back into fields, so training,
the in-training generation check and `phi3v evaluate` all read answers the same way.

A plain ``{price}`` is written as the catalog shows the price (`format_price`): a whole price without decimals
(``590``, not ``590.0``), any other with its cents (``590.5``, ``12.99``). A format spec chooses otherwise
(``{price:.2f}`` writes ``590.00``); it must write a plain number (digits, optionally ``.`` and one or two decimals,
what constrained decoding allows), else the template is refused when it is loaded.

Parsing (`AnswerTemplate.parse`)
--------------------------------
Anything from ``<|end|>`` on is ignored. First the whole answer is matched against the template (literal text as
written, whitespace loosened). When that fails, each field is looked up by its *label*: the template's literal text
just before the field, without leading separators and whitespace (``"Product:"``, ``"Category:"``,
``"Full Price:"`` for the default template). Labels are found case-insensitively with flexible whitespace
(``"full  price :"``) and in any order; a field's value runs from its label to the next label found (of any field)
or to the end, without surrounding whitespace and trailing ``,`` / ``;``. A field whose label is absent, whose
value is empty, or which has no label in the template (``"{title} - {price}"`` has none for ``title``) is None.
Prices are read with `parse_answer_price`: `phi3v.data.catalog.parse_price` ("$1,290.00", "USD 1 290",
"€1.290,00" give 1290.0; "cheap", two numbers or a sign ("-50") give None), except that a zero ("0", "$0.00") is
read as the price 0.0: a real prediction, scored like any other (APE 1), not a missing price.

Scores
------
All scores are plain numbers (JSON-friendly); a mean over nothing is NaN. Categories and titles are compared after
*folding*: case folded and runs of whitespace collapsed to one space. Rates and errors are fractions (0.25, not 25);
the report prints them as percentages.

`score_predictions` returns one flat dict over ``n`` samples:

- ``n``: number of samples; ``parse_failures``: samples missing at least one scored field; ``parse_rate``:
  ``1 - parse_failures / n``.
- Price (`price_metrics`). A predicted price is *usable* when it is a finite number >= 0 (0 included); one that is
  missing (None) or unusable (negative, NaN, infinite: parsing never gives these) is scored as the prediction
  ``MISSING_PRICE_SCORED_AS`` = 0. With s the scored prediction (p when usable, else 0) and t the true price
  (always > 0), over **all** ``n`` samples:

  - ``price_n``: samples with a usable price; ``price_coverage``: ``price_n / n``;
  - ``price_mae``: mean of ``|s - t|`` (a missing price costs t);
  - ``price_mape``: mean absolute percentage error, mean of the APE ``|s - t| / t``; ``price_ape_median``: the
    median APE (statistics.median: the mean of the two middle values for an even count). A missing price has
    APE 1;
  - ``price_smape``: mean of ``2 |s - t| / (|s| + |t|)``, the Amazon ML Challenge 2025 pricing metric, as a
    fraction in [0, 2] (the challenge quotes it in percent, 0 to 200). A missing price has SMAPE 2, the maximum;
  - ``price_within_10`` / ``price_within_25``: share of samples with APE <= 0.10 / 0.25 (a missing price is a
    miss);
  - ``price_rmsle``: ``sqrt(mean((ln(1 + s) - ln(1 + t))^2))``, root mean squared log error (about 0.095 for 10 %
    too high at prices in the hundreds); a missing price costs ``ln(1 + t)``.

  The same seven, over the ``price_n`` samples with a usable price only, end in ``_parsed``
  (``price_ape_median_parsed``, ...; NaN when ``price_n`` is 0). They describe the prices the model gave; the
  unsuffixed ones, which also charge for the prices it did not give, are the ones to compare.

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
`sample_scores` one sample's errors, and `baseline_predictions` the trivial predictions any model must beat, among
them, for each price metric, the constant per category that is optimal for that metric on the training split
(`optimal_constant`).
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from rapidfuzz.distance import Levenshtein

from phi3v.data.catalog import parse_price

DEFAULT_PROMPT = "<|image_1|>What is shown in this image?"
DEFAULT_ANSWER_TEMPLATE = "Product: {title}, Category: {category}, Full Price: {price}"
TEMPLATE_FIELDS = ("title", "category", "price")
UNPARSED_COLUMN = "(unparsed)"

_FORMATTER = string.Formatter()
_WITHIN_TOLERANCE = 1e-9  # "APE <= 0.10" must hold for 110 vs 100 despite float rounding

# A price in an answer as `AnswerTemplate` may write it and the constrained-decoding grammar allows it
# (phi3v.generation's price rule): up to 9 digits, optionally "." and one or two decimals.
PRICE_TEXT_PATTERN = r"[0-9]{1,9}(?:\.[0-9]{1,2})?"
_SPEC_CHECK_PRICES = (590.0, 1290.5, 12.99, 24500.0)  # what a {price:spec} must write as plain numbers

MISSING_PRICE_SCORED_AS = 0.0
"""The prediction a missing or unusable price is scored as: APE 1, SMAPE 2 (the maximum), outside every tolerance."""


@dataclass(frozen=True)
class ParsedAnswer:
    """Fields read back from a generated answer; None where the answer does not hold them."""

    title: str | None
    category: str | None
    price: float | None
    fields: tuple[str, ...] = TEMPLATE_FIELDS  # the template's fields (a template may hold fewer than three)

    @property
    def ok(self) -> bool:
        """True when every field of the template parsed (the price as one number >= 0)."""
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
    fields. A plain ``{price}`` writes the price as the catalog shows it (`format_price`: ``590``, ``590.5``); a
    spec formats the number (``{price:.2f}``: ``590.00``) and must write a plain number (``PRICE_TEXT_PATTERN``).
    Parsing first matches the whole template (literal parts as written, surrounding whitespace loosened, fields
    lazily, the last field to the end of the answer), then falls back to finding each field by its label
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
        ValueError: On an unknown or repeated field, a positional ``{}`` field, a malformed template, or a price
            spec that cannot format a price as a plain number (``{price:d}``, ``{price:x}``, ``{price:,.2f}``).
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
        # {price} with neither spec nor conversion: the catalog's figure (`format_price`); otherwise str.format's
        self._plain_price = any(f == "price" and not spec and not conv for _, f, spec, conv in parsed)
        self._check_price_spec(parsed)

    def _check_price_spec(self, parsed: list[tuple[str, str | None, str | None, str | None]]) -> None:
        """Refuse a ``{price...}`` spec or conversion that cannot write a price the answers can be read back from:
        every sample price must format, and the text must be a plain number (``PRICE_TEXT_PATTERN``, what the
        constrained-decoding grammar allows) within 1 % of the price."""
        field_text = next(
            (
                f"{{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
                for _, f, spec, conv in parsed
                if f == "price"
            ),
            None,
        )
        if field_text is None or self._plain_price:
            return
        for price in _SPEC_CHECK_PRICES:
            try:
                text = field_text.format(price=price)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"answer template {self.template!r}: {field_text} cannot format a price such as {price!r} "
                    f"({err}); use {{price}} (the catalog's figure) or a float spec such as {{price:.2f}}"
                ) from err
            parsed_back = parse_answer_price(text) if re.fullmatch(PRICE_TEXT_PATTERN, text) else None
            if parsed_back is None or abs(parsed_back - price) > 0.01 * price:
                raise ValueError(
                    f"answer template {self.template!r}: {field_text} writes the price {price!r} as {text!r}, which "
                    "is not that price as a plain number (digits, optionally . and 1-2 decimals); use {price} or a "
                    "spec such as {price:.2f} or {price:.0f}"
                )

    def format(self, row: Mapping[str, object]) -> str:
        """The answer for a catalog row (a mapping with at least the template's fields).

        A plain ``{price}`` is written as `format_price` writes it (``590``, ``590.5``, ``12.99``); a format spec
        (``{price:.2f}``) formats the number itself.
        """
        missing = [name for name in self.fields if name not in row]
        if missing:
            raise KeyError(f"row has no {', '.join(missing)} for the answer template {self.template!r}")
        values = {name: row[name] for name in self.fields}
        if self._plain_price:
            values["price"] = format_price(values["price"])
        return self.template.format(**values)

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
        return ParsedAnswer(title, category, parse_answer_price(price_text) if price_text else None, self.fields)

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


def format_price(price: object) -> str:
    """A price as the catalog shows it: a whole price without decimals (``590.0`` -> ``"590"``), any other with its
    cents and no trailing zero (``590.5`` -> ``"590.5"``, ``12.99`` -> ``"12.99"``; more than two decimals are
    rounded to two, which is what `phi3v.data.catalog.parse_price` reads). Text is returned unchanged."""
    if isinstance(price, bool) or not isinstance(price, int | float):
        return str(price)
    if math.isfinite(price) and float(price).is_integer():
        return str(int(price))
    return f"{price:.2f}".rstrip("0").rstrip(".") if math.isfinite(price) else str(price)


def parse_answer_price(text: str) -> float | None:
    """The price of an answer: `phi3v.data.catalog.parse_price`, except that a zero is the price 0.0.

    ``parse_price`` refuses 0 (a catalog row priced 0 is invalid), but an answer of "0" is a prediction: it is read
    as 0.0 and scored (APE 1). A zero is text whose digits are all ``0`` and that ``parse_price`` reads once its
    first ``0`` is made a ``1`` ("$0.00", "0 USD"); signs, exponents and several numbers stay unreadable (None).
    """
    price = parse_price(text)
    if price is not None:
        return price
    digits = re.findall(r"\d", text)
    if digits and set(digits) == {"0"} and parse_price(text.replace("0", "1", 1)) is not None:
        return 0.0
    return None


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


def _usable_price(price: object) -> bool:
    """A predicted price that is scored as given: a finite number >= 0 (anything else is scored as missing)."""
    return isinstance(price, int | float) and not isinstance(price, bool) and math.isfinite(price) and price >= 0


def _scored_price(price: object) -> float:
    """The prediction a price is scored as: itself when usable, else `MISSING_PRICE_SCORED_AS`."""
    return float(price) if _usable_price(price) else MISSING_PRICE_SCORED_AS  # type: ignore[arg-type]


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
    """Absolute percentage error ``|predicted - true| / true`` of one price; None when no usable price was read."""
    return abs(float(predicted) - true) / true if _usable_price(predicted) else None  # type: ignore[arg-type]


def price_smape(predicted: float | None, true: float) -> float | None:
    """Symmetric APE ``2 |predicted - true| / (|predicted| + |true|)`` of one price, in [0, 2]; None without a
    usable price."""
    if not _usable_price(predicted):
        return None
    p = float(predicted)  # type: ignore[arg-type]
    return 2 * abs(p - true) / (abs(p) + abs(true))


def category_matches(predicted: str | None, true: str) -> bool:
    """Exact category match after case and whitespace folding (False when no category was read)."""
    return predicted is not None and _fold(predicted) == _fold(true)


def sample_scores(prediction: ParsedAnswer, truth: Mapping[str, object]) -> dict[str, object]:
    """One sample's scores against its catalog row (``title``, ``category``, ``price``).

    Returns:
        `dict`: ``price_ape``, ``price_smape`` and ``price_abs_error`` of the price given (None without a usable
        price; the aggregate scores count such a row as a prediction of 0: APE 1, SMAPE 2), ``category_ok``
        (bool), ``title_exact`` (bool), ``title_similarity`` and ``title_token_f1`` (floats in [0, 1]).
    """
    true_price = _true_price(truth["price"])
    has_price = _usable_price(prediction.price)
    true_title = str(truth["title"])
    return {
        "price_ape": price_ape(prediction.price, true_price),
        "price_smape": price_smape(prediction.price, true_price),
        "price_abs_error": abs(prediction.price - true_price) if has_price else None,  # type: ignore[operator]
        "category_ok": category_matches(prediction.category, str(truth["category"])),
        "title_exact": _fold(prediction.title) == _fold(true_title),
        "title_similarity": _title_similarity(prediction.title, true_title),
        "title_token_f1": _token_f1(prediction.title, true_title),
    }


# ------------------------------------------------------------------------------------------------------- groups
PRICE_SCORES = (
    "price_mae",
    "price_mape",
    "price_smape",
    "price_ape_median",
    "price_within_10",
    "price_within_25",
    "price_rmsle",
)
"""The price scores, each given over all samples (a missing price scored as 0) and, suffixed ``_parsed``, over the
samples with a usable price only."""

PARSED_SUFFIX = "_parsed"

HIGHER_IS_BETTER = frozenset({"price_within_10", "price_within_25"})
"""The price scores where higher is better (every other one is an error: lower is better)."""

SPLIT_OPTIMAL = frozenset(PRICE_SCORES) - {"price_ape_median"}
"""The price scores that are a (monotone function of a) mean over rows. For these the constant that is optimal
within each category is also, over the whole split, the best of all predictors that give one price per category.
Not the median APE: a median over the split is no sum over categories, so constants that are each optimal within
their category can have a worse split-wide median than other constants."""


def _price_scores(pairs: Sequence[tuple[float, float]]) -> dict[str, float]:
    """`PRICE_SCORES` of ``(scored prediction, true price)`` pairs; NaN for no pair."""
    ape = [abs(p - t) / t for p, t in pairs]
    return {
        "price_mae": _mean([abs(p - t) for p, t in pairs]),
        "price_mape": _mean(ape),
        "price_smape": _mean([2 * abs(p - t) / (abs(p) + abs(t)) for p, t in pairs]),
        "price_ape_median": statistics.median(ape) if ape else math.nan,
        "price_within_10": _mean([float(e <= 0.10 + _WITHIN_TOLERANCE) for e in ape]),
        "price_within_25": _mean([float(e <= 0.25 + _WITHIN_TOLERANCE) for e in ape]),
        "price_rmsle": math.sqrt(_mean([(math.log1p(p) - math.log1p(t)) ** 2 for p, t in pairs])),
    }


def price_metrics(predicted: Sequence[float | None], true: Sequence[float]) -> dict[str, float]:
    """Price scores over all samples, a missing or unusable price scored as 0, and over the priced ones only.

    Returns ``price_n``, ``price_coverage``, `PRICE_SCORES` over every sample (a prediction that is None, negative
    or not finite scored as `MISSING_PRICE_SCORED_AS`), then the same over the samples with a usable price only,
    suffixed ``_parsed`` (see the module docstring). Everything is NaN for no sample; the ``_parsed`` scores are
    NaN when no sample has a usable price.

    Raises:
        ValueError: If the sequences differ in length or a true price is not positive.
    """
    _check_lengths(predicted, true)
    truths = [_true_price(t) for t in true]
    every = [(_scored_price(p), t) for p, t in zip(predicted, truths, strict=True)]
    priced = [(float(p), t) for p, t in zip(predicted, truths, strict=True) if _usable_price(p)]  # type: ignore[arg-type]
    scores: dict[str, float] = {
        "price_n": len(priced),
        "price_coverage": len(priced) / len(truths) if truths else math.nan,
    }
    scores.update(_price_scores(every))
    scores.update({key + PARSED_SUFFIX: value for key, value in _price_scores(priced).items()})
    return scores


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
        ``category_macro_f1``; ``price_n``, ``price_coverage``, `PRICE_SCORES` over all samples, then
        `PRICE_SCORES` suffixed ``_parsed`` over the priced ones (`price_metrics`).

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
_CHUNK_ELEMENTS = 4_000_000  # candidate x price matrices are built in chunks of about this many elements


def _fit_mae(prices: np.ndarray) -> float:
    """The median: it minimises ``sum |c - t|`` (statistics.median; the midpoint of the two middle prices for an
    even count, where every point between them minimises)."""
    return float(statistics.median(prices.tolist()))


def _fit_mape(prices: np.ndarray) -> float:
    """The weighted median with weights ``1 / t``: the smallest price t_(j) (sorted) whose cumulative weight
    reaches half the total.

    ``sum |c - t_i| / t_i`` is convex and piecewise linear in c with slope ``sum_{t_i < c} w_i - sum_{t_i > c} w_i``
    (w_i = 1 / t_i), which is negative below that price and non-negative from it on: it is the (lowest) minimiser.
    """
    order = np.sort(prices)
    cumulative = np.cumsum(1.0 / order)
    return float(order[int(np.searchsorted(cumulative, cumulative[-1] / 2, side="left"))])


def _order_statistic(candidates: np.ndarray, prices: np.ndarray, m: int) -> np.ndarray:
    """The m-th smallest APE ``|c - t| / t`` over ``prices`` (sorted) for each candidate c, in O(log n) each.

    For a fixed c the APE is V-shaped along the sorted prices (falling while t < c, rising after), so the m smallest
    APEs are m consecutive prices and the largest of them sits at an end of that window. The window is found by the
    binary search for the m closest elements (an end that is worse than the element just past the other end moves
    the window away from it).
    """
    n = len(prices)
    lo = np.zeros(len(candidates), dtype=np.int64)
    hi = np.full(len(candidates), n - m, dtype=np.int64)
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        right = np.minimum(mid + m, n - 1)
        worse_left = np.abs(candidates - prices[mid]) / prices[mid] > np.abs(candidates - prices[right]) / prices[right]
        lo = np.where(active & worse_left, mid + 1, lo)
        hi = np.where(active & ~worse_left, mid, hi)
    first, last = prices[lo], prices[lo + m - 1]
    return np.maximum(np.abs(candidates - first) / first, np.abs(candidates - last) / last)


def _median_ape(candidates: np.ndarray, prices: np.ndarray) -> np.ndarray:
    """statistics.median of the APEs ``|c - t| / t`` over ``prices`` (sorted) for each candidate c."""
    n = len(prices)
    low, high = (n + 1) // 2, n // 2 + 1  # the middle order statistic(s), 1-based
    value = _order_statistic(candidates, prices, low)
    return value if low == high else (value + _order_statistic(candidates, prices, high)) / 2


def _fit_ape_median(prices: np.ndarray) -> float:
    """The constant with the lowest median APE, exactly: the best of a finite set of candidates.

    The median APE f(c) is piecewise linear in c (each APE is; the median of them switches between them), so its
    minimum over c > 0 lies where f bends: at a price (an APE's kink) or where the middle order statistic passes
    from one APE to another. Two APEs cross only on opposite sides of c, at the harmonic mean
    ``2 t_i t_j / (t_i + t_j)``, and at such a crossing the two are the largest of the m smallest APEs (m the middle
    rank): their prices bound the window of the m smallest, so some such pair lies m - 1 or m places apart in the
    sorted prices (duplicates included). So the candidates are the prices and the harmonic means of the pairs
    ``d`` apart for every d from m_low - 1 to m_high; f(0) = 1 is never the minimum (f falls just above 0). Ties:
    the lowest candidate.
    """
    order = np.sort(prices)
    n = len(order)
    low, high = (n + 1) // 2, n // 2 + 1
    pieces = [order]
    for d in range(max(1, low - 1), min(n - 1, high) + 1):
        a, b = order[:-d], order[d:]
        pieces.append(2 * a * b / (a + b))
    candidates = np.unique(np.concatenate(pieces))
    values = _median_ape(candidates, order)
    return float(candidates[int(np.argmin(values))])


def _smape_sums(candidates: np.ndarray, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``sum_i count_i * 2 |c - v_i| / (c + v_i)`` for each candidate c (all positive), in chunks."""
    sums = np.empty(len(candidates))
    step = max(1, _CHUNK_ELEMENTS // len(values))
    for start in range(0, len(candidates), step):
        c = candidates[start : start + step, None]
        sums[start : start + step] = (2 * np.abs(c - values) / (c + values)) @ counts
    return sums


def _fit_smape(prices: np.ndarray) -> float:
    """The constant with the lowest total SMAPE: the best of the training prices themselves.

    The minimiser of ``S(c) = sum_i 2 |c - t_i| / (c + t_i)`` over c > 0 is always one of the t_i. Between two
    consecutive prices, S' = A - B with A = sum_{t_i < c} g_i, B = sum_{t_i > c} g_i and g_i = 4 t_i / (c + t_i)^2,
    and S'' = -2 (sum_{t_i < c} g_i / (c + t_i) - sum_{t_i > c} g_i / (c + t_i)). A term below c has
    c + t_i < 2c and one above has c + t_i > 2c, so wherever S' = 0 (A = B): S'' < -2 (A - B) / (2c) = 0. Every
    stationary point between prices is a strict local maximum, S falls below the lowest price and rises above the
    highest, so the minimum is at a price (checked against a fine search in the tests). Ties: the lowest price.
    """
    values, counts = np.unique(prices, return_counts=True)
    sums = _smape_sums(values, values, counts.astype(float))
    return float(values[int(np.argmin(sums))])


def _fit_within(tolerance: float) -> Callable[[np.ndarray], float]:
    def fit(prices: np.ndarray) -> float:
        """The constant inside the most intervals ``[t (1 - x), t (1 + x)]`` (x the tolerance, as the metric
        counts it): a point of maximum overlap is found at an interval start (sweep over the sorted starts);
        the constant is the midpoint between the first such start and the nearest end at or after it, so every
        interval covering that start covers it. Ties: the lowest such region."""
        width = tolerance + _WITHIN_TOLERANCE
        starts, ends = np.sort(prices * (1 - width)), np.sort(prices * (1 + width))
        covering = np.searchsorted(starts, starts, side="right") - np.searchsorted(ends, starts, side="left")
        left = starts[int(np.argmax(covering))]
        right = ends[int(np.searchsorted(ends, left, side="left"))]
        return float((left + right) / 2)

    return fit


def _fit_rmsle(prices: np.ndarray) -> float:
    """``exp(mean(ln(1 + t))) - 1``: the square of ``ln(1 + c) - ln(1 + t)`` summed is least at the mean."""
    return float(np.expm1(np.mean(np.log1p(prices))))


_FITS: dict[str, Callable[[np.ndarray], float]] = {
    "price_mae": _fit_mae,
    "price_mape": _fit_mape,
    "price_smape": _fit_smape,
    "price_ape_median": _fit_ape_median,
    "price_within_10": _fit_within(0.10),
    "price_within_25": _fit_within(0.25),
    "price_rmsle": _fit_rmsle,
}


def optimal_constant(prices: Sequence[float], metric: str) -> float:
    """The single price c that scores best on ``metric`` when predicted for every one of ``prices``.

    Exact for every metric of `PRICE_SCORES` (each fit's docstring derives it): ``price_mae`` the median,
    ``price_mape`` the weighted median with weights 1 / price, ``price_ape_median`` the best of the prices and the
    harmonic means of price pairs, ``price_smape`` the best of the prices, ``price_within_10`` / ``_25`` a point
    inside the most tolerance intervals, ``price_rmsle`` ``exp(mean(ln(1 + t))) - 1``. Among equally good
    constants, the lowest. Cost: O(n log n), except SMAPE, O(u^2) for u distinct prices.

    Raises:
        ValueError: For no price, a price that is not positive, or an unknown metric.
    """
    if metric not in _FITS:
        raise ValueError(f"no optimal constant for {metric!r}; the metrics are {', '.join(_FITS)}")
    if not prices:
        raise ValueError("an optimal constant needs at least one price")
    return _FITS[metric](np.array([_true_price(price) for price in prices], dtype=float))


@dataclass(frozen=True)
class Baseline:
    """Trivial predictions for the test rows, learnt from the training rows alone; scored on ``fields`` only.

    ``metric`` is the score a verdict compares it on (None: the field's usual one); ``optimal_for`` the score its
    constant per category is optimal for on the training split (None when it is not fitted to a score).
    """

    name: str
    description: str
    fields: tuple[str, ...]
    predictions: list[ParsedAnswer]
    metric: str | None = None
    optimal_for: str | None = None


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


# metric -> (baseline name, how the constant is obtained, how the metric is named)
OPTIMAL_BASELINES: dict[str, tuple[str, str, str]] = {
    "price_mape": (
        "category_mape_optimal_price",
        "the weighted median of its true category's training prices with weights 1/price",
        "MAPE (mean APE)",
    ),
    "price_ape_median": (
        "category_median_ape_optimal_price",
        "the price that minimises the median APE over its true category's training prices",
        "median APE",
    ),
    "price_smape": (
        "category_smape_optimal_price",
        "the training price of its true category that minimises the category's SMAPE",
        "SMAPE",
    ),
    "price_within_10": (
        "category_within_10_optimal_price",
        "a price within 10% of as many of its true category's training prices as possible",
        "share within 10%",
    ),
    "price_within_25": (
        "category_within_25_optimal_price",
        "a price within 25% of as many of its true category's training prices as possible",
        "share within 25%",
    ),
    "price_rmsle": (
        "category_rmsle_optimal_price",
        "exp(mean(ln(1 + price))) - 1 over its true category's training prices",
        "RMSLE",
    ),
}
"""The fitted price baselines: for each price score (``price_mae`` is the category median's), the baseline whose
constant per category is the optimal one for that score on the training split (`SPLIT_OPTIMAL` says in what
sense)."""


def baseline_predictions(
    train_rows: Sequence[Mapping[str, object]], test_rows: Sequence[Mapping[str, object]]
) -> dict[str, Baseline]:
    """The baselines, from the training rows, for every test row (score each on its ``fields``).

    - ``global_median_price``: the median training price for every row (the single constant with the lowest MAE
      on the training split).
    - ``category_median_price``: the median training price of the row's **true** category: per category, the
      constant with the lowest MAE on the training split.
    - one per other price score (`OPTIMAL_BASELINES`), ``category_<score>_optimal_price``: the constant of the
      row's true category that is optimal for that score over the category's training prices
      (`optimal_constant`), compared on that score. For a score of `SPLIT_OPTIMAL` no predictor that gives one
      price per category does better over the whole training split; for the median APE that holds within each
      category only. On another split a constant fitted there could do better: it is not a bound there.
    - ``majority_category``: the most frequent training category (ties: alphabetically first).
    - ``most_frequent_title``: the most frequent training title (ties: alphabetically first).

    Every category baseline prices a category unseen in training with the same fit over all training prices. The
    price baselines price every row (coverage 1) and are given the true category, which the model must read from
    the photo.

    Raises:
        ValueError: If there are no training rows.
    """
    if not train_rows:
        raise ValueError("baselines need at least one training row")
    prices = [_true_price(row["price"]) for row in train_rows]
    by_category: dict[str, list[float]] = {}
    for row, price in zip(train_rows, prices, strict=True):
        by_category.setdefault(_fold(str(row["category"])), []).append(price)
    test_keys = [_fold(str(row["category"])) for row in test_rows]

    def per_category(metric: str) -> tuple[float, list[ParsedAnswer]]:
        overall = optimal_constant(prices, metric)
        fitted = {key: optimal_constant(values, metric) for key, values in by_category.items()}
        return overall, [ParsedAnswer(None, None, fitted.get(key, overall), ("price",)) for key in test_keys]

    global_median = optimal_constant(prices, "price_mae")
    _overall, by_median = per_category("price_mae")
    majority = _most_frequent([str(row["category"]) for row in train_rows])
    title = _most_frequent([str(row["title"]) for row in train_rows])
    n = len(test_rows)
    unseen = "a category unseen in training gets the same over all training prices"
    baselines = [
        Baseline(
            "global_median_price",
            f"Every product priced at the median training price ({global_median:g}).",
            ("price",),
            [ParsedAnswer(None, None, global_median, ("price",)) for _ in range(n)],
            metric="price_ape_median",
        ),
        Baseline(
            "category_median_price",
            "Every product priced at the median training price of its true category, the constant per category "
            f"with the lowest mean absolute error on the training split ({unseen}).",
            ("price",),
            by_median,
            metric="price_ape_median",
            optimal_for="price_mae",
        ),
    ]
    for metric, (name, how, label) in OPTIMAL_BASELINES.items():
        _overall, predictions = per_category(metric)
        if metric in SPLIT_OPTIMAL:
            claim = f"of all predictors with one price per category, the best {label} on the training split"
        else:
            claim = (
                f"in each category, the lowest {label} over its training prices (a split-wide median is no sum "
                "over categories, so other prices per category can beat it over the whole split)"
            )
        description = f"Every product priced at {how}: {claim} ({unseen})."
        baselines.append(Baseline(name, description, ("price",), predictions, metric=metric, optimal_for=metric))
    baselines += [
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
