"""Answer templates (format + parse) and the scores of parsed answers, on hand-computed examples."""

from __future__ import annotations

import math

import pytest

from phi3v.metrics import (
    DEFAULT_ANSWER_TEMPLATE,
    AnswerTemplate,
    Baseline,
    ParsedAnswer,
    baseline_predictions,
    category_matches,
    category_metrics,
    confusion_matrix,
    per_category,
    price_ape,
    price_metrics,
    sample_scores,
    score_predictions,
    title_metrics,
)

ROW = {"title": "Vintage Check, Cotton Scarf", "category": "SCARVES", "price": 1250.0, "id": "x"}
NOTHING = ParsedAnswer(None, None, None)

PRICE_KEYS = [
    "price_n",
    "price_coverage",
    "price_mae",
    "price_mape",
    "price_smape",
    "price_ape_median",
    "price_within_10",
    "price_within_25",
    "price_rmse_log",
]
CATEGORY_KEYS = ["category_accuracy", "category_macro_f1"]
TITLE_KEYS = ["title_exact_match", "title_similarity", "title_token_f1"]


# ------------------------------------------------------------------------------------------------------- parsing
def test_default_template_round_trips_titles_with_commas():
    template = AnswerTemplate()
    text = template.format(ROW)
    assert text == "Product: Vintage Check, Cotton Scarf, Category: SCARVES, Full Price: 1250.0"
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
        ("Product: A, Category: B, Full Price: 0", None),  # not a positive price
        ("Product: A, Category: B, Full Price: ", None),
        # the fallback (the strict template does not match) reads the same prices
        ("product: A,  category : B,  full  price :  $1,290.00", 1290.0),
        ("PRODUCT: A; CATEGORY: B; FULL PRICE: USD 1 290;", 1290.0),
        ("Product: A\nCategory: B\nFull Price: 0", None),
    ],
)
def test_prices_parse_as_one_positive_number(answer, price):
    parsed = AnswerTemplate().parse(answer)
    assert (parsed.title, parsed.category, parsed.price) == ("A", "B", price)
    assert parsed.ok is (price is not None)
    assert parsed.missing == (() if price is not None else ("price",))


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
    # sample | p    | t   | |p-t| | APE  | sMAPE 2|p-t|/(p+t)   | ln p - ln t
    # 1      | 110  | 100 | 10    | 0.10 | 20/210  = 0.0952381 | ln 1.1  =  0.0953102
    # 2      | 150  | 200 | 50    | 0.25 | 100/350 = 0.2857143 | ln 0.75 = -0.2876821
    # 3      | None | 300 | (not scored: no price)
    # 4      | 800  | 400 | 400   | 1.00 | 800/1200 = 0.6666667 | ln 2    =  0.6931472
    scores = price_metrics([110.0, 150.0, None, 800.0], [100.0, 200.0, 300.0, 400.0])
    assert list(scores) == PRICE_KEYS
    assert scores["price_n"] == 3 and isinstance(scores["price_n"], int)
    assert scores["price_coverage"] == pytest.approx(0.75)  # 3 / 4
    assert scores["price_mae"] == pytest.approx(460 / 3)  # (10 + 50 + 400) / 3 = 153.333
    assert scores["price_mape"] == pytest.approx(0.45)  # (0.10 + 0.25 + 1.00) / 3
    assert scores["price_smape"] == pytest.approx(0.3492063, rel=1e-6)  # (0.0952381 + 0.2857143 + 0.6666667) / 3
    assert scores["price_ape_median"] == pytest.approx(0.25)  # median of 0.10, 0.25, 1.00
    assert scores["price_within_10"] == pytest.approx(1 / 3)  # only the 10 % one (the boundary counts)
    assert scores["price_within_25"] == pytest.approx(2 / 3)  # 0.10 and 0.25
    # sqrt((0.0953102^2 + 0.2876821^2 + 0.6931472^2) / 3) = sqrt((0.0090840 + 0.0827610 + 0.4804530) / 3)
    #   = sqrt(0.1907660) = 0.4367677
    assert scores["price_rmse_log"] == pytest.approx(0.4367677, rel=1e-6)


def test_price_metrics_without_any_price_are_nan():
    scores = price_metrics([None, None], [100.0, 200.0])
    assert scores["price_n"] == 0 and scores["price_coverage"] == 0.0
    assert all(math.isnan(scores[key]) for key in PRICE_KEYS[2:])
    empty = price_metrics([], [])
    assert empty["price_n"] == 0 and math.isnan(empty["price_coverage"])


def test_price_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match="1 predictions for 2 samples"):
        price_metrics([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        price_metrics([1.0], [0.0])


def test_single_price_error_and_category_match():
    assert price_ape(110.0, 100.0) == pytest.approx(0.1)
    assert price_ape(None, 100.0) is None
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
    # price over the 2 parsed: APE 0.10 and 0.25
    assert scores["price_n"] == 2
    assert scores["price_coverage"] == pytest.approx(2 / 3)
    assert scores["price_mae"] == pytest.approx(30.0)  # (10 + 50) / 2
    assert scores["price_mape"] == pytest.approx(0.175)  # (0.10 + 0.25) / 2
    assert scores["price_ape_median"] == pytest.approx(0.175)  # median of two = their mean
    assert scores["price_smape"] == pytest.approx((20 / 210 + 100 / 350) / 2)
    assert scores["price_within_10"] == pytest.approx(0.5)
    assert scores["price_within_25"] == pytest.approx(1.0)
    # sqrt((0.0953102^2 + 0.2876821^2) / 2) = sqrt(0.0459225) = 0.2142953
    assert scores["price_rmse_log"] == pytest.approx(0.2142953, rel=1e-6)
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
    assert math.isnan(scores["price_mae"]) and math.isnan(scores["price_rmse_log"])
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
    assert scarves["price_mape"] == pytest.approx(0.1)  # only the parsed 110 vs 100
    assert scarves["title_exact_match"] == 0.5
    by_price = per_category(predictions, truths, fields=["price"])
    assert list(by_price["BAGS"]) == ["n", "parse_rate", "parse_failures", *PRICE_KEYS]


def test_sample_scores():
    truth = {"title": "Blue Bag", "category": "BAGS", "price": 200.0}
    scores = sample_scores(ParsedAnswer("Blue Bog", " bags", 150.0), truth)
    assert scores == {
        "price_ape": pytest.approx(0.25),
        "price_abs_error": pytest.approx(50.0),
        "category_ok": True,
        "title_exact": False,
        "title_similarity": pytest.approx(0.875),
        "title_token_f1": pytest.approx(0.5),
    }
    assert sample_scores(NOTHING, truth) == {
        "price_ape": None,
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
        "majority_category",
        "most_frequent_title",
    ]
    assert all(isinstance(b, Baseline) and b.description for b in baselines.values())

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
