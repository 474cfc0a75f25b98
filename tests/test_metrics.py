"""Answer templates (format + parse) and the scores of parsed answers, on hand-computed examples; the optimal
constants of the baselines against brute force."""

from __future__ import annotations

import math
import random
import re
import statistics

import numpy as np
import pytest

from phi3v.metrics import (
    DEFAULT_ANSWER_TEMPLATE,
    HIGHER_IS_BETTER,
    OPTIMAL_BASELINES,
    PRICE_SCORES,
    PRICE_TEXT_PATTERN,
    SPLIT_OPTIMAL,
    AnswerTemplate,
    Baseline,
    ParsedAnswer,
    baseline_predictions,
    category_matches,
    category_metrics,
    confusion_matrix,
    optimal_constant,
    parse_answer_price,
    per_category,
    price_ape,
    price_metrics,
    price_smape,
    sample_scores,
    score_predictions,
    title_metrics,
)

ROW = {"title": "Vintage Check, Cotton Scarf", "category": "SCARVES", "price": 1250.0, "id": "x"}
NOTHING = ParsedAnswer(None, None, None)

PRICE_SCORE_KEYS = [
    "price_mae",
    "price_mape",
    "price_smape",
    "price_ape_median",
    "price_within_10",
    "price_within_25",
    "price_rmsle",
]
PRICE_KEYS = ["price_n", "price_coverage", *PRICE_SCORE_KEYS, *(f"{key}_parsed" for key in PRICE_SCORE_KEYS)]
CATEGORY_KEYS = ["category_accuracy", "category_macro_f1"]
TITLE_KEYS = ["title_exact_match", "title_similarity", "title_token_f1"]


# ------------------------------------------------------------------------------------------------------- parsing
def test_default_template_round_trips_titles_with_commas():
    template = AnswerTemplate()
    text = template.format(ROW)
    assert text == "Product: Vintage Check, Cotton Scarf, Category: SCARVES, Full Price: 1250"  # not 1250.0
    assert template.parse(text) == ParsedAnswer("Vintage Check, Cotton Scarf", "SCARVES", 1250.0)
    assert template.parse(text + "<|end|>garbage") == ParsedAnswer("Vintage Check, Cotton Scarf", "SCARVES", 1250.0)


@pytest.mark.parametrize(
    ("answer", "price"),
    [
        ("Product: A, Category: B, Full Price: 1,250.00", 1250.0),
        ("Product: A, Category: B, Full Price: $990", 990.0),
        ("Product: A, Category: B, Full Price: $1,290.00", 1290.0),
        ("Product: A, Category: B, Full Price: USD 1 290", 1290.0),
        ("Product: A, Category: B, Full Price: 1,290", 1290.0),
        ("Product: A, Category: B, Full Price: €1.290,00", 1290.0),
        ("  Product:  A,  Category: B,   Full Price: 89.9 ", 89.9),
        ("Product: A, Category: B, Full Price: cheap", None),
        ("Product: A, Category: B, Full Price: 12 or 13", None),  # two numbers: no guess
        ("Product: A, Category: B, Full Price: 0", 0.0),  # a zero is a prediction (scored: APE 1), not missing
        ("Product: A, Category: B, Full Price: $0.00", 0.0),
        ("Product: A, Category: B, Full Price: -50", None),  # a sign: unreadable, so missing (scored as 0)
        ("Product: A, Category: B, Full Price: -0", None),
        ("Product: A, Category: B, Full Price: 0 or 0", None),
        ("Product: A, Category: B, Full Price: ", None),
        # the fallback (the strict template does not match) reads the same prices
        ("product: A,  category : B,  full  price :  $1,290.00", 1290.0),
        ("PRODUCT: A; CATEGORY: B; FULL PRICE: USD 1 290;", 1290.0),
        ("Product: A\nCategory: B\nFull Price: 0", 0.0),
    ],
)
def test_prices_parse_as_one_number_of_at_least_zero(answer, price):
    parsed = AnswerTemplate().parse(answer)
    assert (parsed.title, parsed.category, parsed.price) == ("A", "B", price)
    assert parsed.ok is (price is not None)
    assert parsed.missing == (() if price is not None else ("price",))


def test_answer_prices_read_zero_and_nothing_else_catalog_parsing_refuses():
    assert [parse_answer_price(text) for text in ("0", "00", "0.0", "0,00", "USD 0", "$ 0")] == [0.0] * 6
    assert [parse_answer_price(text) for text in ("-0", "+0", "0e3", "0 or 0", "zero", "0-0", "")] == [None] * 7
    assert parse_answer_price("0.50") == 0.5 and parse_answer_price("$1,290") == 1290.0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # missing price / missing category: the other fields still parse
        ("Product: X, Category: BAGS", ("X", "BAGS", None)),
        ("Product: X, Full Price: 100", ("X", None, 100.0)),
        ("Category: BAGS, Full Price: 1,290", (None, "BAGS", 1290.0)),
        # reordered fields, other case, flexible whitespace around the label's words and colon
        ("Category: BAGS ; full  Price : $1,290.00, PRODUCT: Blue Bag", ("Blue Bag", "BAGS", 1290.0)),
        ("Full Price: 75, Product: Scarf, Category: SCARVES,", ("Scarf", "SCARVES", 75.0)),
        # an empty value is None
        ("Product: , Category: BAGS, Full Price: 10", (None, "BAGS", 10.0)),
        ("Product:,Category:,Full Price:", (None, None, None)),
        # text after <|end|> is ignored, so the price there is not read
        ("Product: A, Category: B<|end|>, Full Price: 100", ("A", "B", None)),
        # a label must stand alone: "Subcategory:" is not "Category:"
        ("Product: A; Subcategory: B; Category: C", ("A; Subcategory: B", "C", None)),
        # the first occurrence of a repeated label wins; every label ends the value before it
        ("Category: B, Category: C, Product: A", ("A", "B", None)),
        # garbage and empty text
        ("a red scarf for 100 dollars", (None, None, None)),
        ("", (None, None, None)),
        ("   <|end|>Product: A, Category: B, Full Price: 1", (None, None, None)),
    ],
)
def test_label_fallback(answer, expected):
    parsed = AnswerTemplate().parse(answer)
    assert (parsed.title, parsed.category, parsed.price) == expected
    assert parsed.missing == tuple(
        name for name, value in zip(("title", "category", "price"), expected, strict=True) if value is None
    )


def test_labels_and_parts_of_the_default_template():
    template = AnswerTemplate()
    assert template.parts == [("Product: ", "title"), (", Category: ", "category"), (", Full Price: ", "price")]
    assert template.labels == {"title": "Product:", "category": "Category:", "price": "Full Price:"}
    assert AnswerTemplate("{title} costs {price:.2f} dollars.").parts == [
        ("", "title"),
        (" costs ", "price"),
        (" dollars.", None),
    ]


def test_fallback_reads_only_labelled_fields():
    template = AnswerTemplate("{title} - Price: {price}")
    assert template.labels == {"price": "Price:"}
    assert template.parse("Blue Bag - Price: 20") == ParsedAnswer("Blue Bag", None, 20.0, ("title", "price"))
    # strict match fails (no " - "): only the labelled price is read
    parsed = template.parse("Blue Bag, price: $20")
    assert parsed == ParsedAnswer(None, None, 20.0, ("title", "price"))
    assert parsed.missing == ("title",) and not parsed.ok
    # no label at all (separators and "$" are not labels): the fallback finds nothing
    template = AnswerTemplate("{category} | {title} | ${price:.2f}")
    assert template.labels == {}
    assert template.parse("SCARVES / Scarf / 12") == ParsedAnswer(None, None, None, ("category", "title", "price"))


def test_the_longest_overlapping_label_wins():
    template = AnswerTemplate("Name: {title}. Price: {category}. Full Price: {price}")
    assert template.labels == {"title": "Name:", "category": "Price:", "price": "Full Price:"}
    # "full price:" holds "price:"; it is read as the price's label, not the category's
    assert template.parse("full price: 5 price: SHOES name: X") == ParsedAnswer("X", "SHOES", 5.0)


def test_text_that_does_not_follow_the_template_gives_nothing():
    assert AnswerTemplate().parse("a red scarf for 100 dollars") == NOTHING
    assert AnswerTemplate().parse("") == NOTHING
    assert NOTHING.missing == ("title", "category", "price")


def test_custom_template_with_format_spec():
    template = AnswerTemplate("{category} | {title} | ${price:.2f}")
    assert template.format(ROW) == "SCARVES | Vintage Check, Cotton Scarf | $1250.00"
    assert template.parse("SCARVES | Vintage Check, Cotton Scarf | $1250.00").price == 1250.0
    assert AnswerTemplate("Costs {price}").parse("Costs 12").title is None
    assert AnswerTemplate("Costs {price}").parse("it costs about 12 USD").price == 12.0  # via the label "Costs"


@pytest.mark.parametrize(
    ("price", "text"),
    [(590.0, "590"), (590, "590"), (590.5, "590.5"), (12.99, "12.99"), (1290.05, "1290.05"), (0.5, "0.5")],
)
def test_plain_price_is_written_as_the_catalog_shows_it_and_reads_back(price, text):
    template = AnswerTemplate()
    answer = template.format({**ROW, "price": price})
    assert answer.endswith(f"Full Price: {text}")
    assert template.parse(answer).price == pytest.approx(float(price))
    assert re.fullmatch(PRICE_TEXT_PATTERN, text)  # what constrained decoding allows for a price


@pytest.mark.parametrize(
    ("spec", "price", "text"),
    [(".2f", 590.0, "590.00"), (".2f", 590.5, "590.50"), (".0f", 590.0, "590"), (".1f", 12.99, "13.0")],
)
def test_price_format_spec_chooses_the_written_form(spec, price, text):
    template = AnswerTemplate(f"Product: {{title}}, Full Price: {{price:{spec}}}")
    answer = template.format({**ROW, "price": price})
    assert answer == f"Product: {ROW['title']}, Full Price: {text}"
    assert template.parse(answer).price == float(text)  # parsing unchanged: the written number


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Full Price: {price:d}", "{price:d} cannot format a price such as 590.0"),
        ("Full Price: {price:x}", "{price:x} cannot format a price"),
        ("Full Price: {price:e}", "{price:e} writes the price 590.0 as '5.900000e+02'"),
        ("Full Price: {price:,.2f}", "{price:,.2f} writes the price 1290.5 as '1,290.50'"),
        ("Full Price: {price:>9}", "is not that price as a plain number"),
        ("Full Price: {price:%}", "{price:%}"),
    ],
)
def test_price_spec_that_cannot_write_a_price_is_refused(template, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AnswerTemplate(template)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Product: {name}", "unknown field {name}"),
        ("{title} {title}", "appears twice"),
        ("Product: {title", "malformed"),
        ("Just text", "has no field"),
        ("{} and {price}", "unknown field {}"),
    ],
)
def test_bad_templates_are_refused(template, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        AnswerTemplate(template)


# ------------------------------------------------------------------------------------------------------- price
def test_price_metrics_on_a_hand_worked_example():
    # sample | p    | t   | scored s | |s-t| | APE  | sMAPE 2|s-t|/(s+t)   | ln(1+s) - ln(1+t)
    # 1      | 110  | 100 | 110      | 10    | 0.10 | 20/210  = 0.0952381 | ln(111/101) =  0.0944085
    # 2      | 150  | 200 | 150      | 50    | 0.25 | 100/350 = 0.2857143 | ln(151/201) = -0.2860179
    # 3      | None | 300 | 0        | 300   | 1.00 | 2 (the maximum)     | ln(1/301)   = -5.7071103
    # 4      | 800  | 400 | 800      | 400   | 1.00 | 800/1200 = 0.6666667 | ln(801/401) =  0.6918980
    # 5      | 0    | 500 | 0        | 500   | 1.00 | 2                   | ln(1/501)   = -6.2166061
    # 6      | -50  | 600 | 0        | 600   | 1.00 | 2 (unusable: scored as missing) | ln(1/601) = -6.3985949
    scores = price_metrics([110.0, 150.0, None, 800.0, 0.0, -50.0], [100.0, 200.0, 300.0, 400.0, 500.0, 600.0])
    assert list(scores) == PRICE_KEYS
    # usable: 110, 150, 800 and the zero (a real prediction); None and -50 are not
    assert scores["price_n"] == 4 and isinstance(scores["price_n"], int)
    assert scores["price_coverage"] == pytest.approx(4 / 6)
    # over all six rows
    assert scores["price_mae"] == pytest.approx((10 + 50 + 300 + 400 + 500 + 600) / 6)
    assert scores["price_mape"] == pytest.approx((0.10 + 0.25 + 4 * 1.0) / 6)
    assert scores["price_ape_median"] == pytest.approx(1.0)  # sorted 0.10 0.25 1 1 1 1: (1 + 1) / 2
    assert scores["price_smape"] == pytest.approx((0.0952381 + 0.2857143 + 2 + 0.6666667 + 2 + 2) / 6, rel=1e-6)
    assert scores["price_within_10"] == pytest.approx(1 / 6)  # the boundary counts
    assert scores["price_within_25"] == pytest.approx(2 / 6)
    squares = [0.0944085, -0.2860179, -5.7071103, 0.6918980, -6.2166061, -6.3985949]
    assert scores["price_rmsle"] == pytest.approx(math.sqrt(sum(x * x for x in squares) / 6), rel=1e-6)
    # over the four usable prices: 110, 150, 800 and 0
    assert scores["price_mae_parsed"] == pytest.approx((10 + 50 + 400 + 500) / 4)
    assert scores["price_mape_parsed"] == pytest.approx((0.10 + 0.25 + 1.0 + 1.0) / 4)
    assert scores["price_ape_median_parsed"] == pytest.approx((0.25 + 1.0) / 2)  # 0.10 0.25 1 1
    assert scores["price_smape_parsed"] == pytest.approx((0.0952381 + 0.2857143 + 0.6666667 + 2) / 4, rel=1e-6)
    assert scores["price_within_10_parsed"] == pytest.approx(1 / 4)
    assert scores["price_within_25_parsed"] == pytest.approx(2 / 4)
    parsed_squares = [0.0944085, -0.2860179, 0.6918980, -6.2166061]
    assert scores["price_rmsle_parsed"] == pytest.approx(math.sqrt(sum(x * x for x in parsed_squares) / 4), rel=1e-6)


def test_a_missing_price_scores_as_a_prediction_of_zero():
    """Missing, NaN, infinite, negative and zero predictions all score as 0; a zero is counted as priced."""
    true = [100.0, 250.0]
    zero = price_metrics([0.0, 0.0], true)
    for predicted in ([None, None], [math.nan, math.inf], [-1.0, -math.inf]):
        scores = price_metrics(predicted, true)
        assert scores["price_n"] == 0 and scores["price_coverage"] == 0.0
        assert {key: scores[key] for key in PRICE_SCORE_KEYS} == {key: zero[key] for key in PRICE_SCORE_KEYS}
        assert all(math.isnan(scores[f"{key}_parsed"]) for key in PRICE_SCORE_KEYS)
    assert zero["price_n"] == 2 and zero["price_coverage"] == 1.0
    assert (zero["price_mape"], zero["price_ape_median"], zero["price_smape"]) == (1.0, 1.0, 2.0)
    assert (zero["price_within_10"], zero["price_within_25"]) == (0.0, 0.0)
    assert zero["price_mae"] == pytest.approx(175.0)
    assert zero["price_rmsle"] == pytest.approx(math.sqrt((math.log(101) ** 2 + math.log(251) ** 2) / 2))
    assert zero["price_smape_parsed"] == 2.0
    empty = price_metrics([], [])
    assert empty["price_n"] == 0 and all(math.isnan(empty[key]) for key in PRICE_KEYS[1:])


def test_price_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match="1 predictions for 2 samples"):
        price_metrics([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        price_metrics([1.0], [0.0])


def test_single_price_error_and_category_match():
    assert price_ape(110.0, 100.0) == pytest.approx(0.1)
    assert price_ape(None, 100.0) is None and price_ape(-5.0, 100.0) is None
    assert price_ape(0.0, 100.0) == 1.0 and price_smape(0.0, 100.0) == 2.0
    assert price_smape(150.0, 200.0) == pytest.approx(100 / 350) and price_smape(None, 1.0) is None
    assert category_matches(" bags ", "BAGS") and not category_matches(None, "BAGS")


# ------------------------------------------------------------------------------------------------------- category
def test_category_macro_f1_over_three_labels_with_an_unparsed_answer():
    true = ["A", "A", "A", "B", "C", "C"]
    pred = ["a", "A", "B", "b", None, " c "]
    # A: TP 2, predicted 2, true 3 -> P 1, R 2/3, F1 = 2 * (2/3) / (5/3) = 0.8
    # B: TP 1, predicted 2, true 1 -> P 1/2, R 1, F1 = 1 / 1.5 = 2/3
    # C: TP 1, predicted 1, true 2 (the unparsed one is a miss) -> P 1, R 1/2, F1 = 2/3
    # macro = (0.8 + 2/3 + 2/3) / 3 = 0.7111111; accuracy = 4 / 6
    scores = category_metrics(pred, true)
    assert list(scores) == CATEGORY_KEYS
    assert scores["category_accuracy"] == pytest.approx(2 / 3)
    assert scores["category_macro_f1"] == pytest.approx((0.8 + 2 / 3 + 2 / 3) / 3)


def test_category_macro_f1_counts_out_of_vocabulary_predictions():
    # labels A, B, Z: A F1 1; B no prediction, R 0 -> F1 0; Z never true, P 0 -> F1 0; macro 1/3
    scores = category_metrics(["A", "Z"], ["A", "B"])
    assert scores["category_accuracy"] == pytest.approx(0.5)
    assert scores["category_macro_f1"] == pytest.approx(1 / 3)
    assert category_metrics([None], ["A"]) == {"category_accuracy": 0.0, "category_macro_f1": 0.0}
    empty = category_metrics([], [])
    assert math.isnan(empty["category_accuracy"]) and math.isnan(empty["category_macro_f1"])


def test_confusion_matrix_with_an_out_of_vocabulary_and_an_unparsed_prediction():
    true = ["Bags", "SHOES", "bags", "Shoes", "bags"]
    pred = ["BAGS", "Hats", None, "shoes ", "scarves"]
    result = confusion_matrix(pred, true)
    assert result["labels"] == ["Bags", "SHOES"]  # sorted, first spelling seen in the truth
    assert result["columns"] == ["Bags", "SHOES", "Hats", "scarves", "(unparsed)"]
    assert result["matrix"] == [
        [1, 0, 0, 1, 1],  # Bags: BAGS, scarves, unparsed
        [0, 1, 1, 0, 0],  # SHOES: Hats, "shoes "
    ]
    assert all(isinstance(cell, int) for row in result["matrix"] for cell in row)


# ------------------------------------------------------------------------------------------------------- title
def test_title_metrics_on_a_hand_worked_example():
    pred = ["Red Check  scarf", "Blue Bog", None]
    true = ["red check scarf", "Blue Bag", "Green Coat"]
    # exact: 1, 0, 0 -> 1/3
    # similarity: 1.0; "blue bog" vs "blue bag" 1 edit over 8 chars -> 0.875; "" vs "green coat" -> 0; mean 0.625
    # token F1: 1.0; {blue, bog} vs {blue, bag}: 1 common, P = R = 1/2 -> 0.5; no tokens -> 0; mean 0.5
    scores = title_metrics(pred, true)
    assert list(scores) == TITLE_KEYS
    assert scores["title_exact_match"] == pytest.approx(1 / 3)
    assert scores["title_similarity"] == pytest.approx(0.625)
    assert scores["title_token_f1"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("pred", "true", "f1"),
    [
        # [vintage, cotton, scarf, large] vs [vintage, check, cotton, scarf]: 3 common, P = R = 3/4 -> 0.75
        ("Vintage cotton scarf - LARGE", "Vintage Check, Cotton Scarf", 0.75),
        # multisets: [red, red, bag] vs [red, bag, bag]: common min(2,1) + min(1,2) = 2, P = R = 2/3
        ("red red bag", "red bag bag", 2 / 3),
        # [bag] vs [red, bag]: 1 common, P 1, R 1/2 -> 2 * 0.5 / 1.5 = 2/3
        ("Bag!", "Red Bag", 2 / 3),
        ("T-Shirt (Large)", "tshirt large", 1.0),  # punctuation removed inside and around words
        ("", "Red Bag", 0.0),
        ("---", "", 1.0),  # neither side has a token
    ],
)
def test_title_token_f1(pred, true, f1):
    assert title_metrics([pred], [true])["title_token_f1"] == pytest.approx(f1)


def test_empty_titles():
    assert title_metrics([None], [""]) == {"title_exact_match": 1.0, "title_similarity": 1.0, "title_token_f1": 1.0}
    assert title_metrics(["x"], [""]) == {"title_exact_match": 0.0, "title_similarity": 0.0, "title_token_f1": 0.0}


# ------------------------------------------------------------------------------------------------------- overall
TRUTHS = [
    {"title": "Red Check Scarf", "category": "SCARVES", "price": 100.0},
    {"title": "Blue Bag", "category": "BAGS", "price": 200.0},
    {"title": "Green Coat", "category": "COATS", "price": 400.0},
]
PREDICTIONS = [
    ParsedAnswer("red check  scarf", "scarves", 110.0),  # folded title and category match; 10 % off
    ParsedAnswer("Blue Bog", "SHOES", 150.0),  # 25 % off
    NOTHING,  # unparsable: no price scored, wrong category, empty title
]


def test_scores_on_a_hand_worked_example():
    scores = score_predictions(PREDICTIONS, TRUTHS)
    assert list(scores) == ["n", "parse_rate", "parse_failures", *TITLE_KEYS, *CATEGORY_KEYS, *PRICE_KEYS]
    assert scores["n"] == 3 and scores["parse_failures"] == 1
    assert scores["parse_rate"] == pytest.approx(2 / 3)
    # price over all 3 rows, the unparsed one scored as a prediction of 0: APE 0.10, 0.25, 1
    assert scores["price_n"] == 2
    assert scores["price_coverage"] == pytest.approx(2 / 3)
    assert scores["price_mae"] == pytest.approx(460 / 3)  # (10 + 50 + 400) / 3
    assert scores["price_mape"] == pytest.approx(1.35 / 3)  # (0.10 + 0.25 + 1) / 3
    assert scores["price_ape_median"] == pytest.approx(0.25)
    assert scores["price_smape"] == pytest.approx((20 / 210 + 100 / 350 + 2) / 3)
    assert scores["price_within_10"] == pytest.approx(1 / 3)
    assert scores["price_within_25"] == pytest.approx(2 / 3)
    # ln(111/101) = 0.0944085, ln(151/201) = -0.2860179, ln(1/401) = -5.9939614
    assert scores["price_rmsle"] == pytest.approx(math.sqrt((0.0944085**2 + 0.2860179**2 + 5.9939614**2) / 3), rel=1e-6)
    # the 2 parsed alone
    assert scores["price_mae_parsed"] == pytest.approx(30.0)  # (10 + 50) / 2
    assert scores["price_mape_parsed"] == pytest.approx(0.175)
    assert scores["price_ape_median_parsed"] == pytest.approx(0.175)  # median of two = their mean
    assert scores["price_smape_parsed"] == pytest.approx((20 / 210 + 100 / 350) / 2)
    assert scores["price_within_10_parsed"] == 0.5 and scores["price_within_25_parsed"] == 1.0
    # category: 1 of 3 right; labels scarves (F1 1), bags, coats, shoes (F1 0 each) -> macro 1/4
    assert scores["category_accuracy"] == pytest.approx(1 / 3)
    assert scores["category_macro_f1"] == pytest.approx(0.25)
    # title: exact 1/3; similarity (1 + 0.875 + 0) / 3; token F1 (1 + 0.5 + 0) / 3
    assert scores["title_exact_match"] == pytest.approx(1 / 3)
    assert scores["title_similarity"] == pytest.approx(1.875 / 3)
    assert scores["title_token_f1"] == pytest.approx(0.5)


def test_scores_need_matching_non_empty_inputs():
    with pytest.raises(ValueError, match="no samples"):
        score_predictions([], [])
    with pytest.raises(ValueError, match="1 predictions for 2 samples"):
        score_predictions([NOTHING], [ROW, ROW])
    with pytest.raises(ValueError, match="fields"):
        score_predictions([NOTHING], [ROW], fields=["colour"])
    scores = score_predictions([NOTHING], [ROW])
    assert scores["price_n"] == 0 and scores["price_coverage"] == 0.0
    assert scores["price_mae"] == 1250.0 and scores["price_smape"] == 2.0  # missing: scored as a prediction of 0
    assert math.isnan(scores["price_mae_parsed"]) and math.isnan(scores["price_rmsle_parsed"])
    assert scores["parse_rate"] == 0.0 and scores["parse_failures"] == 1
    assert DEFAULT_ANSWER_TEMPLATE.startswith("Product: {title}")


def test_parse_rate_counts_only_the_template_fields():
    template = AnswerTemplate("{title} | {price}")
    parsed = template.parse("Blue Bag | 200")
    assert parsed.ok and parsed.category is None
    scores = score_predictions([parsed], [{"title": "Blue Bag", "category": "BAGS", "price": 200.0}])
    assert list(scores) == ["n", "parse_rate", "parse_failures", *TITLE_KEYS, *PRICE_KEYS]
    assert scores["parse_rate"] == 1.0 and scores["price_ape_median"] == 0.0


def test_explicit_fields_choose_the_groups_and_the_parse_rate():
    scores = score_predictions(PREDICTIONS, TRUTHS, fields=["price"])
    assert list(scores) == ["n", "parse_rate", "parse_failures", *PRICE_KEYS]
    assert scores["parse_failures"] == 1
    # a category-only view: the second answer's category "SHOES" parsed, so only the third fails
    scores = score_predictions([ParsedAnswer("x", "SHOES", None), NOTHING], TRUTHS[:2], fields=["category"])
    assert scores["parse_rate"] == pytest.approx(0.5)
    assert list(scores) == ["n", "parse_rate", "parse_failures", *CATEGORY_KEYS]


def test_per_category():
    truths = [
        {"title": "Scarf A", "category": "SCARVES", "price": 100.0},
        {"title": "Scarf B", "category": "scarves", "price": 200.0},
        {"title": "Bag", "category": "BAGS", "price": 300.0},
    ]
    predictions = [ParsedAnswer("Scarf A", "SCARVES", 110.0), NOTHING, ParsedAnswer("Bag", "SCARVES", 300.0)]
    result = per_category(predictions, truths)
    assert list(result) == ["BAGS", "SCARVES"]  # sorted; the truth's first spelling
    assert all("category_macro_f1" not in scores for scores in result.values())
    bags, scarves = result["BAGS"], result["SCARVES"]
    assert (bags["n"], bags["parse_rate"], bags["category_accuracy"]) == (1, 1.0, 0.0)
    assert (bags["price_mape"], bags["title_exact_match"]) == (0.0, 1.0)
    assert (scarves["n"], scarves["parse_failures"], scarves["parse_rate"]) == (2, 1, 0.5)
    assert scarves["category_accuracy"] == 0.5
    assert (scarves["price_n"], scarves["price_coverage"]) == (1, 0.5)
    assert scarves["price_mape"] == pytest.approx(0.55)  # 110 vs 100 and the unparsed one: (0.1 + 1) / 2
    assert scarves["price_mape_parsed"] == pytest.approx(0.1)  # only the parsed 110 vs 100
    assert scarves["title_exact_match"] == 0.5
    by_price = per_category(predictions, truths, fields=["price"])
    assert list(by_price["BAGS"]) == ["n", "parse_rate", "parse_failures", *PRICE_KEYS]


def test_sample_scores():
    truth = {"title": "Blue Bag", "category": "BAGS", "price": 200.0}
    scores = sample_scores(ParsedAnswer("Blue Bog", " bags", 150.0), truth)
    assert scores == {
        "price_ape": pytest.approx(0.25),
        "price_smape": pytest.approx(100 / 350),
        "price_abs_error": pytest.approx(50.0),
        "category_ok": True,
        "title_exact": False,
        "title_similarity": pytest.approx(0.875),
        "title_token_f1": pytest.approx(0.5),
    }
    assert sample_scores(NOTHING, truth) == {
        "price_ape": None,
        "price_smape": None,
        "price_abs_error": None,
        "category_ok": False,
        "title_exact": False,
        "title_similarity": 0.0,
        "title_token_f1": 0.0,
    }


# ------------------------------------------------------------------------------------------------------- baselines
TRAIN = [
    {"title": "Cap", "category": "Hats", "price": 1000.0},
    {"title": "Tote", "category": "Bags", "price": 100.0},
    {"title": "tote", "category": "BAGS", "price": 300.0},
    {"title": "Boot", "category": "SHOES", "price": 50.0},
    {"title": "Boot", "category": "shoes", "price": 70.0},
    {"title": "cap", "category": "HATS", "price": 20.0},
]
TEST = [
    {"title": "Tote", "category": "BAGS", "price": 250.0},
    {"title": "Boot", "category": "Shoes", "price": 60.0},
    {"title": "Silk Scarf", "category": "SCARVES", "price": 85.0},  # unseen in training
]


def test_baselines_on_a_toy_split():
    baselines = baseline_predictions(TRAIN, TEST)
    assert list(baselines) == [
        "global_median_price",
        "category_median_price",
        "category_mape_optimal_price",
        "category_median_ape_optimal_price",
        "category_smape_optimal_price",
        "category_within_10_optimal_price",
        "category_within_25_optimal_price",
        "category_rmsle_optimal_price",
        "majority_category",
        "most_frequent_title",
    ]
    assert all(isinstance(b, Baseline) and b.description for b in baselines.values())
    assert all("upper bound" not in b.description for b in baselines.values())

    # prices sorted 20, 50, 70, 100, 300, 1000: the median of an even count is (70 + 100) / 2 = 85
    global_median = baselines["global_median_price"]
    assert global_median.fields == ("price",)
    assert global_median.predictions == [ParsedAnswer(None, None, 85.0, ("price",))] * 3
    assert all(p.ok for p in global_median.predictions)

    # bags (100, 300) -> 200; shoes (50, 70) -> 60; scarves unseen -> global median 85
    by_category = baselines["category_median_price"]
    assert [p.price for p in by_category.predictions] == [200.0, 60.0, 85.0]
    scores = score_predictions(by_category.predictions, TEST, by_category.fields)
    assert scores["parse_rate"] == 1.0 and "category_accuracy" not in scores
    assert scores["price_mape"] == pytest.approx((50 / 250 + 0 + 0) / 3)
    assert (by_category.metric, by_category.optimal_for) == ("price_ape_median", "price_mae")

    # MAPE: weighted medians with weights 1/price. bags 100 (w 0.01), 300 (0.0033): 100 holds half the weight
    # alone; shoes 50 (0.02), 70 (0.014): 50; all six: 20 has w 0.05 of 0.0986 in all, so 20 for the scarves
    mape = baselines["category_mape_optimal_price"]
    assert [p.price for p in mape.predictions] == [100.0, 50.0, 20.0]
    assert (mape.metric, mape.optimal_for) == ("price_mape", "price_mape")
    # SMAPE: the best training price. bags: S(100) = S(300) = 1, the tie to the lower; shoes: S(50) = S(70) = 1/3;
    # all six: S(70) = 4.779 beats S(100) = 4.989, S(50) = 5.095, S(300) = 6.50, S(20) = 6.97
    smape = baselines["category_smape_optimal_price"]
    assert [p.price for p in smape.predictions] == [100.0, 50.0, 70.0]
    # median APE of two prices is half their MAPE: the same as the MAPE optimum per category
    assert [p.price for p in baselines["category_median_ape_optimal_price"].predictions][:2] == [100.0, 50.0]
    # within 25 %: shoes' intervals [37.5, 62.5] and [52.5, 87.5] overlap on [52.5, 62.5]: its middle, 57.5
    within = baselines["category_within_25_optimal_price"]
    assert [p.price for p in within.predictions][:2] == pytest.approx([100.0, 57.5])
    assert score_predictions(within.predictions[1:2], TEST[1:2], ("price",))["price_within_25"] == 1.0
    # RMSLE: exp(mean(ln(1 + t))) - 1; for bags sqrt(101 * 301) - 1
    rmsle = baselines["category_rmsle_optimal_price"]
    assert rmsle.predictions[0].price == pytest.approx(math.sqrt(101 * 301) - 1)
    assert all(b.fields == ("price",) and all(p.ok for p in b.predictions) for b in (mape, smape, within, rmsle))

    # categories bags, hats, shoes 2 each: the tie goes to "bags" (first alphabetically, not first seen), spelt
    # as first seen
    majority = baselines["majority_category"]
    assert majority.fields == ("category",)
    assert majority.predictions == [ParsedAnswer(None, "Bags", None, ("category",))] * 3
    assert score_predictions(majority.predictions, TEST, majority.fields)["category_accuracy"] == pytest.approx(1 / 3)

    # titles cap, tote, boot 2 each (folded): "Boot" first alphabetically
    title = baselines["most_frequent_title"]
    assert title.fields == ("title",)
    assert [p.title for p in title.predictions] == ["Boot"] * 3
    assert score_predictions(title.predictions, TEST, title.fields)["title_exact_match"] == pytest.approx(1 / 3)


def test_baselines_without_ties_and_without_training_rows():
    train = [*TRAIN, {"title": "Cap", "category": "hats", "price": 40.0}]  # hats and cap now lead with 3
    baselines = baseline_predictions(train, TEST[:1])
    assert baselines["majority_category"].predictions[0].category == "Hats"
    assert baselines["most_frequent_title"].predictions[0].title == "Cap"
    assert baselines["global_median_price"].predictions[0].price == 70.0  # 20 40 50 70 100 300 1000
    with pytest.raises(ValueError, match="training row"):
        baseline_predictions([], TEST)


# ------------------------------------------------------------------------------------------------ optimal constants
def _brute_force_candidates(prices: list[float]) -> np.ndarray:
    """A fine geometric grid over the prices' range and beyond, the prices, their pairwise harmonic means (where two
    APEs cross) and their 10 % / 25 % interval ends: every place a score of a constant can bend or jump, and more."""
    t = np.array(prices)
    pieces = [
        np.geomspace(t.min() / 3, t.max() * 3, 1500),
        t,
        (2 * t[:, None] * t[None, :] / (t[:, None] + t[None, :])).ravel(),
        *(t * factor for factor in (0.9, 1.1, 0.75, 1.25)),
    ]
    return np.unique(np.concatenate(pieces))


def _random_prices(rng: random.Random, n: int) -> list[float]:
    if rng.random() < 0.4:  # few distinct prices: ties and duplicates
        return [float(rng.choice([50, 90, 120, 300, 990])) for _ in range(n)]
    return [round(math.exp(rng.gauss(6, 1)), 2) for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_optimal_constant_beats_every_brute_force_candidate(seed):
    """For each price score, the fitted constant scores at least as well (by `price_metrics` itself) as every
    candidate of a fine brute-force search; so, for SMAPE, the claim that a minimiser lies at a data point holds."""
    rng = random.Random(seed)
    for n in (1, 2, 3, 4, 5, 8, 13):
        prices = _random_prices(rng, n)
        candidates = _brute_force_candidates(prices)
        brute = [price_metrics([float(c)] * n, prices) for c in candidates]
        for metric in PRICE_SCORES:
            constant = optimal_constant(prices, metric)
            ours = price_metrics([constant] * n, prices)[metric]
            values = [scores[metric] for scores in brute]
            best = max(values) if metric in HIGHER_IS_BETTER else min(values)
            if metric in HIGHER_IS_BETTER:
                assert ours >= best - 1e-12, (metric, prices, constant, ours, best)
            else:
                assert ours <= best + 1e-9 * max(1.0, best), (metric, prices, constant, ours, best)


def test_optimal_constants_in_closed_form():
    prices = [10.0, 20.0, 40.0, 80.0]
    assert optimal_constant(prices, "price_mae") == statistics.median(prices) == 30.0
    # weights 0.1, 0.05, 0.025, 0.0125 (sum 0.1875): 10 alone holds more than half
    assert optimal_constant(prices, "price_mape") == 10.0
    assert optimal_constant([100.0, 100.0, 400.0], "price_mape") == 100.0
    assert optimal_constant(prices, "price_rmsle") == pytest.approx(
        math.exp(sum(math.log1p(t) for t in prices) / 4) - 1
    )
    # the median APE over an odd count: the tightest window of 2 of 3 prices, at its harmonic mean
    # windows (100, 110): (110 - 100) / 210; (110, 300): 190 / 410; so c = 2 * 100 * 110 / 210
    assert optimal_constant([100.0, 110.0, 300.0], "price_ape_median") == pytest.approx(2 * 100 * 110 / 210)
    with pytest.raises(ValueError, match="no optimal constant"):
        optimal_constant(prices, "price_coverage")
    with pytest.raises(ValueError, match="at least one price"):
        optimal_constant([], "price_mape")
    with pytest.raises(ValueError, match="positive"):
        optimal_constant([0.0], "price_mape")


def test_optimal_constants_of_many_prices_are_exact_and_fast():
    """A catalog-sized category (3,000 prices, many repeated): the median-APE search against every pairwise
    candidate, the rest against a grid, all in well under a second each."""
    import time

    rng = random.Random(7)
    prices = [float(round(math.exp(rng.gauss(6.5, 0.8)) / 10) * 10) for _ in range(3000)]
    t = np.array(prices)
    grid = [price_metrics([float(c)] * len(prices), prices) for c in np.geomspace(t.min(), t.max(), 40)]
    for metric in PRICE_SCORES:
        started = time.perf_counter()
        constant = optimal_constant(prices, metric)
        assert time.perf_counter() - started < 5.0, metric
        ours = price_metrics([constant] * len(prices), prices)[metric]
        others = [scores[metric] for scores in grid]
        assert (ours >= max(others) - 1e-12) if metric in HIGHER_IS_BETTER else (ours <= min(others) + 1e-12)
    # the median APE: exhaustively over the distinct prices and the harmonic means of distinct price pairs
    values = np.unique(t)
    pairs = (2 * values[:, None] * values[None, :] / (values[:, None] + values[None, :])).ravel()
    candidates = np.unique(np.concatenate([values, pairs]))
    exhaustive = min(float(np.median(np.abs(c - t) / t)) for c in candidates)
    constant = optimal_constant(prices, "price_ape_median")
    assert float(np.median(np.abs(constant - t) / t)) == pytest.approx(exhaustive, abs=1e-12)


def test_category_baselines_are_optimal_per_category_on_the_training_split():
    """Scored on the training rows themselves, each fitted baseline is at least as good as the brute-force best
    constant of each category (for the scores that are means over rows, this makes it the best of all predictors
    with one price per category over the whole split; for the median APE, within each category)."""
    rng = random.Random(3)
    train = [
        {"title": f"item {i}", "category": category, "price": price}
        for i, (category, price) in enumerate(
            (category, price) for category in ("Bags", "Shoes", "Hats") for price in _random_prices(rng, 7)
        )
    ]
    baselines = baseline_predictions(train, train)
    by_category = {c: [i for i, row in enumerate(train) if row["category"] == c] for c in ("Bags", "Shoes", "Hats")}
    for metric, (name, _how, _label) in OPTIMAL_BASELINES.items():
        baseline = baselines[name]
        assert (baseline.metric, baseline.optimal_for) == (metric, metric)
        best_constants = []
        for rows in by_category.values():
            prices = [train[i]["price"] for i in rows]
            fitted = {baseline.predictions[i].price for i in rows}
            assert len(fitted) == 1  # one constant per category
            ours = price_metrics([fitted.pop()] * len(rows), prices)[metric]
            brute = [
                (price_metrics([float(c)] * len(rows), prices)[metric], float(c))
                for c in _brute_force_candidates(prices)
            ]
            best_value, best_c = max(brute) if metric in HIGHER_IS_BETTER else min(brute)
            assert (ours >= best_value - 1e-12) if metric in HIGHER_IS_BETTER else (ours <= best_value + 1e-9)
            best_constants += [(i, best_c) for i in rows]
        if metric in SPLIT_OPTIMAL:
            split = score_predictions(baseline.predictions, train, ("price",))[metric]
            best_per_row = dict(best_constants)
            brute_split = price_metrics([best_per_row[i] for i in range(len(train))], [r["price"] for r in train])
            if metric in HIGHER_IS_BETTER:
                assert split >= brute_split[metric] - 1e-12
            else:
                assert split <= brute_split[metric] + 1e-9
