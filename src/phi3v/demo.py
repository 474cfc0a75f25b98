"""`phi3v demo`: the whole job, for real, on a drawn sample catalog — offline, on a CPU, in a few minutes.

    phi3v demo                       # runs/demo: 3,000 products, a tiny Phi-3-V trained for 3 epochs
    phi3v demo --n 6000 --epochs 4   # bigger
    phi3v demo --catalog DBQ/Burberry.Product.prices.United.States --model microsoft/Phi-3.5-vision-instruct

Steps, top to bottom (`run_demo`); each is the code path of the command named beside it:

1. ``phi3v synth``: draw the sample catalog (DBQ schema, quirks included: ``N.A.`` image URLs, shared photos,
   near-duplicate titles) whose photos determine title, category and price; its image URLs point at a loopback HTTP
   server that the demo runs for the duration of step 2.
2. ``phi3v prepare``: download every photo over HTTP with the same fetcher users run on a real catalog, verify and
   store it, report the failed rows and duplicates, and split by normalised title.
3. ``phi3v tokenizer``: a byte-level BPE with Phi-3's special tokens and chat template, trained on the training
   split's answers (`phi3v.catalog_tokenizer.train_catalog_tokenizer`), so a title, a category or a price is a few
   tokens.
4. ``phi3v init-model``: a random-weight model of the real Phi-3-V architecture at the ``tiny`` size, with that
   tokenizer (`phi3v.model.random_init.write_random_checkpoint`).
5. ``phi3v train``: full fine-tuning with configs/demo.yaml (`demo_recipe`), W&B offline inside the run folder.
6. ``phi3v evaluate``: generated answers on the test split, scored against the baselines and the same model on blank
   images; ``report.html``.

`--catalog` replaces steps 1-2's drawn catalog with a real one (hub id or file, DBQ column names); `--model` replaces
steps 3-4 with a real model (hub id or folder), trained with LoRA (`REAL_MODEL_TRAINING`). Both need the network
unless they are local.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import yaml

logger = logging.getLogger(__name__)

# The tiny model's recipe: configs/demo.yaml (packaged as phi3v/configs/demo.yaml), whose model / data / output_dir
# the demo replaces with its own folders (`demo_recipe`).
DEMO_CONFIG = "demo.yaml"
# A real model (``--model``): LoRA on the language model plus the projector, the settings of configs/burberry-lora.yaml.
REAL_MODEL_TRAINING: dict[str, Any] = {
    "mode": "lora",
    "num_crops": 4,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "projector": True},
    "eval_samples": 16,
    "training": {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "learning_rate": 1.0e-4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "logging_steps": 10,
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "bf16": True,
        "gradient_checkpointing": True,
    },
}
# The steps of a default run, in order (keys of `DemoResult.seconds`; the README lists the same).
DEMO_STEPS = ("synth", "prepare", "tokenizer", "init-model", "train", "evaluate")


class DemoError(RuntimeError):
    """A demo step that cannot run; the message names the step and why."""


@dataclass
class DemoOptions:
    """What `phi3v demo` runs (the CLI flags, one to one).

    Attributes:
        out: Folder for everything: ``catalog/``, ``data/``, ``base-model/``, ``model/``, ``eval/``.
        n: Products in the drawn catalog.
        epochs: Training epochs.
        seed: Seed of the catalog, the weights and the data order.
        image_size: Side of the drawn photos in pixels.
        catalog: A real catalog (hub id or CSV / Parquet / JSONL) instead of the drawn one.
        model: A real base model (hub id or folder) instead of the tiny random one.
        report_to: ``wandb`` (offline without an API key) or ``none``.
        progress: Show progress (`phi3v.progress`: bars on a terminal, else periodic log lines).
    """

    out: str = "runs/demo"
    n: int = 3000
    epochs: float = 3.0
    seed: int = 0
    image_size: int = 256
    catalog: str | None = None
    model: str | None = None
    report_to: Literal["none", "wandb"] = "wandb"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n < 50:
            raise ValueError(f"--n must be at least 50 (the test split needs rows), got {self.n}")
        if self.epochs <= 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if self.report_to not in ("none", "wandb"):
            raise ValueError(f"--report-to must be none or wandb, got {self.report_to!r}")


@dataclass
class DemoResult:
    """Where everything went and what the evaluation said (``results`` is eval/metrics.json's content)."""

    out: Path
    data: Path
    model: Path
    report: Path
    results: dict[str, Any]
    prepare_counts: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    wandb_runs: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------- the demo
def run_demo(options: DemoOptions) -> DemoResult:
    """Run the demo end to end (see the module docstring for the steps)."""
    from phi3v.catalog_tokenizer import train_catalog_tokenizer
    from phi3v.evaluate import EvaluateOptions, evaluate
    from phi3v.model.random_init import write_random_checkpoint
    from phi3v.prepare import PrepareOptions, prepare
    from phi3v.train import load_train_config, train

    out = Path(options.out).resolve()
    if options.model is not None and Path(options.model).resolve().is_relative_to(out / "model"):
        raise DemoError(f"--model {options.model} is inside {out / 'model'}, which the demo trains into; copy it out")
    _clear_previous_run(out, (out / "model", out / "eval"), dry_run=True)  # refuse before any work
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        seconds[step] = time.perf_counter() - clock
        clock = time.perf_counter()
        logger.info("demo: %s done in %.1f s", step, seconds[step])

    # 1-2. catalog -> prepared dataset (a drawn catalog is downloaded from a loopback server, like a real one)
    data = out / "data"
    if options.catalog is None:
        with _serve_folder(out / "catalog") as base_url:
            catalog = _draw_catalog(out / "catalog", options, base_url)
            lap("synth")
            report = prepare(str(catalog), data, PrepareOptions(seed=options.seed, progress=options.progress))
    else:
        report = prepare(options.catalog, data, PrepareOptions(seed=options.seed, progress=options.progress))
    if not report.invariant_holds():  # prepare guarantees it; a broken promise must not pass silently
        raise DemoError(f"prepare: rows in {report.rows_in} != kept + failed + duplicates ({report})")
    lap("prepare")

    # 3-4. base model: a tiny random Phi-3-V with a tokenizer trained on the catalog, or the real one
    if options.model is None:
        recipe = demo_recipe()
        tokenizer = train_catalog_tokenizer(data, out / "tokenizer", answer_template=recipe.get("answer_template"))
        lap("tokenizer")
        base_model = write_random_checkpoint(
            out / "base-model", "tiny", seed=options.seed, num_crops=recipe["num_crops"], tokenizer_folder=tokenizer
        )
        lap("init-model")
    else:
        base_model = options.model
        recipe = REAL_MODEL_TRAINING

    # 5. train (the run folder's train_config.yaml is the demo's config, ready to copy); a re-run starts afresh
    model_dir = out / "model"
    _clear_previous_run(out, (model_dir, out / "eval"))
    config_path = out / "train.yaml"
    config = {
        "model": str(base_model),
        "data": str(data),
        "output_dir": str(model_dir),
        **recipe,
        "training": {
            **recipe["training"],
            "num_train_epochs": options.epochs,
            "seed": options.seed,
            "report_to": options.report_to,
        },
    }
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    with _offline_wandb(options.report_to):
        summary = train(load_train_config(config_path), progress=options.progress)
    lap("train")

    # 6. evaluate on the test split
    with _offline_wandb(options.report_to):
        evaluation = evaluate(
            EvaluateOptions(
                model=str(model_dir),
                data=str(data),
                out=str(out / "eval"),
                report_to=options.report_to,
                progress=options.progress,
            )
        )
    lap("evaluate")
    runs = [run for run in (summary.wandb_offline_run, evaluation.wandb_offline_run) if run]
    counts = {"rows": report.rows_in, "kept": report.kept, "failed": report.failed, "duplicates": report.duplicates}
    return DemoResult(
        out=out,
        data=data,
        model=model_dir,
        report=evaluation.files["html"],
        results=evaluation.results,
        prepare_counts=counts,
        seconds=seconds,
        wandb_runs=runs,
    )


# ------------------------------------------------------------------------------------------------------- steps
def _clear_previous_run(out: Path, folders: tuple[Path, ...], dry_run: bool = False) -> None:
    """Remove an earlier demo run's ``folders`` (a re-run starts afresh); refuse folders the demo did not make
    (its ``train.yaml`` marks ``out`` as a demo folder)."""
    present = [folder for folder in folders if folder.exists()]
    if present and not (out / "train.yaml").is_file():
        raise DemoError(
            f"{', '.join(map(str, present))} exist(s) and {out} holds no earlier demo run (no train.yaml): "
            "choose another --out"
        )
    for folder in [] if dry_run else present:
        logger.info("demo: removing the previous run's %s", folder)
        shutil.rmtree(folder)


def _draw_catalog(folder: Path, options: DemoOptions, base_url: str) -> Path:
    from phi3v.data.synthetic import make_synthetic_catalog

    logger.info("demo: drawing %d products into %s", options.n, folder)
    return make_synthetic_catalog(
        folder, options.n, seed=options.seed, base_url=base_url, image_size=options.image_size
    )


def demo_recipe() -> dict[str, Any]:
    """The tiny model's training config, configs/demo.yaml (the packaged copy), without its ``model``, ``data`` and
    ``output_dir`` (the demo's folders replace them)."""
    from importlib import resources

    recipe = yaml.safe_load(resources.files("phi3v.configs").joinpath(DEMO_CONFIG).read_text(encoding="utf-8"))
    return {key: value for key, value in recipe.items() if key not in ("model", "data", "output_dir")}


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("demo server: " + format, *args)


@contextlib.contextmanager
def _serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    folder.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, name="phi3v-demo-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def _offline_wandb(report_to: str) -> Iterator[None]:
    """W&B offline unless the user chose otherwise (``WANDB_MODE`` set, or an API key present)."""
    from phi3v.tracking import restore_env, snapshot_env, wandb_logged_in

    previous = snapshot_env()
    if report_to == "wandb" and not os.environ.get("WANDB_API_KEY") and not wandb_logged_in():
        os.environ.setdefault("WANDB_MODE", "offline")
    try:
        yield
    finally:
        restore_env(previous)


# ------------------------------------------------------------------------------------------------------- summary
def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, model, blank images, best baseline) for price median APE, category accuracy and title similarity."""
    from phi3v.report import format_number, format_percent

    model = results["metrics"]
    ablation = (results.get("ablation") or {}).get("metrics") or {}
    baselines = results["baselines"]
    rows = []
    for key, label, fmt, baseline_keys in (
        ("price_ape_median", "price: median error", format_percent, ("global_median_price", "category_median_price")),
        ("category_accuracy", "category: accuracy", format_percent, ("majority_category",)),
        ("title_similarity", "title: similarity", format_number, ("most_frequent_title",)),
    ):
        shown = [f"{fmt(baselines[name]['metrics'].get(key))} ({name})" for name in baseline_keys if name in baselines]
        rows.append((label, fmt(model.get(key)), fmt(ablation.get(key)), "; ".join(shown)))
    return rows
