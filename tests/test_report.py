"""The evaluation report: files, self-contained HTML, plots, verdicts, escaping, failures, missing numbers."""

from __future__ import annotations

import base64
import copy
import io
import math
import random
import re

import pytest
from PIL import Image

from phi3v.metrics import ParsedAnswer, baseline_predictions, score_predictions
from phi3v.report import (
    NA,
    PLOT_NAMES,
    markdown_code,
    plot_price_scatter,
    render_plots,
    select_examples,
    verdicts,
    write_report,
)

XSS = "<script>alert(1)</script>"
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")

FLAT_KEYS = (
    "price_coverage",
    "price_mae",
    "price_mape",
    "price_smape",
    "price_ape_median",
    "price_within_10",
    "price_within_25",
    "price_rmsle",
    "category_accuracy",
    "category_macro_f1",
    "title_exact_match",
    "title_similarity",
    "title_token_f1",
)


def flat(n: int = 7, parse_rate: float = 5 / 7, **values: float) -> dict:
    """A full FLAT metrics dict: defaults of a decent model, overridden by ``values``."""
    base = {
        "n": n,
        "parse_rate": parse_rate,
        "parse_failures": round(n * (1 - parse_rate)),
        "price_n": 5,
        "price_coverage": 5 / 7,
        "price_mae": 120.0,
        "price_mape": 0.31,
        "price_smape": 0.27,
        "price_ape_median": 0.12,
        "price_within_10": 0.43,
        "price_within_25": 0.57,
        "price_rmsle": 0.41,
        "price_ape_median_parsed": 0.08,
        "price_smape_parsed": 0.19,
        "category_accuracy": 0.71,
        "category_macro_f1": 0.66,
        "title_exact_match": 0.29,
        "title_similarity": 0.74,
        "title_token_f1": 0.69,
    }
    base.update(values)
    return base


def baseline(fields: list[str], description: str, metric=None, optimal_for=None, **values: float) -> dict:
    metrics = {"n": 7, "parse_rate": 1.0, "parse_failures": 0, **values}
    return {
        "description": description,
        "fields": fields,
        "metric": metric,
        "optimal_for": optimal_for,
        "metrics": metrics,
    }


def record(index, truth, raw, parsed, *, missing=(), error=None, blank_raw=None):
    """One predictions.jsonl line, with scores computed the simple way."""
    if error is not None:
        return {
            "index": index,
            "id": str(1000 + index),
            "image": f"images/{index:05d}.jpg",
            "truth": truth,
            "raw": None,
            "parsed": {"title": None, "category": None, "price": None},
            "parse_ok": False,
            "missing": [],
            "scores": None,
            "blank_raw": None,
            "free_raw": None,
            "error": error,
        }
    price = parsed["price"]
    ape = None if price is None else abs(price - truth["price"]) / truth["price"]
    return {
        "index": index,
        "id": str(1000 + index),
        "image": f"images/{index:05d}.jpg",
        "truth": truth,
        "raw": raw,
        "parsed": parsed,
        "parse_ok": not missing,
        "missing": list(missing),
        "scores": {
            "price_ape": ape,
            "price_abs_error": None if price is None else abs(price - truth["price"]),
            "category_ok": (parsed["category"] or "").casefold() == truth["category"].casefold(),
            "title_exact": parsed["title"] == truth["title"],
            "title_similarity": 1.0 if parsed["title"] == truth["title"] else 0.4,
            "title_token_f1": 1.0 if parsed["title"] == truth["title"] else 0.3,
        },
        "blank_raw": blank_raw,
        "free_raw": None,
        "error": None,
    }


def answer(title, category, price):
    return f"Product: {title}, Category: {category}, Full Price: {price}"


def make_records() -> list[dict]:
    coat = {"title": "Green Striped Coat", "category": "COATS", "price": 2490.0}
    bag = {"title": "Small Leather Bag", "category": "BAGS", "price": 1890.0}
    scarf = {"title": "Check Cashmere Scarf", "category": "SCARVES", "price": 590.0}
    return [
        record(
            0,
            coat,
            answer("Green Striped Coat", "COATS", 2390),
            dict(title=coat["title"], category="COATS", price=2390.0),
        ),
        record(
            1, bag, answer("Small Leather Bag", "BAGS", 1990), dict(title=bag["title"], category="BAGS", price=1990.0)
        ),
        record(2, scarf, answer("Check Scarf", "BAGS", 9000), dict(title="Check Scarf", category="BAGS", price=9000.0)),
        record(3, coat, None, None, error="image failed to load: truncated JPEG <b>x</b>"),
        record(
            4,
            bag,
            f"Product: {XSS}, Category: BAGS",
            dict(title=XSS, category="BAGS", price=None),
            missing=["price"],
        ),
        record(
            5,
            scarf,
            "a ``scarf`` | maybe",
            dict(title=None, category=None, price=None),
            missing=["title", "category", "price"],
        ),
        record(6, coat, answer("Coat", "SCARVES", 450), dict(title="Coat", category="SCARVES", price=450.0)),
        record(
            7,
            scarf,
            answer("Check Cashmere Scarf", "SCARVES", 590),
            dict(title=scarf["title"], category="SCARVES", price=590.0),
        ),
    ]


def make_results(**overrides) -> dict:
    results = {
        "model": "runs/tiny-lora",
        "model_kind": "adapter",
        "data": "data/prepared",
        "split": "test",
        "prompt": "<|image_1|>What is shown in this image?",
        "answer_template": "Product: {title}, Category: {category}, Full Price: {price}",
        "decoding": {"batch_size": 16, "max_new_tokens": 64, "constrained": False, "device": "cpu", "dtype": "float32"},
        "counts": {"rows": 8, "scored": 7, "image_failures": 1, "parse_failures": 2},
        "metrics": flat(),
        "per_category": {
            "COATS": {**flat(n=2, parse_rate=1.0), "category_accuracy": 0.5},
            "BAGS": flat(n=2, parse_rate=0.5),
            "SCARVES": flat(n=3, parse_rate=2 / 3),
        },
        "confusion": {
            "labels": ["BAGS", "COATS", "SCARVES"],
            "columns": ["BAGS", "COATS", "SCARVES", "(unparsed)"],
            "matrix": [[2, 0, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]],
        },
        "baselines": {
            "global_median_price": baseline(["price"], "median training price", price_ape_median=0.45),
            "category_median_price": baseline(
                ["price"], "median price of the true category", "price_ape_median", "price_mae", price_ape_median=0.3
            ),
            "category_smape_optimal_price": baseline(
                ["price"], "SMAPE-optimal price of the true category", "price_smape", "price_smape", price_smape=0.35
            ),
            "category_median_ape_optimal_price": baseline(
                ["price"], "best median APE", "price_ape_median", "price_ape_median", price_ape_median=0.2
            ),
            "majority_category": baseline(["category"], "most frequent category", category_accuracy=0.43),
            "most_frequent_title": baseline(["title"], "most frequent title", title_similarity=0.35),
        },
        "ablation": {
            "image": "blank",
            "metrics": flat(price_ape_median=0.6, category_accuracy=0.29),
            "answers_changed": 0.83,
            "uses_image": True,
        },
        "constrained": None,
        "image_failures": [{"index": 3, "id": "1003", "error": "image failed to load: truncated JPEG <b>x</b>"}],
        "throughput": {"images_per_second": 12.3, "seconds": 0.65},
    }
    results.update(overrides)
    return results


def load_image(index: int) -> Image.Image | None:
    if index == 3:
        return None
    colours = ["red", "green", "blue", "orange", "purple", "teal", "gray", "yellow"]
    return Image.new("RGB", (320 if index % 2 else 200, 200), colours[index % len(colours)])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    paths = write_report(out, make_results(), make_records(), load_image)
    return {
        "out": out,
        "paths": paths,
        "md": paths["markdown"].read_text(encoding="utf-8"),
        "html": paths["html"].read_text(encoding="utf-8"),
    }


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def table_row(markdown: str, first_cell: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def test_report_files_exist(report):
    out, paths = report["out"], report["paths"]
    assert paths["markdown"] == out / "report.md" and paths["markdown"].is_file()
    assert paths["html"] == out / "report.html" and paths["html"].is_file()
    assert [p.name for p in paths["plots"]] == [f"{name}.png" for name in PLOT_NAMES]
    for path in paths["plots"]:
        assert path.parent == out / "plots"
        assert 0 < path.stat().st_size <= 110_000
        decode_png(path.read_bytes())


def test_html_is_self_contained_and_embeds_every_plot(report):
    page = report["html"]
    embedded = DATA_URI.findall(page)
    assert len(embedded) == len(PLOT_NAMES)
    for payload in embedded:
        decode_png(base64.b64decode(payload))
    for path in report["paths"]["plots"]:  # each plot (the example grid included) is the one written to plots/
        assert base64.b64encode(path.read_bytes()).decode("ascii") in embedded
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"<script\b", page, re.IGNORECASE)
    assert "<link" not in page.lower() and "@import" not in page and "url(" not in page
    assert re.findall(r'src="([^"]*)"', page) and all(
        s.startswith("data:image/png;base64,") for s in re.findall(r'src="([^"]*)"', page)
    )
    assert "<style>" in page


def test_markdown_links_existing_plots(report):
    links = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", report["md"])
    assert sorted(links) == sorted(f"plots/{name}.png" for name in PLOT_NAMES)
    for link in links:
        decode_png((report["out"] / link).read_bytes())


def test_report_sections_say_the_same_in_both_documents(report):
    md, page = report["md"], report["html"]
    for heading in (
        "Verdicts",
        "Headline scores",
        "Per category",
        "Parse failures",
        "Data failures",
        "Run details",
        "How to read this report",
    ):
        assert f"## {heading}" in md and f"<h2>{heading}</h2>" in page
    for sentence in verdicts(make_results()):
        assert sentence in page.replace("&#x27;", "'")
    assert "7 of 8 rows were scored" in md and "7 of 8 rows were scored" in page
    assert "This report evaluates `runs/tiny-lora` (LoRA adapter) on the test split of `data/prepared`:" in md
    assert "This report evaluates <code>runs/tiny-lora</code> (LoRA adapter) on the test split" in page
    assert table_row(md, "COATS")[1:3] == ["2", "100.0%"]  # per-category: n, parse rate
    assert table_row(md, "Model")[1:4] == ["71.4%", "71.4%", "12.0%"]  # parse rate, price coverage, median APE
    assert "12.30 images/s" in md and "float32" in md
    for term in ("Price coverage", "Missing prices", "APE", "SMAPE", "RMSLE", "Macro-F1", "Blank-image ablation"):
        assert f"**{term}**" in md and f"<strong>{term}</strong>" in page


def test_baseline_cells_it_does_not_predict_are_dashes(report):
    row = table_row(report["md"], "Baseline: majority category")
    headers = table_row(report["md"], "")
    cells = dict(zip(headers, row, strict=True))
    assert cells["Category accuracy"] == "43.0%"
    assert cells["Parse rate"] == "100.0%"
    assert cells["Price median APE"] == NA and cells["Title similarity"] == NA


def test_verdicts_beat_or_not_follow_the_numbers():
    good = verdicts(make_results())
    assert "The model beats the global median price baseline on price (median price APE 12.0% vs 45.0%" in " ".join(
        good
    )
    assert any("beats the category median price baseline" in s and "uses the true category" in s for s in good)
    assert not any("upper bound" in s for s in good)
    assert any("beats the majority category baseline on category (category accuracy 71.0% vs 43.0%" in s for s in good)
    assert any("beats the most frequent title baseline on title" in s for s in good)
    assert not any("does not beat" in s for s in good)

    results = make_results(
        metrics=flat(price_ape_median=0.5, price_smape=0.4, category_accuracy=0.4, title_similarity=0.3)
    )
    bad = verdicts(results)
    assert any(
        "does not beat the global median price baseline on price (median price APE 50.0% vs 45.0%" in s for s in bad
    )
    assert any(
        "does not beat the majority category baseline on category (category accuracy 40.0% vs 43.0%" in s for s in bad
    )
    assert any("does not beat the most frequent title baseline" in s for s in bad)
    assert not any(" beats " in s for s in bad)


def test_price_verdicts_use_each_baselines_metric_and_say_what_it_is_optimal_for():
    sentences = verdicts(make_results())
    smape = next(s for s in sentences if "category smape optimal price baseline" in s)
    assert smape.startswith("The model beats the category smape optimal price baseline on price (price SMAPE 27.0%")
    assert "vs 35.0%; lower is better" in smape
    assert "No predictor with one price per category has a better price SMAPE on the training split" in smape
    assert "on the test split it is a reference, not a bound" in smape
    median_ape = next(s for s in sentences if "category median ape optimal price baseline" in s)
    assert "(median price APE 12.0% vs 20.0%" in median_ape and "within each category" not in median_ape
    assert "has the lowest median price APE over that category's training prices" in median_ape
    assert "a median is no sum" in median_ape
    category_median = next(s for s in sentences if "category median price baseline" in s)
    assert "constant with the lowest price MAE on the training split, not the best for median price APE" in (
        category_median
    )
    # the model's coverage comes first, with its parsed-only median, never used for a verdict
    coverage = next(s for s in sentences if "usable price" in s)
    assert "The model gave a usable price for 71.4% of the rows (5 answers)" in coverage
    assert "the median APE is 8.0%" in coverage
    assert sentences.index(coverage) < sentences.index(smape)
    assert not any("usable price" in s for s in verdicts(make_results(metrics=flat(price_coverage=1.0))))


def test_a_model_that_prices_a_tenth_of_the_rows_beats_no_price_baseline():
    """10 % of the rows priced exactly, the rest without a price: perfect on what it priced (a parsed-only median APE
    of 0 would "beat" everything), but over every row it does not beat a single price baseline."""
    rng = random.Random(0)
    categories = ("Bags", "Shoes", "Coats")

    def rows(n: int) -> list[dict]:
        return [
            {"title": f"item {i}", "category": categories[i % 3], "price": round(math.exp(rng.gauss(6, 0.3)), 2)}
            for i in range(n)
        ]

    train, test = rows(300), rows(200)
    predictions = [
        ParsedAnswer(row["title"], row["category"], row["price"] if i % 10 == 0 else None) for i, row in enumerate(test)
    ]
    metrics = score_predictions(predictions, test)
    assert metrics["price_coverage"] == pytest.approx(0.1) and metrics["price_ape_median_parsed"] == 0.0
    baselines = {
        name: {
            "description": b.description,
            "fields": list(b.fields),
            "metric": b.metric,
            "optimal_for": b.optimal_for,
            "metrics": score_predictions(b.predictions, test, fields=b.fields),
        }
        for name, b in baseline_predictions(train, test).items()
    }
    assert all(b["metrics"]["price_coverage"] == 1.0 for b in baselines.values() if b["fields"] == ["price"])
    sentences = verdicts({"metrics": metrics, "counts": {"scored": 200}, "baselines": baselines, "split": "test"})
    price = [s for s in sentences if " baseline on price " in s]
    assert len(price) == 8  # global and category median, and the six optimal constants
    assert all(s.startswith("The model does not beat") for s in price), price
    assert {b["metric"] for b in baselines.values() if b["fields"] == ["price"]} == {
        "price_ape_median",
        "price_mape",
        "price_smape",
        "price_within_10",
        "price_within_25",
        "price_rmsle",
    }
    assert any("gave a usable price for 10.0% of the rows" in s for s in sentences)
    # its category and title are right everywhere: those verdicts still say "beats"
    assert any(s.startswith("The model beats the majority category baseline") for s in sentences)


def test_headline_table_has_smape_and_the_priced_answers_row(report):
    md = report["md"]
    headers = table_row(md, "")
    assert {"Price coverage", "Price SMAPE", "Price median APE", "Price RMSLE"} <= set(headers)
    model = dict(zip(headers, table_row(md, "Model"), strict=True))
    assert model["Price SMAPE"] == "27.0%" and model["Price coverage"] == "71.4%"
    priced = dict(zip(headers, table_row(md, "Model, priced answers only (5)"), strict=True))
    assert priced["Price median APE"] == "8.0%" and priced["Price SMAPE"] == "19.0%"
    assert priced["Parse rate"] == NA and priced["Price coverage"] == NA and priced["Category accuracy"] == NA
    smape = dict(zip(headers, table_row(md, "Baseline: category smape optimal price"), strict=True))
    assert smape["Price SMAPE"] == "35.0%" and smape["Category accuracy"] == NA
    assert "a row without a usable price is scored as a predicted price of 0" in md
    assert "upper bound" not in md and "upper bound" not in report["html"]


def test_image_use_verdicts():
    uses = " ".join(verdicts(make_results()))
    assert "not using the image" not in uses
    assert "with a blank image its scores drop from median price APE 12.0% to 60.0%" in uses
    assert "83.0% of answers change" in uses

    ablation = {"image": "blank", "metrics": flat(price_ape_median=0.13), "answers_changed": 0.05, "uses_image": False}
    ignores = " ".join(verdicts(make_results(ablation=ablation)))
    assert "The model is not using the image: with a blank image its answers score about the same" in ignores
    assert "5.0% of answers change" in ignores

    assert "not using the image" not in " ".join(verdicts(make_results(ablation=None)))
    assert "ablation was not run" in " ".join(verdicts(make_results(ablation=None)))


def test_constrained_verdict_and_rows():
    constrained = {"free": flat(parse_rate=0.6), "constrained": flat(parse_rate=1.0, price_ape_median=0.1)}
    results = make_results(constrained=constrained)
    text = " ".join(verdicts(results))
    assert "Constrained decoding raises the parse rate from 60.0% (free) to 100.0% (constrained)" in text
    assert "median price APE 12.0% → 10.0%" in text
    assert "Constrained decoding" not in " ".join(verdicts(make_results()))


def test_garbage_model_renders_and_says_nothing_parsed(tmp_path):
    records = [
        record(
            r["index"],
            r["truth"],
            f"lorem ipsum {r['index']}",
            dict(title=None, category=None, price=None),
            missing=["title", "category", "price"],
        )
        if not r["error"]
        else r
        for r in make_records()
    ]
    zero = flat(
        parse_rate=0.0, price_n=0, price_coverage=0.0, price_mae=math.nan, price_mape=math.nan, price_ape_median=1.0
    )
    results = make_results(
        metrics=zero,
        counts={"rows": 8, "scored": 7, "image_failures": 1, "parse_failures": 7},
        ablation=None,
        confusion={
            "labels": ["BAGS", "COATS", "SCARVES"],
            "columns": ["BAGS", "COATS", "SCARVES", "(unparsed)"],
            "matrix": [[0, 0, 0, 2], [0, 0, 0, 2], [0, 0, 0, 3]],
        },
    )
    sentences = verdicts(results)
    assert sentences[0].startswith("No answer followed the answer template (0 of 7 parsed)")
    assert "not meaningful" in sentences[0]
    paths = write_report(tmp_path, results, records, load_image)
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "No answer followed the answer template" in md
    assert "No answer followed the answer template" in paths["html"].read_text(encoding="utf-8")
    assert "7 of 7 scored answers did not follow the answer template" in md
    # No parsed price: the scatter and histogram are the small placeholder figure, not a crash or an empty plot.
    scatter = decode_png((tmp_path / "plots" / "price_scatter.png").read_bytes())
    histogram = decode_png((tmp_path / "plots" / "ape_histogram.png").read_bytes())
    assert scatter.size == histogram.size == (600, 300)
    assert decode_png(plot_price_scatter(make_records())).size != (600, 300)


def test_no_scored_rows_still_renders():
    results = make_results(counts={"rows": 1, "scored": 0, "image_failures": 1, "parse_failures": 0})
    results["metrics"] = {key: math.nan for key in flat()}
    assert verdicts(results)[0].startswith("No row was scored")
    plots = render_plots(
        results | {"confusion": {"labels": [], "columns": [], "matrix": []}}, [make_records()[3]], load_image
    )
    for png in plots.values():
        decode_png(png)


def test_model_output_is_escaped(report):
    page, md = report["html"], report["md"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    # Markdown: raw outputs sit in code spans whose fence outlasts the backticks inside.
    assert f"`Product: {XSS}, Category: BAGS`" in md
    assert "```a ``scarf`` \\| maybe```" in md or "```a ``scarf`` | maybe```" in md
    assert "\\<b\\>x\\</b\\>" in md  # plain text (the data failure's error) is backslash-escaped


def test_markdown_code_spans():
    assert markdown_code("plain") == "`plain`"
    assert markdown_code("a`b") == "``a`b``"
    assert markdown_code("``x") == "``` ``x ```"
    assert markdown_code("a|b", in_table=True) == "`a\\|b`"
    assert markdown_code("line1\nline2") == "`line1⏎line2`"
    assert markdown_code("") == "(empty)"


def test_parse_failures_listed_with_missing_fields(report):
    md = report["md"]
    assert "2 of 7 scored answers did not follow the answer template" in md
    assert "Row 4 (id 1004), missing price:" in md
    assert "Row 5 (id 1005), missing title, category, price:" in md


def test_image_failures_listed(report, tmp_path):
    assert table_row(report["md"], "3")[:2] == ["3", "1003"]
    assert "truncated JPEG" in report["md"] and "truncated JPEG" in report["html"]
    records = [r for r in make_records() if not r["error"]]
    paths = write_report(tmp_path, make_results(image_failures=[]), records, load_image)
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "None: every image loaded." in md and "truncated JPEG" not in md


def test_nan_prints_as_dash(tmp_path):
    results = make_results(metrics=flat(price_rmsle=math.nan, title_token_f1=None, category_macro_f1=math.inf))
    results["per_category"]["BAGS"]["price_ape_median"] = math.nan
    paths = write_report(tmp_path, results, make_records(), load_image)
    md = paths["markdown"].read_text(encoding="utf-8")
    headers = table_row(md, "")
    model = dict(zip(headers, table_row(md, "Model"), strict=True))
    assert model["Price RMSLE"] == NA and model["Title token F1"] == NA and model["Category macro-F1"] == NA
    assert model["Title similarity"] == "0.740"
    assert table_row(md, "BAGS")[3] == NA
    page = paths["html"].read_text(encoding="utf-8")
    for text in (md, page):
        assert not re.search(r"\b(nan|inf|None)\b", text.replace("None: every", ""), re.IGNORECASE)


def test_examples_mix_right_and_wrong_deterministically():
    records = make_records()
    chosen = select_examples(records)
    assert [r["index"] for r in chosen] == [0, 1, 4, 7, 2, 5, 6]  # category right first, then wrong; no failed image
    many = [copy.deepcopy(records[0] if i % 3 else records[2]) | {"index": i} for i in range(30)]
    picked = select_examples(many)
    assert len(picked) == 12
    assert [r["scores"]["category_ok"] for r in picked] == [True] * 6 + [False] * 6
    assert select_examples(many) == picked
