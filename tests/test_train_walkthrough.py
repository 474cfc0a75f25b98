"""docs/train.md's offline walk-through (*A tiny model that learns*) runs as written and the model learns.

The commands of the section's shell block run one after the other through the real CLI, in a fresh folder holding a
copy of configs/ (6 min on 2 cores shared with other jobs, most of it the 3 training epochs of configs/demo.yaml).
The ``--quiet`` flags are the doc's own; nothing is added. The checks are the demo test's: the model beats the
majority-category, global-median-price and most-frequent-title baselines, and blank images undo it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from phi3v.cli import main
from test_docs import documented_commands

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "train.md"
SECTION = "## A tiny model that learns, offline, step by step"


def walkthrough_commands() -> list[list[str]]:
    """The `phi3v` commands of the walk-through's shell block, in order (without the leading ``phi3v``)."""
    text = GUIDE.read_text()
    assert SECTION in text, "docs/train.md lost its walk-through"
    return documented_commands(text.split(SECTION, 1)[1].split("\n## ", 1)[0])


def test_the_walkthrough_is_the_demos_steps():
    from phi3v.demo import DEMO_STEPS

    steps = [command[0] for command in walkthrough_commands()]
    assert steps == list(DEMO_STEPS), "the walk-through runs what phi3v demo runs, step for step"
    train = next(command for command in walkthrough_commands() if command[0] == "train")
    assert train == ["train", "--config", "configs/demo.yaml"], "the demo's own recipe, as shipped"


@pytest.mark.slow
def test_the_walkthrough_runs_as_written_and_the_model_learns(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # demo.yaml is a link: the copy holds its content
    monkeypatch.chdir(tmp_path)
    for command in walkthrough_commands():
        assert main(command) == 0, command
    printed = capsys.readouterr().out
    assert "use: phi3v init-model --tokenizer runs/shop-tokenizer" in printed and "trained full:" in printed
    results = json.loads((tmp_path / "runs" / "shop-model" / "eval" / "metrics.json").read_text())
    model, baselines = results["metrics"], results["baselines"]
    blank = results["ablation"]["metrics"]
    assert results["counts"]["rows"] >= 100 and model["parse_rate"] >= 0.9
    assert model["category_accuracy"] > baselines["majority_category"]["metrics"]["category_accuracy"] + 0.15
    assert model["price_ape_median"] < baselines["global_median_price"]["metrics"]["price_ape_median"]
    assert model["title_similarity"] > baselines["most_frequent_title"]["metrics"]["title_similarity"] + 0.2
    assert blank["category_accuracy"] < model["category_accuracy"] - 0.15
    assert results["ablation"]["uses_image"] is True
    # the answers were trained with whole prices written as the catalog shows them (no ".0")
    generations = (tmp_path / "runs" / "shop-model" / "generations" / "final.jsonl").read_text().splitlines()
    truths = [json.loads(line)["truth"] for line in generations]
    assert truths and not any(truth.endswith(".0") for truth in truths), truths
