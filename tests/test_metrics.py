"""Answer templates (format + parse) and the scores of parsed answers."""

from __future__ import annotations

import math

import pytest

from phi3v.metrics import DEFAULT_ANSWER_TEMPLATE, AnswerTemplate, ParsedAnswer, score_answers

ROW = {"title": "Vintage Check, Cotton Scarf", "category": "SCARVES", "price": 1250.0, "id": "x"}


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
        ("  Product:  A,  Category: B,   Full Price: 89.9 ", 89.9),
        ("Product: A, Category: B, Full Price: cheap", None),
        ("Product: A, Category: B, Full Price: 12 or 13", None),
    ],
)
def test_prices_parse_as_one_positive_number(answer, price):
    parsed = AnswerTemplate().parse(answer)
    assert (parsed.title, parsed.category, parsed.price) == ("A", "B", price)
    assert parsed.ok is (price is not None)


def test_text_that_does_not_follow_the_template_gives_nothing():
    assert AnswerTemplate().parse("a red scarf for 100 dollars") == ParsedAnswer(None, None, None)
    assert AnswerTemplate().parse("") == ParsedAnswer(None, None, None)


def test_custom_template_with_format_spec():
    template = AnswerTemplate("{category} | {title} | ${price:.2f}")
    assert template.format(ROW) == "SCARVES | Vintage Check, Cotton Scarf | $1250.00"
    assert template.parse("SCARVES | Vintage Check, Cotton Scarf | $1250.00").price == 1250.0
    assert AnswerTemplate("Costs {price}").parse("Costs 12").title is None


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


def test_scores_on_a_hand_worked_example():
    truths = [
        {"title": "Red Check Scarf", "category": "SCARVES", "price": 100.0},
        {"title": "Blue Bag", "category": "BAGS", "price": 200.0},
        {"title": "Green Coat", "category": "COATS", "price": 400.0},
    ]
    predictions = [
        ParsedAnswer("red check  scarf", "scarves", 110.0),  # folded title and category match; 10 % off
        ParsedAnswer("Blue Bog", "SHOES", 150.0),  # 25 % off
        ParsedAnswer(None, None, None),  # unparsable: 100 % price error, wrong category, title similarity 0
    ]
    scores = score_answers(predictions, truths)
    assert scores["parse_rate"] == pytest.approx(2 / 3)
    assert scores["price_ape_median"] == pytest.approx(0.25)
    assert scores["price_ape_mean"] == pytest.approx((0.1 + 0.25 + 1.0) / 3)
    assert scores["price_mae"] == pytest.approx((10 + 50) / 2)
    assert scores["category_accuracy"] == pytest.approx(1 / 3)
    assert scores["title_similarity"] == pytest.approx((1.0 + 0.875 + 0.0) / 3)


def test_scores_need_matching_non_empty_inputs():
    with pytest.raises(ValueError, match="no samples"):
        score_answers([], [])
    with pytest.raises(ValueError, match="1 predictions for 2 samples"):
        score_answers([ParsedAnswer(None, None, None)], [ROW, ROW])
    assert math.isnan(score_answers([ParsedAnswer(None, None, None)], [ROW])["price_mae"])
    assert DEFAULT_ANSWER_TEMPLATE.startswith("Product: {title}")


def test_parse_rate_counts_only_the_template_fields():
    template = AnswerTemplate("{title} | {price}")
    parsed = template.parse("Blue Bag | 200")
    assert parsed.ok and parsed.category is None
    scores = score_answers([parsed], [{"title": "Blue Bag", "category": "BAGS", "price": 200.0}])
    assert scores["parse_rate"] == 1.0 and scores["price_ape_median"] == 0.0
