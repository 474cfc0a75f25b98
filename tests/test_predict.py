"""`phi3v predict` on the tiny model: files, folders, a CSV and URLs from a loopback server in one run, broken
images, JSON Lines and CSV output, batching, constrained answers, bad input, the console script, and that the
guide's commands parse."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml

from http_server import LoopbackServer
from phi3v.cli import build_parser, main
from phi3v.metrics import AnswerTemplate
from phi3v.predict import PredictOptions, predict, write_rows
from test_docs import documented_commands

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "predict.md"
FIELDS = ["input", "title", "category", "price", "raw", "error"]


def _jpeg(make_image, width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    make_image(width, height, seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory, make_image):
    """A folder of three photos of different shapes (plus a text file and a hidden file it must skip), a broken
    JPEG, a loose PNG and a CSV next to a sub-folder."""
    root = tmp_path_factory.mktemp("photos")
    folder = root / "shop"
    folder.mkdir()
    for name, (width, height, seed) in {"b.jpg": (400, 300, 1), "a.JPG": (300, 300, 2), "c.png": (240, 480, 3)}.items():
        image = make_image(width, height, seed)
        image.save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpg").write_bytes(_jpeg(make_image, 64, 64, 4))
    (folder / "deeper").mkdir()
    make_image(320, 320, 5).save(folder / "deeper" / "d.jpg")
    whole = _jpeg(make_image, 360, 360, 6)
    (root / "broken.jpg").write_bytes(whole[: len(whole) // 3])  # header fine, pixels cut off
    make_image(200, 260, 7).save(root / "loose.png")
    (root / "table").mkdir()
    make_image(280, 280, 8).save(root / "table" / "row1.jpg")
    return root


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_parsed(rows: list[dict]) -> None:
    template = AnswerTemplate()  # the tiny model has no train_config.yaml: phi3v's default template
    for row in rows:
        if row["raw"] is None:
            assert row["title"] is None and row["category"] is None and row["price"] is None
        else:
            parsed = template.parse(row["raw"])
            assert (row["title"], row["category"], row["price"]) == (parsed.title, parsed.category, parsed.price)


# ------------------------------------------------------------------------------------------------ one mixed run
def test_files_folders_csv_and_urls_come_back_in_input_order(tiny_model_dir, photos, make_image, tmp_path, capsys):
    with LoopbackServer() as server:
        good_url = server.add("/products/shirt.jpg?size=large", _jpeg(make_image, 330, 250, 9))
        missing_url = server.url("/gone.jpg")  # 404
        csv_file = photos / "shop.csv"
        with open(csv_file, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sku", "photo"])
            writer.writerows(
                [["1", "table/row1.jpg"], ["2", good_url], ["3", ""], ["4", "table/absent.jpg"], ["5", "ftp://x/y.jpg"]]
            )
        out = tmp_path / "answers.jsonl"
        args = ["predict", "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--quiet", "--batch-size", "3"]
        inputs = [str(photos / "shop"), str(photos / "broken.jpg"), good_url, missing_url, str(photos / "loose.png")]
        code = main([*args, *inputs, "--csv", str(csv_file), "--image-column", "photo", "--out", str(out)])
        assert server.hits["/products/shirt.jpg?size=large"] == 1, "one download per distinct URL"
    assert code == 0
    printed = capsys.readouterr().out
    assert "predicted 12 inputs: 7 answered" in printed and "5 failed" in printed and str(out) in printed

    rows = _read_jsonl(out)
    shop = photos / "shop"
    assert [row["input"] for row in rows] == [
        str(shop / "a.JPG"),  # sorted by name, case kept; notes.txt, .hidden.jpg and deeper/ left out
        str(shop / "b.jpg"),
        str(shop / "c.png"),
        str(photos / "broken.jpg"),
        good_url,
        missing_url,
        str(photos / "loose.png"),
        "table/row1.jpg",  # CSV rows: the value as written
        good_url,
        "",
        "table/absent.jpg",
        "ftp://x/y.jpg",
    ]
    assert all(list(row) == FIELDS for row in rows)
    failed = {i: row["error"] for i, row in enumerate(rows) if row["error"] is not None}
    assert set(failed) == {3, 5, 9, 10, 11}
    assert "broken.jpg" in failed[3] and "cannot decode" in failed[3]
    assert failed[5].startswith("download failed: http_404")
    assert f"{csv_file} row 3: no image in column 'photo'" == failed[9]
    assert "absent.jpg" in failed[10] and "file not found" in failed[10]
    assert f"{csv_file} row 5" in failed[11] and "neither a path nor an http(s) URL" in failed[11]
    for i, row in enumerate(rows):
        assert (row["raw"] is None) == (i in failed)
    assert rows[4]["raw"] == rows[8]["raw"], "the same URL from the command line and the CSV, the same answer"
    _check_parsed(rows)


def test_csv_output_holds_the_same_rows_and_batching_changes_nothing(tiny_model_dir, photos, tmp_path):
    inputs = [str(photos / "shop"), str(photos / "loose.png"), str(photos / "broken.jpg")]
    base = {"model": str(tiny_model_dir), "inputs": inputs, "recursive": True, "max_new_tokens": 8, "progress": False}
    one = predict(PredictOptions(**base, batch_size=1, out=str(tmp_path / "one.jsonl")))
    many = predict(PredictOptions(**base, batch_size=4, out=str(tmp_path / "many.csv")))
    assert [row["input"] for row in one.rows][:4] == [
        str(photos / "shop" / name) for name in ("a.JPG", "b.jpg", "c.png", "deeper/d.jpg")
    ]
    assert one.rows == many.rows and one.answered == 5 and one.failed == 1
    with open(tmp_path / "many.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [list(row) for row in table] == [FIELDS] * len(one.rows)
    for row, expected in zip(table, _read_jsonl(tmp_path / "one.jsonl"), strict=True):
        assert row == {key: "" if value is None else str(value) for key, value in expected.items()}


# ------------------------------------------------------------------------------------------------ constrained
def test_constrained_needs_categories_and_then_always_parses(
    tiny_model_dir, tiny_dataset_dir, photos, tmp_path, capsys
):
    args = ["predict", str(photos / "loose.png"), "--constrained", "--quiet", "--max-new-tokens", "160"]
    assert main([*args, "--model", str(tiny_model_dir)]) == 1
    err = capsys.readouterr().err
    assert "--constrained needs the categories the model was trained on" in err and str(tiny_model_dir) in err

    trained = tmp_path / "trained"  # the layout of a full run: weights, processor and the run's config
    shutil.copytree(tiny_model_dir, trained)
    (trained / "train_config.yaml").write_text(
        yaml.safe_dump({"model": str(tiny_model_dir), "data": str(tiny_dataset_dir), "mode": "full"})
    )
    out = tmp_path / "constrained.jsonl"
    assert main([*args, str(photos / "shop"), "--model", str(trained), "--out", str(out)]) == 0
    train = datasets.load_from_disk(str(tiny_dataset_dir / "dataset" / "train"))
    rows = _read_jsonl(out)
    assert len(rows) == 4
    for row in rows:
        assert row["category"] in set(train["category"]) and row["price"] > 0 and row["title"], row
        assert len(row["title"]) <= max(map(len, train["title"])) + 20
    _check_parsed(rows)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_stop_before_the_model_loads(photos, tmp_path, capsys):
    model = str(tmp_path / "no-model-needed")  # never reached: the inputs fail first

    def error(*args: str) -> str:
        assert main(["predict", "--model", model, *args]) == 1
        return capsys.readouterr().err

    missing = str(photos / "nope.jpg")
    assert f"input {missing!r}: no such file or folder" in error(str(photos / "loose.png"), missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"input folder {empty}: no image files" in error(str(empty))
    assert "not an image file, a folder or an http(s) URL" in error("ftp://example.com/a.jpg")
    assert "nothing to predict" in error()
    assert "--csv needs --image-column" in error("--csv", str(photos / "shop.csv"))
    table = tmp_path / "t.csv"
    table.write_text("sku,picture\n1,a.jpg\n")
    assert f"--csv {table}: no column 'photo'; its columns are: sku, picture" in error(
        "--csv", str(table), "--image-column", "photo"
    )
    assert "--batch-size and --max-new-tokens must be >= 1" in error(str(photos / "loose.png"), "--batch-size", "0")
    # an --out that would replace an input, or a folder (found before the run, not after it)
    shop = photos / "shop.csv"
    before = shop.read_bytes()
    assert "the answers would replace it" in error("--csv", str(shop), "--image-column", "photo", "--out", str(shop))
    loose = str(photos / "loose.png")
    assert "the answers would replace it" in error(loose, "--out", loose)
    assert f"--out {tmp_path} is a folder" in error(loose, "--out", str(tmp_path))
    assert shop.read_bytes() == before


def test_csv_output_quotes_commas_quotes_and_line_breaks(tmp_path):
    rows = [
        {"input": "a,b.jpg", "title": 'Say "hi"', "category": None, "price": 1.5, "raw": "1\r2", "error": None},
        {"input": "c.jpg", "title": None, "category": None, "price": None, "raw": None, "error": "bad\nimage"},
    ]
    write_rows(rows, tmp_path / "out.csv", io.StringIO())
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as handle:
        back = list(csv.DictReader(handle))
    expected = [{key: "" if value is None else str(value) for key, value in row.items()} for row in rows]
    assert back == expected


# ------------------------------------------------------------------------------------------------ console script
def test_the_console_script_writes_json_lines_to_standard_output(tiny_model_dir, photos):
    script = Path(sys.executable).parent / "phi3v"
    first = [str(script), "predict", "--model", str(tiny_model_dir), str(photos / "loose.png"), "--quiet"]
    result = subprocess.run(
        [*first, str(photos / "broken.jpg"), "--max-new-tokens", "4", "--device", "cpu"],  # inputs between options
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["input"] for row in rows] == [str(photos / "loose.png"), str(photos / "broken.jpg")]
    assert rows[0]["raw"] is not None and rows[1]["error"]
    assert "predicted 2 inputs: 1 answered" in result.stderr


# ------------------------------------------------------------------------------------------------ the guide
def test_the_guide_commands_parse():
    guide = GUIDE.read_text()
    commands = [command for command in documented_commands(guide) if command[0] == "predict"]
    assert len(commands) >= 4, "docs/predict.md lost its commands"
    parser = build_parser()
    for command in commands:
        args, extra = parser.parse_known_args(command)
        assert not [value for value in extra if value.startswith("-")], f"{command}: unrecognised {extra}"
        assert args.command == "predict" and args.model and (args.inputs or extra or args.csv)
    for option in (
        "--csv",
        "--image-column",
        "--recursive",
        "--out",
        "--batch-size",
        "--max-new-tokens",
        "--constrained",
        "--device",
        "--dtype",
        "--num-crops",
        "--base-model",
        "--timeout",
        "--retries",
        "--max-bytes",
        "--quiet",
    ):
        assert f"`{option}" in guide, f"docs/predict.md does not document {option}"
