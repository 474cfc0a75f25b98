"""What a training run logs to Weights & Biases (offline) and TensorBoard: the logged content, not just folders.

One short tiny run (`tracked_run`, 4 steps, evaluation and checkpoints every 2) is shared by the tests; its
environment has no W&B key, no netrc and no preset ``WANDB_*`` / ``TENSORBOARD_LOGGING_DIR``, so phi3v must choose
offline mode and the run-folder defaults itself. The ``.wandb`` file is read with `wandb_reader` (real wandb, no
mocks); TensorBoard event files with TensorBoard's `EventAccumulator`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from transformers import TrainerCallback

from train_helpers import tiny_config_args
from wandb_reader import (
    TRACKING_ENV,
    isolate_tracking_env,
    read_config,
    read_history,
    read_records,
    read_tables,
    wandb_file,
)

REPORT_TO = ["wandb", "tensorboard"]
MAX_STEPS, EVAL_STEPS, EVAL_SAMPLES, BATCH = 4, 2, 2, 4
EVAL_PAUSE = 1.5  # seconds the first evaluation is held (`RunProbe`)
TABLE_COLUMNS = ["step", "image", "truth", "prediction", "price_ape", "category_ok"]


@dataclass
class TrackedRun:
    """A finished run: its output folder, `TrainingSummary`, fake home, `RunProbe` and the environment after."""

    out: Path
    summary: Any
    home: Path
    probe: RunProbe
    env_after: dict[str, str | None]  # the tracking variables once train() returned

    def log_history(self) -> list[dict[str, Any]]:
        """``OUTPUT/log_history.jsonl`` (the Trainer's ``state.log_history``)."""
        text = (self.out / "log_history.jsonl").read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wandb_run_dir(self) -> Path:
        """The offline W&B run folder named by the summary."""
        assert self.summary.wandb_offline_run, "train() returned no offline W&B run"
        return Path(self.summary.wandb_offline_run)


def _tracking_env() -> dict[str, str | None]:
    """The current values of `TRACKING_ENV`."""
    return {name: os.environ.get(name) for name in TRACKING_ENV}


class RunProbe(TrainerCallback):
    """A `TrainerCallback` that records the tracking variables as the run sees them (``on_train_begin``), times
    each optimizer step (``on_step_begin`` -> ``on_step_end``, by global step) and holds the first evaluation
    ``pause`` seconds longer (inside ``Trainer.evaluate``), so that a throughput window that wrongly counts or
    subtracts evaluation time shows it by a clear margin whatever the machine's load."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.env: dict[str, str | None] = {}
        self.began: dict[int, float] = {}
        self.steps: dict[int, float] = {}  # global step -> seconds from step begin to step end
        self.paused_at: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.env = _tracking_env()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.began[state.global_step + 1] = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps[state.global_step] = time.perf_counter() - self.began[state.global_step]

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.paused_at is None:
            self.paused_at = state.global_step
            time.sleep(self.pause)


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """One tiny run reporting to W&B and TensorBoard in an isolated environment (kept for the whole module, so
    a later run in this module sees what this one left in the environment, as a notebook would)."""
    from phi3v.train import load_train_config, train

    base = tmp_path_factory.mktemp("tracking")
    out = base / "run"
    with pytest.MonkeyPatch.context() as mp:
        isolate_tracking_env(mp, base / "home")
        args = tiny_config_args(
            tiny_model_dir,
            tiny_dataset_dir,
            out,
            report_to=REPORT_TO,
            max_steps=MAX_STEPS,
            eval_steps=EVAL_STEPS,
            save_steps=EVAL_STEPS,
            eval_samples=EVAL_SAMPLES,
            per_device_train_batch_size=BATCH,
        )
        probe = RunProbe(pause=EVAL_PAUSE)
        summary = train(load_train_config(None, args), callbacks=[probe])
        yield TrackedRun(out=out, summary=summary, home=base / "home", probe=probe, env_after=_tracking_env())


def _by_step(entries: list[dict[str, Any]], key: str, step_key: str = "step") -> list[tuple[int, float]]:
    """``(step, value)`` of every entry holding ``key``, in logged order."""
    return [(int(entry[step_key]), entry[key]) for entry in entries if key in entry]


def _approx_pairs(pairs: list[tuple[int, float]], rel: float = 1e-6) -> list[tuple[int, Any]]:
    """``pairs`` with approximate values (TensorBoard stores float32; W&B may round). A None (log_history.jsonl's
    NaN, e.g. a median price error with no parsed price) expects NaN."""
    return [
        (step, pytest.approx(math.nan if value is None else value, rel=rel, abs=1e-12, nan_ok=True))
        for step, value in pairs
    ]


# ------------------------------------------------------------------------------------------------------- W&B
def test_wandb_goes_offline_into_the_output_dir(tracked_run):
    run_dir = tracked_run.wandb_run_dir()
    out = tracked_run.out.resolve()
    assert run_dir.is_dir() and run_dir.name.startswith("offline-run-"), run_dir
    assert run_dir.parent == out / "wandb", f"the W&B run is not in {out}/wandb: {run_dir}"
    assert wandb_file(run_dir).stat().st_size > 0
    summary_json = json.loads((tracked_run.out / "training_summary.json").read_text(encoding="utf-8"))
    assert summary_json["wandb_offline_run"] == str(run_dir)
    # phi3v chose offline itself and kept every W&B folder inside the run folder, none in the (fake) home
    assert tracked_run.probe.env["WANDB_MODE"] == "offline"
    for name, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        assert tracked_run.probe.env[name] == str(out / "wandb" / sub)
    assert (out / "wandb" / "data" / "artifacts" / "staging").is_dir(), "table media not staged in the run folder"
    assert not [p for p in tracked_run.home.rglob("*") if "wandb" in p.name.lower()], "W&B wrote into HOME"
    # the run record carries the project from the config (wandb_project, default "phi3v")
    runs = [r.run for r in read_records(run_dir) if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].project == "phi3v"
    config = read_config(run_dir)
    assert config["output_dir"] == str(tracked_run.out)
    assert config["max_steps"] == MAX_STEPS and config["eval_steps"] == EVAL_STEPS
    assert config["report_to"] == REPORT_TO
    # phi3v's own keys ride along under "phi3v"
    assert config["phi3v"]["mode"] == "lora" and config["phi3v"]["output_dir"] == str(tracked_run.out)
    assert config["phi3v"]["answer_template"].startswith("Product: {title}")


def test_wandb_history_has_train_and_eval_metrics(tracked_run):
    rows = read_history(tracked_run.wandb_run_dir())
    keys = set().union(*rows)
    expected = {
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/padding_ratio",
        "train/images_per_second",
        "train/tokens_per_second",
        "train/global_step",
        "eval/loss",
        "eval/gen_price_ape_median",
        "eval/gen_category_accuracy",
        "eval/gen_title_similarity",
        "eval/gen_parse_rate",
        "eval/generations",
    }
    assert expected <= keys, f"missing from W&B history: {sorted(expected - keys)}"
    assert not {k for k in keys if k.startswith("eval_") or k == "loss"}, "un-namespaced keys reached W&B"
    train_rows = [row for row in rows if "train/loss" in row]
    assert [row["train/global_step"] for row in train_rows] == list(range(1, MAX_STEPS + 1))
    for row in train_rows:  # every logging step carries phi3v's batch statistics next to the loss
        assert {"train/padding_ratio", "train/images_per_second", "train/tokens_per_second"} <= set(row)
        assert row["train/padding_ratio"] >= 1.0
    eval_steps = [row["train/global_step"] for row in rows if "eval/loss" in row]
    assert eval_steps == [2, 4, 4]  # evaluations at steps 2 and 4, then train()'s final evaluate()


def test_wandb_values_match_log_history(tracked_run):
    rows = read_history(tracked_run.wandb_run_dir())
    history = tracked_run.log_history()
    for key in ("loss", "learning_rate", "grad_norm", "padding_ratio", "images_per_second", "tokens_per_second"):
        logged = _by_step(rows, f"train/{key}", step_key="train/global_step")
        assert logged == _approx_pairs(_by_step(history, key)), key
    for key in ("loss", "gen_price_ape_median", "gen_category_accuracy", "gen_title_similarity", "gen_parse_rate"):
        logged = _by_step(rows, f"eval/{key}", step_key="train/global_step")
        assert logged == _approx_pairs(_by_step(history, f"eval_{key}")), key
    assert len(_by_step(history, "loss")) == MAX_STEPS


def test_wandb_generation_tables_match_generations_files(tracked_run):
    run_dir = tracked_run.wandb_run_dir()
    rows = read_history(run_dir)
    refs = [(row["train/global_step"], row["eval/generations"]) for row in rows if "eval/generations" in row]
    assert [step for step, _ in refs] == [2, 4, 4]
    for _, ref in refs:
        assert ref["_type"] == "table-file" and ref["ncols"] == len(TABLE_COLUMNS) and ref["nrows"] == EVAL_SAMPLES
    tables = read_tables(run_dir, "eval/generations")
    assert len(tables) == len(refs)
    folder = tracked_run.out / "generations"
    for i, ((step, _), table) in enumerate(zip(refs, tables, strict=True)):
        assert table["columns"] == TABLE_COLUMNS
        # the last table is train()'s final evaluate(): its answers go to final.jsonl where the code names them so
        name = "final" if i == len(refs) - 1 and (folder / "final.jsonl").is_file() else f"step-{step}"
        records = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text("utf-8").splitlines()]
        assert len(records) == EVAL_SAMPLES
        cells = [dict(zip(TABLE_COLUMNS, row, strict=True)) for row in table["data"]]
        assert [cell["truth"] for cell in cells] == [record["truth"] for record in records]
        assert [cell["prediction"] for cell in cells] == [record["prediction"] for record in records]
        assert all(cell["step"] == step for cell in cells)
        for cell, record in zip(cells, records, strict=True):
            assert re.fullmatch(r"Product: .+, Category: .+, Full Price: [\d.]+", cell["truth"]), cell["truth"]
            if record["parsed_price"] is None:
                assert cell["price_ape"] is None
            else:
                expected = abs(record["parsed_price"] - record["true_price"]) / record["true_price"]
                assert cell["price_ape"] == pytest.approx(expected)
            true_category = re.search(r"Category: (.+?), Full Price", cell["truth"]).group(1)
            parsed = record["parsed_category"] or ""
            assert cell["category_ok"] is (parsed.casefold() == true_category.casefold())
            image = cell["image"]
            assert image["_type"] == "image-file" and max(image["width"], image["height"]) <= 256
            png = table["files"][image["path"]]
            with Image.open(png) as thumb:
                assert thumb.size == (image["width"], image["height"])


def test_throughput_windows_match_step_times(tracked_run):
    """images_per_second covers exactly one optimizer step here (logging_steps 1): the time it implies
    (images / rate) must be that step's duration, also for the step right after the held evaluation. (A window
    that subtracts the evaluation there implies ~0 s, or at least `EVAL_PAUSE` s too little.)"""
    probe = tracked_run.probe
    assert probe.paused_at == EVAL_STEPS
    rates = dict(_by_step(tracked_run.log_history(), "images_per_second"))
    assert sorted(rates) == sorted(probe.steps) == list(range(1, MAX_STEPS + 1))
    for step, rate in rates.items():
        assert math.isfinite(rate) and rate > 0, f"step {step}: images_per_second = {rate}"
        implied, took = BATCH / rate, probe.steps[step]
        # the window is [compute_loss, log] ~ [on_step_begin, on_step_end]: allow scheduling jitter only
        slack = min(took / 2, EVAL_PAUSE / 2)
        assert took - slack <= implied <= 1.5 * took + 0.25, (
            f"step {step}: images_per_second {rate} implies {implied:.3f} s, the step took {took:.3f} s"
        )


# ------------------------------------------------------------------------------------------------ TensorBoard
def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every events file under ``folder``: tag -> ``(step, value)`` in file then step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.rglob("events.out.tfevents.*"), key=lambda p: (int(p.name.split(".")[3]), p.name))
    assert files, f"no TensorBoard events file under {folder}"
    for path in files:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return scalars


def test_tensorboard_scalars_match_log_history(tracked_run):
    folder = tracked_run.out / "tensorboard"
    assert tracked_run.probe.env["TENSORBOARD_LOGGING_DIR"] == str(folder.resolve())
    scalars = _tensorboard_scalars(folder)
    history = tracked_run.log_history()
    for key in ("loss", "padding_ratio", "learning_rate", "grad_norm"):
        assert f"train/{key}" in scalars, f"train/{key} not in TensorBoard: {sorted(scalars)}"
        assert scalars[f"train/{key}"] == _approx_pairs(_by_step(history, key)), key
    for key in ("loss", "gen_price_ape_median", "gen_category_accuracy", "gen_title_similarity"):
        assert scalars[f"eval/{key}"] == _approx_pairs(_by_step(history, f"eval_{key}")), key
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, MAX_STEPS + 1))


# ------------------------------------------------------------------------------------------- the CLI, run two
@pytest.fixture(scope="module")
def cli_run(tracked_run, tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """`phi3v train` (one step, no evaluation) with W&B and TensorBoard, in the same process and environment as
    `tracked_run`, into another output folder; returns (exit code, stdout, output folder)."""
    from phi3v.cli import main

    out = tmp_path_factory.mktemp("tracking-cli") / "run"
    args = tiny_config_args(
        tiny_model_dir,
        tiny_dataset_dir,
        out,
        report_to=REPORT_TO,
        max_steps=1,
        eval_strategy="no",
        save_strategy="no",
    )
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", *args])
    return code, stdout.getvalue(), out


def test_cli_prints_the_wandb_sync_command(cli_run):
    code, stdout, out = cli_run
    assert code == 0, stdout
    found = re.findall(r"^W&B run logged offline; upload it with: wandb sync (\S+)$", stdout, flags=re.MULTILINE)
    assert len(found) == 1, stdout
    run_dir = Path(found[0])
    assert run_dir.is_dir() and run_dir.name.startswith("offline-run-")
    assert wandb_file(run_dir).is_file()
    summary = json.loads((out / "training_summary.json").read_text(encoding="utf-8"))
    assert summary["wandb_offline_run"] == str(run_dir)
    assert [row["train/global_step"] for row in read_history(run_dir) if "train/loss" in row] == [1]


def test_second_run_in_one_process_logs_into_its_own_output_dir(cli_run, tracked_run):
    assert set(tracked_run.env_after.values()) == {None}, f"train() left variables set: {tracked_run.env_after}"
    code, stdout, out = cli_run
    assert code == 0, stdout
    summary = json.loads((out / "training_summary.json").read_text(encoding="utf-8"))
    assert Path(summary["wandb_offline_run"]).parent == out.resolve() / "wandb"
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events in the second run"
