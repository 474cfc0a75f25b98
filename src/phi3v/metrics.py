"""Answer templates and the scores of generated answers: parsed price, category and title against the truth.

One `AnswerTemplate` both writes the training target (``"Product: {title}, Category: {category}, Full Price:
{price}"`` by default, the reference recipe's answer) and parses a generated answer back into fields, so training,
the in-training generation check and `phi3v evaluate` all read answers the same way.

Scores (`score_answers`), computed on every sample (a sample whose answer does not parse counts as wrong, not as
missing):

- ``parse_rate``: share of answers that match the template.
- ``price_ape_median`` / ``price_ape_mean``: absolute percentage error of the price, ``|pred - true| / true``
  (an unparsable price counts as 100 %), median and mean; ``price_mae``: mean absolute error on parsed prices.
- ``category_accuracy``: exact match after case and whitespace folding.
- ``title_similarity``: mean normalised Levenshtein similarity in [0, 1] (rapidfuzz ``ratio`` / 100) after folding.
"""

from __future__ import annotations

import math
import re
import statistics
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rapidfuzz import fuzz

from phi3v.data.catalog import parse_price

DEFAULT_PROMPT = "<|image_1|>What is shown in this image?"
DEFAULT_ANSWER_TEMPLATE = "Product: {title}, Category: {category}, Full Price: {price}"
TEMPLATE_FIELDS = ("title", "category", "price")

_FORMATTER = string.Formatter()


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
        return all(getattr(self, name) is not None for name in self.fields)


class AnswerTemplate:
    """A ``str.format`` answer template over the catalog fields ``title``, ``category`` and ``price``.

    Each field may appear at most once and may carry a format spec (``{price:.2f}``); literal text separates
    fields. Parsing turns the template into a regular expression: literal parts match as written (surrounding
    whitespace loosened), fields match lazily, the last field runs to the end of the answer.

    Args:
        template (`str`): The template, e.g. `DEFAULT_ANSWER_TEMPLATE`.

    Raises:
        ValueError: On an unknown or repeated field, a positional ``{}`` field, or a malformed template.
    """

    def __init__(self, template: str = DEFAULT_ANSWER_TEMPLATE) -> None:
        try:
            parts = list(_FORMATTER.parse(template))
        except ValueError as err:
            raise ValueError(f"answer template {template!r} is malformed: {err}") from err
        seen: list[str] = []
        pattern = "^\\s*"
        for literal, field, _spec, _conversion in parts:
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
        if not seen:
            raise ValueError(f"answer template {template!r} has no field: the model would learn a constant")
        self.template = template
        self.fields = tuple(seen)
        self._regex = re.compile(pattern + r"\s*$", re.DOTALL)

    def format(self, row: Mapping[str, object]) -> str:
        """The answer for a catalog row (a mapping with at least the template's fields)."""
        missing = [name for name in self.fields if name not in row]
        if missing:
            raise KeyError(f"row has no {', '.join(missing)} for the answer template {self.template!r}")
        return self.template.format(**{name: row[name] for name in self.fields})

    def parse(self, text: str) -> ParsedAnswer:
        """Read the fields back from a generated answer (``<|end|>`` and anything after it ignored)."""
        text = text.split("<|end|>", 1)[0]
        match = self._regex.match(text)
        if match is None:
            return ParsedAnswer(None, None, None, self.fields)
        groups = match.groupdict()
        title = groups.get("title")
        category = groups.get("category")
        price = parse_price(groups["price"]) if "price" in groups else None
        return ParsedAnswer(
            title.strip() if title is not None else None,
            category.strip() if category is not None else None,
            price,
            self.fields,
        )


def _fold(text: str | None) -> str:
    return " ".join((text or "").casefold().split())


def price_ape(predicted: float | None, true: float) -> float | None:
    """Absolute percentage error ``|predicted - true| / true`` of one price; None when no price was read."""
    return None if predicted is None else abs(predicted - true) / true


def category_matches(predicted: str | None, true: str) -> bool:
    """Exact category match after case and whitespace folding (False when no category was read)."""
    return predicted is not None and _fold(predicted) == _fold(true)


def score_answers(predictions: Sequence[ParsedAnswer], truths: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """Scores of parsed answers against catalog rows (see the module docstring for each one).

    Args:
        predictions: Parsed answers, one per sample.
        truths: The samples' rows with ``title``, ``category`` and ``price``.

    Returns:
        `dict[str, float]`: ``parse_rate``, ``price_ape_median``, ``price_ape_mean``, ``price_mae``,
        ``category_accuracy``, ``title_similarity`` (``price_mae`` is NaN when no price parsed).

    Raises:
        ValueError: If the two sequences differ in length or are empty.
    """
    if len(predictions) != len(truths):
        raise ValueError(f"got {len(predictions)} predictions for {len(truths)} samples")
    if not predictions:
        raise ValueError("no samples to score")
    ape: list[float] = []
    abs_errors: list[float] = []
    for pred, truth in zip(predictions, truths, strict=True):
        true_price = float(truth["price"])  # type: ignore[arg-type]
        error = price_ape(pred.price, true_price)
        ape.append(1.0 if error is None else error)  # an unread price counts as 100 % off
        if pred.price is not None:
            abs_errors.append(abs(pred.price - true_price))
    n = len(predictions)
    return {
        "parse_rate": sum(p.ok for p in predictions) / n,
        "price_ape_median": statistics.median(ape),
        "price_ape_mean": sum(ape) / n,
        "price_mae": sum(abs_errors) / len(abs_errors) if abs_errors else math.nan,
        "category_accuracy": sum(
            category_matches(p.category, str(t["category"])) for p, t in zip(predictions, truths, strict=True)
        )
        / n,
        "title_similarity": sum(
            fuzz.ratio(_fold(p.title), _fold(str(t["title"]))) / 100.0 for p, t in zip(predictions, truths, strict=True)
        )
        / n,
    }
