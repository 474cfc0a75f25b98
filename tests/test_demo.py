"""`phi3v demo` end to end, at reduced size: a tiny Phi-3-V trained on CPU learns to read the drawn photos.

One run (module fixture, ~2-3 min on 2 cores) of the real command: a drawn catalog downloaded from the demo's loopback
server by `phi3v prepare`, a tokenizer trained on the catalog, a random tiny model, full fine-tuning, `phi3v evaluate`
on the test split with W&B offline. The checks are on what it learned, not on how it ran: the model must beat the
majority-category and global-median-price baselines and the most-frequent-title baseline, and its own answers on
blank images must be clearly worse (the proof that it reads the photo).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import yaml

from phi3v.cli import main
from phi3v.demo import DEMO_STEPS, DemoError, DemoOptions, run_demo
from wandb_reader import isolate_tracking_env, read_summary

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "configs" / "demo.yaml"
# Reduced size: 2,000 products instead of 3,000 (the test split still holds ~190 rows), the default 3 epochs.
N_PRODUCTS = 2000


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    with pytest.MonkeyPatch.context() as mp:
        isolate_tracking_env(mp, out.parent / "home")
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main(["demo", "--out", str(out), "--n", str(N_PRODUCTS), "--quiet"])
    assert code == 0
    results = json.loads((out / "eval" / "metrics.json").read_text())
    return out, results, stdout.getvalue()


def test_demo_model_beats_the_baselines_and_reads_the_photo(demo):
    _, results, _ = demo
    model, baselines = results["metrics"], results["baselines"]
    blank = results["ablation"]["metrics"]
    assert results["counts"]["rows"] >= 100 and model["parse_rate"] >= 0.9
    majority = baselines["majority_category"]["metrics"]["category_accuracy"]
    assert model["category_accuracy"] > majority + 0.15
    median_price = baselines["global_median_price"]["metrics"]["price_ape_median"]
    assert model["price_ape_median"] < median_price
    assert model["title_similarity"] > baselines["most_frequent_title"]["metrics"]["title_similarity"] + 0.2
    # blank images of the same size: clearly worse on every field
    assert blank["category_accuracy"] < model["category_accuracy"] - 0.15
    assert blank["title_similarity"] < model["title_similarity"] - 0.2
    assert blank["price_ape_median"] > model["price_ape_median"]
    assert results["ablation"]["uses_image"] is True


def test_demo_outputs_and_summary(demo):
    out, results, printed = demo
    # prepare: every row accounted for, the drawn catalog's quirks among the failures and duplicates
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["rows_in"] == N_PRODUCTS == counts["kept"] + counts["failed"] + counts["duplicates"]
    assert counts["failed"] > 0 and counts["duplicates"] > 0
    assert all(source.startswith("http://127.0.0.1:") for source in _sources(out))
    # the tokenizer was trained for the catalog: a category is one token
    tokenizer = json.loads((out / "model" / "tokenizer.json").read_text())
    assert {"ĠSCARVES", "ĠCOATS"} <= set(tokenizer["model"]["vocab"])  # Ġ: the byte-level space
    # the recipe trained is configs/demo.yaml's (the demo's folders and flags in place of its paths and run keys)
    trained, shipped = yaml.safe_load((out / "train.yaml").read_text()), yaml.safe_load(DEMO_YAML.read_text())
    assert (trained["model"], trained["output_dir"]) == (str(out / "base-model"), str(out / "model"))
    flags = {"num_train_epochs": 3.0, "seed": 0, "report_to": "wandb"}
    assert trained["training"] == {**shipped["training"], **flags}
    assert {k: v for k, v in trained.items() if k not in ("model", "data", "output_dir", "training")} == {
        k: v for k, v in shipped.items() if k not in ("model", "data", "output_dir", "training")
    }
    # training and evaluation outputs, W&B offline runs that hold the evaluation's scores
    assert (out / "model" / "train_config.yaml").is_file() and (out / "eval" / "report.html").is_file()
    runs = sorted((out / "eval" / "wandb").glob("offline-run-*"))
    assert runs, "evaluate logged no offline W&B run"
    summary = read_summary(runs[-1])
    assert summary["eval/category_accuracy"] == pytest.approx(results["metrics"]["category_accuracy"])
    # the summary a person reads: the three fields against blank images and baselines, and where things are
    for label in ("price: median error", "category: accuracy", "title: similarity"):
        assert re.search(rf"^{re.escape(label)}\s+\S+\s+\S+\s+\S", printed, flags=re.MULTILINE), label
    assert f"report    {out / 'eval' / 'report.html'}" in printed
    assert "wandb sync" in printed and "The model uses the image" in printed


def test_make_demo_runs_the_steps_the_readme_lists():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert recipe and "phi3v demo" in recipe.group(1) and "install" in recipe.group(0).splitlines()[0]
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\d+\. \*\*([\w-]+)\*\*", section, flags=re.MULTILINE)
    assert tuple(listed) == DEMO_STEPS
    assert section.index("make demo") < section.index("make test")
    assert str(DemoOptions().n) in section.replace(",", "")


def test_demo_steps_are_the_ones_it_ran(demo):
    _, _, printed = demo
    timing = next(line for line in printed.splitlines() if line.startswith("time "))
    assert re.findall(r"([\w-]+) \d+ s", timing) == list(DEMO_STEPS)


def test_bad_demo_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--n must be at least 50"):
        DemoOptions(n=10)
    with pytest.raises(ValueError, match="--epochs"):
        DemoOptions(epochs=0)
    # a folder the demo did not make is never cleared; a base model inside the folder it trains into is refused
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.safetensors").write_bytes(b"someone else's")
    with pytest.raises(DemoError, match="holds no earlier demo run"):
        run_demo(DemoOptions(out=str(tmp_path)))
    with pytest.raises(DemoError, match="which the demo trains into"):
        run_demo(DemoOptions(out=str(tmp_path), model=str(tmp_path / "model")))
    assert (tmp_path / "model" / "weights.safetensors").read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "nothing was drawn or prepared"


def _sources(out: Path) -> list[str]:
    import csv

    with open(out / "catalog" / "catalog.csv", newline="", encoding="utf-8") as handle:
        return [row["imageurl"] for row in csv.DictReader(handle) if row["imageurl"] != "N.A."]
