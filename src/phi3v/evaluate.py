"""`phi3v evaluate`: score a model's generated answers on a prepared split against baselines and a blank-image run.

    phi3v evaluate --model runs/burberry-lora --data data/burberry --split test --out runs/burberry-lora/eval

Steps, top to bottom (`evaluate`):

1. Open the prepared split and the training split (for the baselines and the category vocabulary); read every
   image's size from its header (an unreadable one is a data failure, counted and listed, the run goes on).
2. Load the model (`phi3v.inference.load_for_inference`: LoRA adapter merged into its base, full weights, an exported
   folder or a base model for zero-shot) and the prompt / answer template it was trained with.
3. Generate: batched greedy decoding with the KV cache (`phi3v.generation.generate_answers`), optionally held to the
   template's grammar (``--constrained``; the free answers are then generated too, to show the effect).
4. Image ablation: the same prompts with every image replaced by a blank one of the same size (same token count).
5. Score (`phi3v.metrics`): price, category and title metrics overall and per category, the confusion matrix, the
   baselines from the training split (medians, the optimal constant per category for each price score, the
   majority category, the most frequent title), the blank-image scores and whether the model uses the image at all.
6. Write ``metrics.json``, ``predictions.jsonl``, ``report.md`` + ``plots/``, a self-contained ``report.html``
   (`phi3v.report`), and a W&B run with a predictions table when ``--report-to wandb``.

Every score covers every scored row. An answer without a usable price is scored as a predicted price of 0 (APE 1,
SMAPE 2, outside every tolerance): as bad as a price off by 100 % (for SMAPE, the worst there is). The same scores
over the answers with a price only are kept beside them (``*_parsed``, with ``price_coverage``). Category and title
metrics count an unparsed field as wrong. The baselines price every row, and are scored on the same rows with the
same definitions.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from phi3v.data.collate import TRAIN_SPLIT, image_size_of, load_prepared_dataset
from phi3v.generation import Generation, TemplateConstraint, end_token_ids, generate_answers
from phi3v.inference import load_for_inference
from phi3v.metrics import (
    AnswerTemplate,
    ParsedAnswer,
    baseline_predictions,
    confusion_matrix,
    per_category,
    sample_scores,
    score_predictions,
)
from phi3v.model.image_io import load_image

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.jsonl"
BLANK_COLOUR = (255, 255, 255)
# The model "uses the image" when the real images beat blank ones by more than these margins on at least one field
# (accuracy and similarity: absolute points; median APE, over all rows, a missing price counting as 1: absolute
# points of relative error).
IMAGE_USE_MARGINS = {"category_accuracy": 0.05, "title_similarity": 0.05, "price_ape_median": 0.05}


class EvaluationError(RuntimeError):
    """An evaluation that cannot run or cannot finish; the message says why."""


@dataclass
class EvaluateOptions:
    """What `phi3v evaluate` runs (the CLI flags, one to one).

    Attributes:
        model: Training output, checkpoint, exported or base model folder, or a hub id.
        data: `phi3v prepare` output folder.
        out: Folder for metrics.json, predictions.jsonl and the report.
        split: The split to score (``test`` by default).
        batch_size: Images per `generate` call.
        max_new_tokens: Answer length bound.
        constrained: Hold answers to the template's grammar (categories from the training split, numeric price).
        ablation: Also answer with blank images (proof that the image is used).
        limit: Score only the first N rows of the split.
        device / dtype / num_crops / base_model: Model loading (`load_for_inference`).
        qlora_base: What a ``qlora`` adapter is merged into: ``nf4`` (the weights it trained against) or
            ``original`` (`load_for_inference`).
        prompt / answer_template: Override the ones the model was trained with (default: its train_config.yaml,
            else phi3v's defaults).
        override_trained: Allow ``num_crops`` / ``prompt`` / ``answer_template`` other than the trained ones
            (refused otherwise); metrics.json's ``overrides`` and the report then name them.
        report_to: ``none`` or ``wandb`` (offline without an API key).
        wandb_project: W&B project.
        progress: Show progress (`phi3v.progress`: bars on a terminal, else periodic log lines).
    """

    model: str
    data: str
    out: str
    split: str = "test"
    batch_size: int = 16
    max_new_tokens: int = 64
    constrained: bool = False
    ablation: bool = True
    limit: int | None = None
    device: str | None = None
    dtype: str = "auto"
    num_crops: int | None = None
    base_model: str | None = None
    qlora_base: Literal["nf4", "original"] = "nf4"
    prompt: str | None = None
    answer_template: str | None = None
    override_trained: bool = False
    report_to: Literal["none", "wandb"] = "none"
    wandb_project: str = "phi3v"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"--batch-size and --max-new-tokens must be >= 1, got {self.batch_size}, {self.max_new_tokens}"
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.report_to not in ("none", "wandb"):
            raise ValueError(f"--report-to must be none or wandb, got {self.report_to!r}")


@dataclass
class EvaluationResult:
    """What `evaluate` wrote: ``results`` is the content of metrics.json, ``files`` the paths by name."""

    results: dict[str, Any]
    records: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)
    wandb_offline_run: str | None = None


# ------------------------------------------------------------------------------------------------------- the stage
def evaluate(options: EvaluateOptions) -> EvaluationResult:
    """Run one evaluation end to end (see the module docstring for the steps).

    Raises:
        DatasetError: The data folder is not a prepared dataset, or lacks the split (or the training split), or the
            split is empty.
        ModelLoadError / FileNotFoundError / OSError: The model cannot be loaded (the message says why).
        EvaluationError: No image of the split could be read.
    """
    started = time.perf_counter()
    out = Path(options.out)

    # 1. data: the split, the training split's labels, every image's size from its header
    wanted = list(dict.fromkeys([options.split, TRAIN_SPLIT]))
    splits = load_prepared_dataset(options.data, wanted)
    split = splits[options.split]
    if options.limit is not None:
        split = split.select(range(min(options.limit, len(split))))
    train_rows = splits[TRAIN_SPLIT].select_columns(["title", "category", "price"]).to_list()
    rows = split.remove_columns("image").to_list()
    images = _ImageColumn(split)
    sizes, failures = images.sizes()

    # 2. model, prompt and template
    loaded = load_for_inference(
        options.model,
        base_model=options.base_model,
        device=options.device,
        dtype=options.dtype,
        num_crops=options.num_crops,
        prompt=options.prompt,
        answer_template=options.answer_template,
        override_trained=options.override_trained,
        qlora_base=options.qlora_base,
    )
    prompt = loaded.prompt(options.prompt)
    template = loaded.answer_template(options.answer_template)
    chat_prompt = loaded.processor.apply_chat_template([{"role": "user", "content": prompt}])
    constraint = (
        TemplateConstraint(
            template,
            loaded.processor.tokenizer,
            sorted({row["category"] for row in train_rows}),
            end_token_ids(loaded.processor),
            title_max_chars=max(len(row["title"]) for row in train_rows) + 20,
        )
        if options.constrained
        else None
    )

    # 3. answers (and the free answers beside constrained ones)
    def answer(load: Callable[[int], Image.Image], indices: list[int], label: str, grammar: Any) -> Generation:
        return generate_answers(
            loaded.model,
            loaded.processor,
            chat_prompt,
            indices,
            load,
            sizes=sizes,
            batch_size=options.batch_size,
            max_new_tokens=options.max_new_tokens,
            constraint=grammar,
            progress=label if options.progress else False,
        )

    readable = sorted(sizes)
    main = answer(images.load, readable, "answering", constraint)
    failures.update(main.failures)
    scored = sorted(main.answers)
    if not scored:
        raise EvaluationError(
            f"{options.data}: none of the {len(rows)} images of split {options.split!r} could be read "
            f"(first error: {next(iter(failures.values()), 'none')})"
        )
    free = answer(images.load, scored, "answering freely", None) if constraint is not None else None

    # 4. the same prompts with blank images of the same sizes
    def blank(i: int) -> Image.Image:
        return Image.new("RGB", sizes[i], BLANK_COLOUR)

    blanked = answer(blank, scored, "answering with blank images", constraint) if options.ablation else None

    # 5. scores
    truths = [rows[i] for i in scored]
    parsed = [template.parse(main.answers[i]) for i in scored]
    metrics = score_predictions(parsed, truths)
    results: dict[str, Any] = {
        "model": loaded.source,  # a run folder without a final model: the checkpoint that stood for it
        "model_kind": loaded.kind,
        "base_model": loaded.base,
        "qlora_base": loaded.qlora_base,
        "data": options.data,
        "split": options.split,
        "prompt": prompt,
        "answer_template": template.template,
        "overrides": loaded.overrides,
        "decoding": {
            "batch_size": options.batch_size,
            "max_new_tokens": options.max_new_tokens,
            "constrained": options.constrained,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "num_crops": loaded.processor.image_processor.num_crops,
        },
        "counts": {
            "rows": len(rows),
            "scored": len(scored),
            "image_failures": len(failures),
            "parse_failures": int(metrics["parse_failures"]),
        },
        "metrics": metrics,
        "per_category": per_category(parsed, truths),
        "confusion": (
            confusion_matrix([p.category for p in parsed], [t["category"] for t in truths])
            if "category" in template.fields
            else {"labels": [], "columns": [], "matrix": []}
        ),
        "baselines": _score_baselines(train_rows, truths),
        "ablation": _ablation(main, blanked, template, truths, metrics, scored) if blanked is not None else None,
        "constrained": (
            {
                "free": score_predictions([template.parse(free.answers[i]) for i in scored], truths),
                "constrained": metrics,
            }
            if free is not None
            else None
        ),
        "image_failures": [
            {"index": i, "id": rows[i].get("id"), "error": reason} for i, reason in sorted(failures.items())
        ],
        "throughput": {
            "images_per_second": round(main.images_per_second, 3),
            "tokens_per_second": round(main.new_tokens / main.seconds, 1) if main.seconds > 0 else math.nan,
            "seconds": round(main.seconds, 3),
            "total_seconds": None,  # set below, once everything ran
        },
    }
    records = _records(
        rows,
        parsed_by_index=dict(zip(scored, parsed, strict=True)),
        main=main,
        free=free,
        blanked=blanked,
        failures=failures,
        template=template,
    )

    # 6. files
    out.mkdir(parents=True, exist_ok=True)
    results["throughput"]["total_seconds"] = round(time.perf_counter() - started, 2)
    files = _write_outputs(out, results, records, images.load_thumbnail)
    evaluation = EvaluationResult(results, records, files)
    if options.report_to == "wandb":
        evaluation.wandb_offline_run = _log_to_wandb(out, options, results, records, images.load_thumbnail, files)
    return evaluation


# ------------------------------------------------------------------------------------------------------- pieces
class _ImageColumn:
    """The split's images, undecoded until asked for (a whole column of decoded images would not fit in memory)."""

    def __init__(self, split: Any) -> None:
        import datasets

        self.column = split.cast_column("image", datasets.Image(decode=False)).select_columns(["image"])

    def _value(self, index: int) -> dict[str, Any]:
        return self.column[index]["image"]

    def sizes(self) -> tuple[dict[int, tuple[int, int]], dict[int, str]]:
        """``(width, height)`` of every readable image from its header; the reason for each unreadable one."""
        sizes: dict[int, tuple[int, int]] = {}
        failures: dict[int, str] = {}
        for index in range(len(self.column)):
            try:
                sizes[index] = image_size_of(self._value(index))
            except Exception as err:  # any header error is this row's data failure
                failures[index] = f"unreadable image header ({type(err).__name__}: {err})"
                logger.warning("row %d: %s; left out", index, failures[index])
        return sizes, failures

    def load(self, index: int) -> Image.Image:
        value = self._value(index)
        source = value["bytes"] if value.get("bytes") is not None else value["path"]
        return load_image(source, name=f"row {index}")

    def load_thumbnail(self, index: int, size: int = 256) -> Image.Image | None:
        try:
            image = self.load(index)
        except Exception:  # a failed image has no thumbnail
            return None
        image.thumbnail((size, size))
        return image


def _score_baselines(train_rows: list[dict[str, Any]], truths: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        name: {
            "description": baseline.description,
            "fields": list(baseline.fields),
            "metric": baseline.metric,
            "optimal_for": baseline.optimal_for,
            "metrics": score_predictions(baseline.predictions, truths, fields=baseline.fields),
        }
        for name, baseline in baseline_predictions(train_rows, truths).items()
    }


def _ablation(
    main: Generation,
    blanked: Generation,
    template: AnswerTemplate,
    truths: list[dict[str, Any]],
    metrics: dict[str, float],
    scored: list[int],
) -> dict[str, Any]:
    """Blank-image scores, the share of answers that changed, and whether the image makes a difference."""
    blank_parsed = [template.parse(blanked.answers.get(i, "")) for i in scored]
    blank_metrics = score_predictions(blank_parsed, truths)
    changed = sum(main.answers[i] != blanked.answers.get(i) for i in scored) / len(scored)
    gains = image_gains(metrics, blank_metrics)
    return {
        "image": "blank",
        "colour": list(BLANK_COLOUR),
        "metrics": blank_metrics,
        "answers_changed": changed,
        "gains": gains,
        "uses_image": any(gain > IMAGE_USE_MARGINS[key] for key, gain in gains.items()),
    }


def image_gains(real: dict[str, float], blank: dict[str, float]) -> dict[str, float]:
    """How much better the real images score than blank ones, per headline metric (positive = better; NaN-free:
    a metric missing or NaN on either side is left out)."""
    gains: dict[str, float] = {}
    for key in IMAGE_USE_MARGINS:
        if key not in real or key not in blank:
            continue
        a, b = real[key], blank[key]
        if math.isnan(a) or math.isnan(b):
            continue
        gains[key] = b - a if key == "price_ape_median" else a - b  # lower APE is better
    return gains


def _records(
    rows: list[dict[str, Any]],
    *,
    parsed_by_index: dict[int, ParsedAnswer],
    main: Generation,
    free: Generation | None,
    blanked: Generation | None,
    failures: dict[int, str],
    template: AnswerTemplate,
) -> list[dict[str, Any]]:
    """One predictions.jsonl line per row of the split, in split order."""
    records = []
    for index, row in enumerate(rows):
        truth = {"title": row["title"], "category": row["category"], "price": float(row["price"])}
        record: dict[str, Any] = {
            "index": index,
            "id": row.get("id"),
            "image": row.get("source") or row.get("image_path"),
            "truth": truth,
            "truth_text": template.format(truth),
        }
        pred = parsed_by_index.get(index)
        if pred is None:
            record.update(raw=None, parsed=None, parse_ok=False, missing=list(template.fields), scores=None)
            record.update(blank_raw=None, free_raw=None, error=f"image failed to load: {failures.get(index, '?')}")
        else:
            record.update(
                raw=main.answers[index],
                parsed={"title": pred.title, "category": pred.category, "price": pred.price},
                parse_ok=pred.ok,
                missing=list(pred.missing),
                scores=sample_scores(pred, truth),
                blank_raw=blanked.answers.get(index) if blanked is not None else None,
                free_raw=free.answers.get(index) if free is not None else None,
                error=None,
            )
        records.append(record)
    return records


def _json_safe(value: Any) -> Any:
    """NaN / inf become null: metrics.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write_outputs(
    out: Path, results: dict[str, Any], records: list[dict[str, Any]], thumbnail: Callable[[int], Image.Image | None]
) -> dict[str, Path]:
    from phi3v.report import write_report

    files = {"metrics": out / METRICS_NAME, "predictions": out / PREDICTIONS_NAME}
    files["metrics"].write_text(json.dumps(_json_safe(results), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(files["predictions"], "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(_json_safe(record), ensure_ascii=False) + "\n")
    report = write_report(out, results, records, thumbnail)
    files.update(markdown=report["markdown"], html=report["html"])
    return files


def _log_to_wandb(
    out: Path,
    options: EvaluateOptions,
    results: dict[str, Any],
    records: list[dict[str, Any]],
    thumbnail: Callable[[int], Image.Image | None],
    files: dict[str, Path],
) -> str | None:
    """One W&B run (job type ``evaluation``): the scores as summary, a predictions table, the report's plots."""
    import wandb

    from phi3v.tracking import finish_wandb, restore_env, setup_wandb_env, snapshot_env

    previous = snapshot_env()
    setup_wandb_env(out, options.wandb_project)
    try:
        wandb.init(
            job_type="evaluation",
            config={k: v for k, v in results.items() if not isinstance(v, dict | list)}
            | {"decoding": results["decoding"]},
        )
        summary = {f"eval/{k}": v for k, v in results["metrics"].items()}
        for name, baseline in results["baselines"].items():
            summary.update({f"baseline/{name}/{k}": v for k, v in baseline["metrics"].items()})
        if results["ablation"] is not None:
            summary.update({f"blank_image/{k}": v for k, v in results["ablation"]["metrics"].items()})
            summary["blank_image/answers_changed"] = results["ablation"]["answers_changed"]
            summary["blank_image/uses_image"] = results["ablation"]["uses_image"]
        wandb.run.summary.update(_json_safe(summary))
        table = wandb.Table(
            columns=[
                "index",
                "id",
                "image",
                "truth",
                "prediction",
                "blank_image_prediction",
                "price_ape",
                "category_ok",
                "title_similarity",
                "error",
            ]
        )
        for record in records:
            image = thumbnail(record["index"])
            scores = record["scores"] or {}
            table.add_data(
                record["index"],
                record["id"],
                wandb.Image(image) if image is not None else None,
                record["truth_text"],
                record["raw"],
                record["blank_raw"],
                scores.get("price_ape"),
                scores.get("category_ok"),
                scores.get("title_similarity"),
                record["error"],
            )
        logged: dict[str, Any] = {"evaluation/predictions": table}
        for plot in sorted((out / "plots").glob("*.png")):
            logged[f"evaluation/{plot.stem}"] = wandb.Image(str(plot))
        wandb.log(logged)
    finally:
        run = finish_wandb()
        restore_env(previous)
    if run is not None:
        logger.warning("W&B ran offline; upload the run with: wandb sync %s", run)
    return run
