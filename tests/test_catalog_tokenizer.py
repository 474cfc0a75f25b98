"""`phi3v tokenizer`: the catalog tokenizer the demo trains, as a command; what it is for (fewer tokens per answer,
`init-model --tokenizer` takes it) and its bad inputs."""

from __future__ import annotations

import json

import pytest

from phi3v.catalog_tokenizer import catalog_corpus
from phi3v.cli import main
from phi3v.data.collate import TRAIN_SPLIT, load_prepared_dataset
from phi3v.metrics import AnswerTemplate
from phi3v.model.processing import Phi3VProcessor, load_tokenizer
from phi3v.model.tokenizer import default_corpus, train_tokenizer


def test_tokenizer_command_trains_on_the_catalogs_answers(tiny_dataset_dir, tmp_path, capsys):
    out = tmp_path / "tokenizer"
    assert main(["tokenizer", str(tiny_dataset_dir), "--out", str(out)]) == 0
    assert f"use: phi3v init-model --tokenizer {out}" in capsys.readouterr().out
    tokenizer = load_tokenizer(out)
    assert len(tokenizer) <= 1024 and tokenizer.convert_ids_to_tokens(8) == "<|image|>"
    # the point of it: the catalog's answers take fewer tokens than with the general tokenizer
    rows = load_prepared_dataset(tiny_dataset_dir, (TRAIN_SPLIT,))[TRAIN_SPLIT].remove_columns("image").to_list()
    answers = [AnswerTemplate().format(row) for row in rows]
    general = train_tokenizer(default_corpus(), vocab_size=1024)
    assert sum(map(len, tokenizer(answers).input_ids)) < 0.8 * sum(map(len, general(answers).input_ids))
    assert answers[0] in catalog_corpus(tiny_dataset_dir)
    # init-model takes it; a re-run into the same folder replaces it
    model = tmp_path / "base"
    assert main(["init-model", str(model), "--num-crops", "1", "--tokenizer", str(out)]) == 0
    assert Phi3VProcessor.from_pretrained(model).tokenizer.get_vocab() == tokenizer.get_vocab()
    assert main(["tokenizer", str(tiny_dataset_dir), "--out", str(out)]) == 0


def test_tokenizer_learns_the_template_it_is_given(tiny_dataset_dir, tmp_path):
    template = "Item: {title} | {category} | {price:.2f} USD"
    assert main(["tokenizer", str(tiny_dataset_dir), "--out", str(tmp_path), "--answer-template", template]) == 0
    corpus = catalog_corpus(tiny_dataset_dir, template)
    assert corpus[0].startswith("Item: ") and corpus[0].endswith(" USD")
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert "ĠUSD" in vocab  # Ġ: the byte-level space; a word of every answer gets its own token


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        ("synth", [], "is not a phi3v dataset: it has no manifest.json and dataset/"),  # the raw catalog folder
        ("missing", [], "does not exist (make one with `phi3v prepare ... --out DIR`)"),
        ("prepared", ["--vocab-size", "100"], "--vocab-size must be at least 265"),
        ("prepared", ["--answer-template", "Price: {price:d}"], "{price:d} cannot format a price"),
        ("prepared", ["--answer-template", "Item: {sku}"], "unknown field {sku}"),
    ],
)
def test_bad_tokenizer_inputs_are_named(tiny_dataset_dir, tmp_path, capsys, data, extra, message):
    folder = tiny_dataset_dir.parent / data if data != "missing" else tmp_path / "nowhere"
    assert main(["tokenizer", str(folder), "--out", str(tmp_path / "out"), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("phi3v tokenizer: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_tokenizer_refuses_an_out_folder_that_holds_something_else(tiny_dataset_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["tokenizer", str(tiny_dataset_dir), "--out", str(tmp_path)]) == 1
    assert "is not empty and holds no tokenizer.json" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
