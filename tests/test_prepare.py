"""`phi3v prepare` end to end against a real loopback HTTP server: outcomes, outputs, resume, kill -9."""

from __future__ import annotations

import io
import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pandas as pd
import pytest
from PIL import Image

from http_server import LoopbackServer
from phi3v.cli import main
from phi3v.data.catalog import normalize_title
from phi3v.data.download import DownloadConfig
from phi3v.data.synthetic import make_synthetic_catalog
from phi3v.prepare import PrepareOptions, prepare

HASH_PATH = re.compile(r"^images/[0-9a-f]{2}/[0-9a-f]{64}\.jpg$")
FAST = DownloadConfig(concurrency=8, timeout=5.0, retries=1, backoff=0.01)


def jpeg(colour: tuple[int, int, int], size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def options(**download) -> PrepareOptions:
    config = DownloadConfig(**{**FAST.__dict__, **download})
    return PrepareOptions(download=config, progress=False)


def write_catalog(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def row(image, title="Navy Check Coat", category="COATS", price="1890.0", code="100"):
    return {"product_code": code, "title": title, "category3_code": category, "full_price": price, "imageurl": image}


@pytest.fixture
def server():
    with LoopbackServer() as running:
        yield running


def test_every_kind_of_row_ends_kept_failed_or_duplicate(tmp_path, server):
    a = server.add("/a", jpeg((200, 30, 30)))
    b = server.add("/b", jpeg((30, 200, 30)))
    c = server.add("/c", jpeg((30, 30, 200)))
    retry = server.add_sequence("/flaky", [{"status": 500, "body": b"oops"}, {"body": jpeg((90, 90, 90))}])
    (tmp_path / "imgs").mkdir()
    Image.new("RGBA", (40, 30), (10, 20, 30, 0)).save(tmp_path / "imgs" / "local.png")
    rows = [
        row(a, price="1,250.00", code="0"),  # 0 kept (price written as text)
        row(server.url("/missing"), code="1"),  # 1 http_404
        row("N.A.", code="2"),  # 2 placeholder
        row(a, price="1250", code="3"),  # 3 duplicate of 0 (same image content, title, category, price)
        row(a, title="Beige Check Coat", code="4"),  # 4 kept: same image, other labels
        row(b, title="", code="5"),  # 5 missing_title (never fetched)
        row(b, price="", code="6"),  # 6 missing_price
        row(b, price="abc", code="7"),  # 7 invalid_price
        row(c, code="../../evil"),  # 8 kept: the id is data, never a path
        row(server.add("/page", b"<html>hi</html>", content_type="image/jpeg"), code="9"),  # 9 not_an_image
        row("imgs/local.png", title="Red Plain Bag", category="N.A.", code="10"),  # 10 kept: local path, N.A. category
        row(retry, title="Green Striped Hat", code="11"),  # 11 kept after a retry
    ]
    catalog = write_catalog(tmp_path / "shop.csv", rows)
    out = tmp_path / "out"
    report = prepare(str(catalog), out, options())

    assert (report.rows_in, report.kept, report.failed, report.duplicates) == (12, 5, 6, 1)
    assert report.invariant_holds()
    assert report.failure_reasons == {
        "http_404": 1,
        "invalid_price": 1,
        "missing_price": 1,
        "missing_title": 1,
        "not_an_image": 1,
        "placeholder": 1,
    }
    assert server.hits["/a"] == 1 and server.hits["/b"] == 0 and server.hits["/flaky"] == 2

    failures = pd.read_csv(out / "failures.csv", dtype=str)
    assert dict(zip(failures.row_index, failures.reason, strict=True)) == {
        "1": "http_404", "2": "placeholder", "5": "missing_title", "6": "missing_price", "7": "invalid_price",
        "9": "not_an_image",
    }  # fmt: skip
    assert pd.read_csv(out / "duplicates.csv").to_dict("records") == [
        {"row_index": 3, "id": 3, "url": a, "duplicate_of_row": 0}
    ]
    kept = pd.read_csv(out / "catalog.csv", dtype=str, keep_default_na=False)
    assert list(kept.columns) == [*rows[0], "local_image_path", "split"]
    assert kept.product_code.tolist() == ["0", "4", "../../evil", "10", "11"]
    assert all(HASH_PATH.match(p) and (out / p).is_file() for p in kept.local_image_path)
    assert kept.local_image_path[0] == kept.local_image_path[1]  # one stored file for the shared image
    assert set(kept.split) <= {"train", "validation", "test"}

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows_in"] == 12 and manifest["counts"]["kept_rows_sharing_an_image"] == 2
    assert manifest["categories"] == {"COATS": 4, "N.A.": 1}
    assert manifest["price"]["min"] == 1250.0 and manifest["splits"] == report.splits
    assert manifest["columns"]["image"] == "imageurl" and "phi3v" in manifest["versions"]

    dataset = datasets.load_from_disk(str(out / "dataset"))
    assert sum(len(dataset[s]) for s in ("train", "validation", "test")) == 5
    everything = datasets.concatenate_datasets([dataset[s] for s in ("train", "validation", "test")])
    by_index = {r["row_index"]: r for r in everything}
    assert by_index[0]["price"] == 1250.0 and by_index[10]["category"] == "N.A."
    assert by_index[10]["image"].mode == "RGB" and by_index[10]["image"].getpixel((0, 0)) == (255, 255, 255)
    # nothing written outside DIR (the catalog folder holds only what the test put there)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out", "shop.csv"]
    assert not (tmp_path.parent / "evil").exists()


def test_a_rerun_skips_finished_work_and_writes_the_same_outputs(tmp_path, server):
    rows = [row(server.add(f"/{i}", jpeg((i * 40, 10, 10))), title=f"Item {i}", code=str(i)) for i in range(5)]
    catalog = write_catalog(tmp_path / "c.csv", rows)
    first = prepare(str(catalog), tmp_path / "out", options())
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("catalog.csv", "failures.csv", "manifest.json")}
    hits = sum(server.hits.values())
    second = prepare(str(catalog), tmp_path / "out", options())
    assert first.fetched_now == 5 and second.fetched_now == 0 and sum(server.hits.values()) == hits
    assert {name: (tmp_path / "out" / name).read_bytes() for name in before} == before


def test_transient_failures_are_retried_on_a_rerun_unless_told_not_to(tmp_path, server):
    url = server.add("/later", b"busy", status=503)
    catalog = write_catalog(tmp_path / "c.csv", [row(url)])
    assert prepare(str(catalog), tmp_path / "out", options(retries=0)).failure_reasons == {"http_503": 1}
    server.add("/later", jpeg((1, 2, 3)))
    keep = PrepareOptions(
        download=DownloadConfig(**{**FAST.__dict__, "retries": 0}), retry_failed=False, progress=False
    )
    assert prepare(str(catalog), tmp_path / "out", keep).fetched_now == 0
    report = prepare(str(catalog), tmp_path / "out", options(retries=0))
    assert report.fetched_now == 1 and report.kept == 1


def test_changing_the_image_settings_of_a_prepared_folder_is_refused(tmp_path, server):
    catalog = write_catalog(tmp_path / "c.csv", [row(server.add("/x", jpeg((5, 5, 5))))])
    prepare(str(catalog), tmp_path / "out", options())
    with pytest.raises(ValueError, match="other image settings"):
        prepare(str(catalog), tmp_path / "out", options(max_side=16))


def dataset_rows(out: Path) -> dict[str, list]:
    dataset = datasets.load_from_disk(str(out / "dataset"))
    return {s: [(r["row_index"], r["title"], r["image_path"]) for r in dataset[s]] for s in dataset}


def test_kill_9_midway_then_resume_gives_the_uninterrupted_result(tmp_path, server):
    rows = [
        row(server.add(f"/slow{i}", jpeg((i * 5, 100, 50)), delay=0.15), title=f"Item {i % 17}", code=str(i))
        for i in range(40)
    ]
    rows.append(row(server.url("/gone"), code="gone"))
    catalog = write_catalog(tmp_path / "c.csv", rows)
    interrupted, clean = tmp_path / "interrupted", tmp_path / "clean"
    command = [sys.executable, "-m", "phi3v.cli", "prepare", str(catalog), "--out", str(interrupted)]
    process = subprocess.Popen([*command, "--concurrency", "2", "--quiet"], stderr=subprocess.DEVNULL)
    journal = interrupted / ".phi3v-state" / "journal.sqlite"
    deadline = time.monotonic() + 120
    done = 0
    while done < 6 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        if journal.exists():
            try:
                with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
                    done = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:
                pass  # the table is being created
    process.kill()  # SIGKILL: no clean-up of any kind
    process.wait(timeout=30)
    assert process.returncode == -9, "the run finished before it could be killed"
    assert not (interrupted / "manifest.json").exists()

    resumed = prepare(str(catalog), interrupted, options())
    assert 0 < resumed.fetched_now < 41  # only what the killed run had not journaled
    reference = prepare(str(catalog), clean, options())
    for name in ("catalog.csv", "failures.csv", "duplicates.csv"):
        assert (interrupted / name).read_bytes() == (clean / name).read_bytes(), name
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (interrupted, clean)]
    assert manifests[0] == manifests[1]
    assert dataset_rows(interrupted) == dataset_rows(clean)
    assert resumed.failure_reasons == reference.failure_reasons == {"http_404": 1}


def test_a_local_synthetic_catalog_prepares_offline_with_title_grouped_splits(tmp_path):
    catalog = make_synthetic_catalog(tmp_path / "sample", 80, seed=3)
    report = prepare(str(catalog), tmp_path / "out", options())
    assert report.invariant_holds() and report.kept >= 70
    kept = pd.read_csv(tmp_path / "out" / "catalog.csv", dtype=str, keep_default_na=False)
    splits_per_title = kept.groupby(kept.title.map(normalize_title)).split.nunique()
    assert (splits_per_title == 1).all()  # near-duplicate titles ("navy  check coat ") never cross splits
    assert set(kept.split) == {"train", "validation", "test"}


def test_cli_prepare_prints_the_summary_and_fails_clearly_offline(tmp_path, capsys):
    catalog = make_synthetic_catalog(tmp_path / "sample", 30, seed=4)
    assert main(["prepare", str(catalog), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"rows in = kept \+ failed \+ duplicates: 30 = \d+ \+ \d+ \+ \d+", out)
    assert main(["prepare", "DBQ/Burberry.Product.prices.United.States", "--out", str(tmp_path / "hub")]) == 1
    assert "could not load the dataset 'DBQ/Burberry.Product.prices.United.States'" in capsys.readouterr().err
    assert main(["prepare", str(catalog), "--out", str(tmp_path / "o2"), "--image-column", "photo"]) == 1
    assert "--image-column 'photo'" in capsys.readouterr().err


def test_a_journaled_image_that_went_missing_is_fetched_again(tmp_path, server):
    catalog = write_catalog(tmp_path / "c.csv", [row(server.add("/img", jpeg((40, 50, 60))))])
    prepare(str(catalog), tmp_path / "out", options())
    (stored,) = (tmp_path / "out" / "images").rglob("*.jpg")
    stored.unlink()
    (stored.parent / ".0123abcd.tmp").write_bytes(b"partial")  # what a killed write leaves behind
    report = prepare(str(catalog), tmp_path / "out", options())
    assert report.fetched_now == 1 and report.kept == 1 and stored.is_file()
    assert not list((tmp_path / "out" / "images").rglob(".*.tmp"))


def test_a_second_run_on_the_same_folder_is_refused_while_one_holds_it(tmp_path):
    from phi3v.prepare import _exclusive

    catalog = make_synthetic_catalog(tmp_path / "sample", 5, seed=5)
    with _exclusive(tmp_path / "out"), pytest.raises(RuntimeError, match="another phi3v prepare is using"):
        prepare(str(catalog), tmp_path / "out", options())
    assert prepare(str(catalog), tmp_path / "out", options()).invariant_holds()  # free again afterwards
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        prepare(str(catalog), tmp_path / "file", options())


def test_hub_catalogs_may_not_name_local_files_and_non_text_images_fail_by_name():
    from phi3v.data.catalog import ColumnMap
    from phi3v.prepare import _parse_row

    columns = ColumnMap()

    def parse(image, hub):
        record = {
            "imageurl": image,
            "title": "Coat",
            "category3_code": "COATS",
            "full_price": 10.0,
            "product_code": 7.0,
        }
        return _parse_row(0, record, columns, hub=hub)

    assert parse("../../etc/passwd", hub=True).reason == "invalid_source"
    assert parse("imgs/a.jpg", hub=False).reason is None  # a local catalog may use its own files
    assert parse("https://example.com/a.jpg", hub=True).reason is None
    assert parse(["a.jpg"], hub=False).reason == "invalid_source"
    assert parse(None, hub=False).source == ""  # a placeholder: the downloader reports it
    assert parse("x.jpg", hub=False).id == "7"  # an integer id read as float is written without ".0"


def test_the_user_guide_lists_every_failure_reason():
    from phi3v.data.download import REASONS

    guide = (Path(__file__).resolve().parents[1] / "docs" / "prepare.md").read_text()
    row_reasons = ["missing_title", "missing_price", "invalid_price"]
    missing = [r for r in [*REASONS, *row_reasons] if r != "ok" and f"`{r}`" not in guide]
    assert missing == []
