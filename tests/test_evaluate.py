"""`phi3v evaluate` on the tiny models: what a garbage model, bad folders, broken images, a LoRA adapter and W&B
tracking get, and that the guide's commands parse."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import datasets
import pytest

from phi3v.cli import main
from phi3v.evaluate import EvaluateOptions, evaluate, image_gains
from phi3v.inference import ModelLoadError
from phi3v.report import verdicts
from test_docs import documented_commands
from train_helpers import tiny_config_args
from wandb_reader import isolate_tracking_env, read_summary, read_tables


def _options(model: Path, data: Path, out: Path, **overrides) -> EvaluateOptions:
    base = {"split": "test", "batch_size": 4, "max_new_tokens": 12, "progress": False}
    return EvaluateOptions(model=str(model), data=str(data), out=str(out), **{**base, **overrides})


# ------------------------------------------------------------------------------------------------ garbage model
@pytest.fixture(scope="module")
def garbage_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """The random tiny model: no answer follows the template."""
    return evaluate(_options(tiny_model_dir, tiny_dataset_dir, tmp_path_factory.mktemp("garbage")))


def test_a_garbage_model_gets_a_report_that_says_so(garbage_run):
    results, out = garbage_run.results, Path(garbage_run.files["html"]).parent
    assert results["model_kind"] == "base"
    assert results["metrics"]["parse_rate"] == 0 and results["counts"]["parse_failures"] == results["counts"]["rows"]
    # every row is scored, a missing price as a prediction of 0: the worst APE a low guess can get, the worst SMAPE
    metrics = results["metrics"]
    assert (metrics["price_ape_median"], metrics["price_mape"], metrics["price_smape"]) == (1.0, 1.0, 2.0)
    assert metrics["price_within_25"] == 0.0 and metrics["price_coverage"] == 0.0
    assert math.isnan(metrics["price_ape_median_parsed"]), "no price was given: nothing to score on its own"
    assert metrics["price_n"] == 0 and metrics["category_accuracy"] == 0
    saved = json.loads((out / "metrics.json").read_text())  # strict JSON: NaN became null
    assert saved["metrics"]["price_ape_median_parsed"] is None and saved["metrics"]["price_smape"] == 2.0
    html = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    for text in (html, markdown):
        assert "No answer followed the answer template" in text
    assert html.count("data:image/png;base64,") >= 4
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == results["counts"]["rows"]
    first = json.loads(lines[0])
    assert first["parse_ok"] is False and first["missing"] == ["title", "category", "price"] and first["raw"]


def test_baselines_are_scored_on_the_same_rows(garbage_run, tiny_dataset_dir):
    baselines = garbage_run.results["baselines"]
    train = datasets.load_from_disk(str(tiny_dataset_dir / "dataset" / "train"))
    test = datasets.load_from_disk(str(tiny_dataset_dir / "dataset" / "test"))
    assert set(baselines) == {
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
    }
    assert all(b["metrics"]["n"] == len(test) for b in baselines.values())
    priced = {name: b for name, b in baselines.items() if b["fields"] == ["price"]}
    assert all(b["metrics"]["price_coverage"] == 1.0 for b in priced.values())  # a baseline prices every row
    assert all(b["metric"] in b["metrics"] for b in priced.values())  # the score its verdict compares
    assert {b["optimal_for"] for name, b in priced.items() if name.endswith("_optimal_price")} == {
        "price_mape",
        "price_ape_median",
        "price_smape",
        "price_within_10",
        "price_within_25",
        "price_rmsle",
    }
    # the model (no price anywhere) beats none of them on the same rows: every verdict on price says so
    price_verdicts = [s for s in verdicts(garbage_run.results) if " baseline on price " in s]
    assert len(price_verdicts) == len(priced) and all("does not beat" in s for s in price_verdicts)
    median = statistics.median(train["price"])
    expected = statistics.median(abs(median - price) / price for price in test["price"])
    assert baselines["global_median_price"]["metrics"]["price_ape_median"] == pytest.approx(expected)
    assert set(baselines["majority_category"]["metrics"]) >= {"category_accuracy", "category_macro_f1"}
    assert "price_mape" not in baselines["majority_category"]["metrics"]


def test_image_gains_and_the_use_decision():
    real = {"category_accuracy": 0.8, "title_similarity": 0.9, "price_ape_median": 0.05}
    blank = {"category_accuracy": 0.2, "title_similarity": 0.5, "price_ape_median": 0.6}
    assert image_gains(real, blank) == pytest.approx(
        {"category_accuracy": 0.6, "title_similarity": 0.4, "price_ape_median": 0.55}
    )
    assert image_gains(real, {**blank, "price_ape_median": math.nan}).keys() == {
        "category_accuracy",
        "title_similarity",
    }
    assert image_gains(real, real) == {"category_accuracy": 0.0, "title_similarity": 0.0, "price_ape_median": 0.0}


def test_constrained_decoding_turns_garbage_into_parsable_answers(tiny_model_dir, tiny_dataset_dir, tmp_path):
    result = evaluate(
        _options(tiny_model_dir, tiny_dataset_dir, tmp_path, constrained=True, ablation=False, max_new_tokens=120)
    )
    results = result.results
    assert results["metrics"]["parse_rate"] == 1.0
    assert results["constrained"]["free"]["parse_rate"] == 0.0
    assert results["constrained"]["constrained"] == results["metrics"]
    train_categories = set(datasets.load_from_disk(str(tiny_dataset_dir / "dataset" / "train"))["category"])
    for record in result.records:
        assert record["parsed"]["category"] in train_categories and record["parsed"]["price"] > 0
        assert record["free_raw"] is not None and record["blank_raw"] is None
    assert results["ablation"] is None
    assert "constrained" in (tmp_path / "report.md").read_text().lower()


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_model_and_missing_or_empty_split(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    args = ["evaluate", "--data", str(tiny_dataset_dir), "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*args, "--model", str(tmp_path / "no-such-model")]) == 1
    assert "no-such-model" in capsys.readouterr().err
    not_a_model = tmp_path / "empty-folder"
    not_a_model.mkdir()
    assert main([*args, "--model", str(not_a_model)]) == 1
    err = capsys.readouterr().err
    assert "not a model folder" in err and "empty-folder" in err
    assert main([*args, "--model", str(tiny_model_dir), "--split", "holdout"]) == 1
    err = capsys.readouterr().err
    assert "'holdout'" in err and "test" in err  # names the missing split and the ones there are

    data = tmp_path / "empty-test"
    shutil.copytree(tiny_dataset_dir, data)
    test = datasets.load_from_disk(str(data / "dataset" / "test"))
    test.select([]).save_to_disk(str(data / "empty"))
    shutil.rmtree(data / "dataset" / "test")
    shutil.move(str(data / "empty"), str(data / "dataset" / "test"))
    assert main([*args[:1], "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o")]) == 1
    assert "'test' is empty" in capsys.readouterr().err


def _break_images(data: Path) -> tuple[int, int]:
    """Truncate one test image (its header reads, its pixels do not: fails mid-run) and replace another by text
    (fails at the header). Returns their row indices."""
    split_dir = data / "dataset" / "test"
    test = datasets.load_from_disk(str(split_dir)).cast_column("image", datasets.Image(decode=False))
    truncated, garbage = 1, 3

    def damage(row, index):
        if index == truncated:
            data = row["image"]["bytes"]
            row["image"] = {"bytes": data[: len(data) // 2], "path": row["image"]["path"]}
        elif index == garbage:
            row["image"] = {"bytes": b"<html>not an image</html>", "path": row["image"]["path"]}
        return row

    broken = test.map(damage, with_indices=True).cast_column("image", datasets.Image())
    broken.save_to_disk(str(data / "test-broken"))
    shutil.rmtree(split_dir)
    shutil.move(str(data / "test-broken"), str(split_dir))
    return truncated, garbage


def test_images_that_fail_are_counted_and_the_run_goes_on(tiny_model_dir, tiny_dataset_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, data)
    truncated, garbage = _break_images(data)
    result = evaluate(_options(tiny_model_dir, data, tmp_path / "out", max_new_tokens=4))
    counts = result.results["counts"]
    assert counts["image_failures"] == 2 and counts["rows"] == counts["scored"] + counts["image_failures"]
    failed = {f["index"]: f["error"] for f in result.results["image_failures"]}
    assert set(failed) == {truncated, garbage}
    assert "header" in failed[garbage] and "header" not in failed[truncated]
    for record in result.records:
        if record["index"] in failed:
            assert record["error"].startswith("image failed to load") and record["raw"] is None
        else:
            assert record["error"] is None and record["raw"] is not None
    assert result.results["ablation"]["metrics"]["n"] == counts["scored"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert str(result.records[garbage]["id"]) in report


# ------------------------------------------------------------------------------------------------ adapters, W&B
def test_a_lora_training_output_is_merged_into_its_base(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from phi3v.train import load_train_config, train

    out = tmp_path / "lora"
    args = tiny_config_args(tiny_model_dir, tiny_dataset_dir, out, max_steps=2, eval_strategy="no", save_strategy="no")
    train(load_train_config(None, [*args, "--eval_samples", "0", "--lora.projector", "true"]))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    result = evaluate(_options(out, tiny_dataset_dir, tmp_path / "eval", ablation=False, max_new_tokens=4))
    assert result.results["model_kind"] == "adapter"
    assert result.results["base_model"] == str(Path(tiny_model_dir).resolve())
    assert result.results["overrides"] == {}
    assert "Trained settings: used as trained" in (tmp_path / "eval" / "report.md").read_text()

    # trained settings win: another num_crops (or prompt) is refused before any weights load, unless overridden
    with pytest.raises(ModelLoadError, match=r"num_crops 1 \(trained: 4\).*--override-trained"):
        evaluate(_options(out, tiny_dataset_dir, tmp_path / "eval-1", ablation=False, num_crops=1))
    with pytest.raises(ModelLoadError, match=r"prompt .*--prompt"):
        evaluate(_options(out, tiny_dataset_dir, tmp_path / "eval-p", ablation=False, prompt="<|image_1|>Price?"))
    same = evaluate(_options(out, tiny_dataset_dir, tmp_path / "eval-4", ablation=False, num_crops=4, limit=2))
    assert same.results["overrides"] == {}  # the trained value, given explicitly
    forced = evaluate(
        _options(
            out,
            tiny_dataset_dir,
            tmp_path / "eval-o",
            ablation=False,
            num_crops=1,
            override_trained=True,
            limit=2,
            max_new_tokens=4,
        )
    )
    assert forced.results["overrides"] == {"num_crops": {"trained": 4, "used": 1}}
    assert forced.results["decoding"]["num_crops"] == 1
    saved = json.loads((tmp_path / "eval-o" / "metrics.json").read_text())
    assert saved["overrides"] == forced.results["overrides"]
    report = (tmp_path / "eval-o" / "report.md").read_text()
    assert "Trained settings overridden (--override-trained): num crops 1 instead of the trained 4" in report
    assert "settings other than the trained ones (num" in report

    # an adapter stored as a pickle is refused by phi3v itself (never unpickled)
    pickled = tmp_path / "pickled"
    shutil.copytree(out, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ModelLoadError, match=r"adapter_model.bin \(a pickle, which phi3v never loads\)"):
        evaluate(_options(pickled, tiny_dataset_dir, tmp_path / "eval-bin", ablation=False))


def test_wandb_offline_run_holds_scores_and_the_predictions_table(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "eval"
    with pytest.MonkeyPatch.context() as mp:
        isolate_tracking_env(mp, tmp_path / "home")
        result = evaluate(_options(tiny_model_dir, tiny_dataset_dir, out, report_to="wandb", max_new_tokens=4))
    run_dir = Path(result.wandb_offline_run)
    assert run_dir.is_relative_to(out.resolve()) and run_dir.name.startswith("offline-run-")
    summary = read_summary(run_dir)
    assert summary["eval/parse_rate"] == result.results["metrics"]["parse_rate"]
    assert summary["baseline/majority_category/category_accuracy"] == pytest.approx(
        result.results["baselines"]["majority_category"]["metrics"]["category_accuracy"]
    )
    assert summary["blank_image/uses_image"] is result.results["ablation"]["uses_image"]
    (table,) = read_tables(run_dir, "evaluation/predictions")
    assert len(table["data"]) == result.results["counts"]["rows"]
    column = table["columns"].index("prediction")
    assert [row[column] for row in table["data"]] == [r["raw"] for r in result.records]


def test_the_guide_commands_parse():

    from phi3v.cli import build_parser

    guide = (Path(__file__).resolve().parents[1] / "docs" / "evaluate.md").read_text()
    commands = [command for command in documented_commands(guide) if command[0] == "evaluate"]
    assert len(commands) >= 2, "docs/evaluate.md lost its commands"
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(command)
        assert args.command == "evaluate" and args.model and args.data and args.out
