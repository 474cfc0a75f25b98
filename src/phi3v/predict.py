"""`phi3v predict`: answer product photos (files, folders, URLs or a CSV column) with a trained model.

    phi3v predict --model exports/burberry photo.jpg photos/ https://example.com/shirt.jpg --out answers.jsonl
    phi3v predict --model runs/burberry-lora --csv shop.csv --image-column photo --out answers.csv

Steps, top to bottom (`predict`):

1. Collect the inputs in the order given (`collect_inputs`): an image file; a folder (its images, sorted by name;
   sub-folders too with ``recursive``); an http(s) URL; and, with ``csv``, one input per CSV row from
   ``image_column`` (a URL, or a path relative to the CSV file). A missing file or folder on the command line, a
   folder without images, a missing CSV or column stops the run before anything loads; a bad CSV *row* (no image,
   not a path or URL) becomes an output row with its error.
2. Load the model (`phi3v.inference.load_for_inference`: LoRA adapter merged into its base, full weights, a
   ``checkpoint-N``, an export or a base model) with the prompt and answer template it was trained with.
3. Fetch the URLs with the catalog fetcher (`phi3v.data.download.fetch_sources`: concurrent, timeout per attempt,
   retries with backoff, a byte cap, a decompression-bomb guard) into a temporary content-addressed store, whose
   file names come from the content's hash, never from the URL; it is deleted at the end. Local files are read
   where they are. Every image's size is read from its header to batch similar sizes together.
4. Answer in batches (`phi3v.generation.generate_answers`: greedy, KV cache, stopped at ``<|end|>``), optionally
   held to the template's grammar (``constrained``; the categories and the title bound come from the export's
   ``export_info.json`` or from the ``train`` split of the training data named in ``train_config.yaml``, as in
   ``phi3v evaluate --constrained``).
5. Parse each answer with the model's `phi3v.metrics.AnswerTemplate` and write one row per input, in input order:
   ``input, title, category, price, raw, error`` as JSON Lines (default; standard output without ``out``) or CSV
   (``out`` ending in ``.csv``). An image that fails to download or decode gets a row with its error and the run
   goes on; the failures are counted in the result.

Nothing is ever unpickled: images are decoded by Pillow, weights are safetensors.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
"""File name endings (any case) taken from a folder; files named on the command line are read whatever their name."""
OUTPUT_FIELDS = ("input", "title", "category", "price", "raw", "error")
TITLE_MAX_CHARS = 200  # title bound of constrained decoding when the training titles are unknown (generation.py)


class PredictError(ValueError):
    """A prediction run that cannot start: bad inputs, a missing CSV column, no categories for --constrained."""


@dataclass
class PredictOptions:
    """What `phi3v predict` does (the CLI flags, one to one).

    Attributes:
        model: Training output, ``checkpoint-N``, exported or base model folder, or a hub id.
        inputs: Image files, folders and http(s) URLs, in output order.
        csv: A CSV file whose ``image_column`` holds image URLs or paths (relative to the CSV); its rows follow
            ``inputs``.
        image_column: The CSV column with the images (required with ``csv``).
        recursive: Take images from sub-folders of a folder too.
        out: Output file: ``.csv`` for CSV, anything else JSON Lines; None writes JSON Lines to standard output.
        batch_size: Images per `generate` call.
        max_new_tokens: Answer length bound.
        constrained: Hold answers to the template's grammar (categories of the training data, numeric price).
        device / dtype / num_crops / base_model: Model loading (`phi3v.inference.load_for_inference`).
        qlora_base: What a ``qlora`` adapter is merged into: ``nf4`` (the weights it trained against) or
            ``original``.
        override_trained: Allow a ``num_crops`` other than the trained one (refused otherwise).
        timeout: Seconds per download attempt.
        retries: Extra download attempts after timeouts, connection errors, 5xx and 429.
        max_bytes: Largest image downloaded.
        progress: Show progress (`phi3v.progress`: a bar on a terminal, else periodic log lines).
    """

    model: str
    inputs: list[str] = field(default_factory=list)
    csv: str | None = None
    image_column: str | None = None
    recursive: bool = False
    out: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 64
    constrained: bool = False
    device: str | None = None
    dtype: str = "auto"
    num_crops: int | None = None
    base_model: str | None = None
    qlora_base: Literal["nf4", "original"] = "nf4"
    override_trained: bool = False
    timeout: float = 20.0
    retries: int = 2
    max_bytes: int = 20_000_000
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise PredictError(
                f"--batch-size and --max-new-tokens must be >= 1, got {self.batch_size}, {self.max_new_tokens}"
            )
        if not self.inputs and self.csv is None:
            raise PredictError("nothing to predict: give image files, folders or URLs, or --csv FILE")
        if self.csv is not None and not self.image_column:
            raise PredictError("--csv needs --image-column COLUMN (the column holding image URLs or paths)")
        if self.image_column and self.csv is None:
            raise PredictError("--image-column needs --csv FILE")
        if self.timeout <= 0 or self.retries < 0 or self.max_bytes < 1:
            raise PredictError("--timeout and --max-bytes must be positive and --retries >= 0")


@dataclass(frozen=True)
class PredictInput:
    """One input row.

    Attributes:
        label: What the output's ``input`` column shows: the argument, the file found in a folder, or the CSV value.
        kind: ``path`` (a local file), ``url`` (http/https) or ``invalid`` (a CSV row without a usable image).
        location: The file path (resolved against the CSV's folder for CSV rows) or the URL.
        error: Why an ``invalid`` row cannot be answered.
    """

    label: str
    kind: Literal["path", "url", "invalid"]
    location: str
    error: str | None = None


@dataclass
class PredictResult:
    """What `predict` produced.

    Attributes:
        rows: One dict per input, in input order, with the `OUTPUT_FIELDS`.
        answered: Inputs that got an answer.
        failed: Inputs whose image could not be fetched or decoded (their row has an ``error``).
        parse_failures: Answers that do not follow the answer template completely.
        seconds: Wall time of the whole run.
        out: The output file (None: standard output).
        model_kind: ``adapter``, ``full``, ``exported`` or ``base`` (`phi3v.inference.LoadedModel.kind`).
    """

    rows: list[dict[str, Any]]
    answered: int
    failed: int
    parse_failures: int
    seconds: float
    out: Path | None
    model_kind: str


# ------------------------------------------------------------------------------------------------------- the stage
def predict(options: PredictOptions, stdout: IO[str] | None = None) -> PredictResult:
    """Answer every input (see the module docstring for the steps) and write the rows.

    Args:
        options: The run.
        stdout: Where JSON Lines go without ``options.out`` (default `sys.stdout`).

    Raises:
        PredictError: Inputs that cannot be collected, or ``constrained`` without a category vocabulary.
        ModelLoadError / FileNotFoundError / OSError: The model cannot be loaded (the message says why).
    """
    from phi3v.generation import TemplateConstraint, end_token_ids, generate_answers
    from phi3v.inference import load_for_inference
    from phi3v.model.image_io import load_image

    started = time.perf_counter()
    # 1. inputs (fails before the model loads)
    inputs = collect_inputs(
        options.inputs, csv_file=options.csv, image_column=options.image_column, recursive=options.recursive
    )
    logger.info("%d inputs (%d URLs)", len(inputs), sum(item.kind == "url" for item in inputs))
    out = Path(options.out) if options.out else None
    if out is not None:
        _check_out(out, inputs, options.csv)

    # 2. model, prompt, template (and the grammar)
    loaded = load_for_inference(
        options.model,
        base_model=options.base_model,
        device=options.device,
        dtype=options.dtype,
        num_crops=options.num_crops,
        override_trained=options.override_trained,
        qlora_base=options.qlora_base,
    )
    trained_with = loaded.train_config or {}
    if loaded.train_config is None:
        logger.warning("%s has no train_config.yaml: using phi3v's default prompt and answer template", options.model)
    template = loaded.answer_template()
    chat_prompt = loaded.processor.apply_chat_template([{"role": "user", "content": loaded.prompt()}])
    constraint = None
    if options.constrained:
        vocabulary = model_vocabulary(options.model, trained_with)
        if vocabulary is None:
            raise PredictError(
                f"--constrained needs the categories the model was trained on: {options.model} has no "
                "export_info.json with them, and the training data "
                f"({trained_with.get('data') or 'no data folder in train_config.yaml'}) is not a readable "
                "phi3v prepare output"
            )
        constraint = TemplateConstraint(
            template,
            loaded.processor.tokenizer,
            vocabulary.categories,
            end_token_ids(loaded.processor),
            title_max_chars=vocabulary.title_max_chars,
        )

    with tempfile.TemporaryDirectory(prefix="phi3v-predict-") as scratch:
        # 3. images: URLs fetched into a temporary store, every size read from its header
        paths, sizes, errors = _locate_images(inputs, Path(scratch), options)

        def load(index: int) -> Image.Image:
            return load_image(paths[index], name=inputs[index].label)

        # 4. answers
        readable = [i for i in range(len(inputs)) if i in sizes]
        generation = generate_answers(
            loaded.model,
            loaded.processor,
            chat_prompt,
            readable,
            load,
            sizes=sizes,
            batch_size=options.batch_size,
            max_new_tokens=options.max_new_tokens,
            constraint=constraint,
            progress="predicting" if options.progress else False,
        )
    errors.update(generation.failures)

    # 5. rows, in input order
    rows: list[dict[str, Any]] = []
    parse_failures = 0
    for index, item in enumerate(inputs):
        raw = generation.answers.get(index)
        row: dict[str, Any] = dict.fromkeys(OUTPUT_FIELDS)
        row["input"] = item.label
        if raw is None:
            row["error"] = errors.get(index, "no answer")
        else:
            parsed = template.parse(raw)
            parse_failures += not parsed.ok
            row.update(title=parsed.title, category=parsed.category, price=parsed.price, raw=raw)
        rows.append(row)
    write_rows(rows, out, stdout if stdout is not None else sys.stdout)
    failed = sum(row["error"] is not None for row in rows)
    result = PredictResult(
        rows=rows,
        answered=len(rows) - failed,
        failed=failed,
        parse_failures=parse_failures,
        seconds=round(time.perf_counter() - started, 3),
        out=out,
        model_kind=loaded.kind,
    )
    logger.info(
        "%d inputs: %d answered (%d not following the template), %d failed, in %.1f s",
        len(rows),
        result.answered,
        parse_failures,
        failed,
        result.seconds,
    )
    return result


# ------------------------------------------------------------------------------------------------------- inputs
def collect_inputs(
    inputs: Sequence[str],
    *,
    csv_file: str | None = None,
    image_column: str | None = None,
    recursive: bool = False,
) -> list[PredictInput]:
    """The inputs in output order: the command-line ones (folders expanded), then the CSV rows.

    Raises:
        PredictError: A command-line path that does not exist or is not an image file, folder or http(s) URL; a
            folder without images; a missing CSV file or column.
    """
    from phi3v.data.download import source_kind

    collected: list[PredictInput] = []
    for value in inputs:
        kind = source_kind(value)
        if kind == "url":
            collected.append(PredictInput(value, "url", value.strip()))
            continue
        path = Path(value)
        if not path.exists():  # an existing file named like a URL scheme ("img:1.jpg") is still a file
            what = "no such file or folder" if kind == "path" else "not an image file, a folder or an http(s) URL"
            raise PredictError(f"input {value!r}: {what}")
        if path.is_dir():
            found = _images_in(path, recursive)
            if not found:
                endings = ", ".join(sorted(IMAGE_EXTENSIONS))
                deep = " or its sub-folders" if recursive else " (pass --recursive to look in sub-folders)"
                raise PredictError(f"input folder {value}: no image files ({endings}) in it{deep}")
            collected += [PredictInput(str(file), "path", str(file)) for file in found]
        else:
            collected.append(PredictInput(value, "path", str(path)))
    if csv_file is not None:
        collected += _csv_inputs(Path(csv_file), image_column or "")
    return collected


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    """Image files of a folder (by extension, hidden files skipped), sorted by their path inside it."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found = [
        path
        for path in candidates
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


def _csv_inputs(csv_file: Path, column: str) -> list[PredictInput]:
    """One input per data row of the CSV; rows without a usable image become ``invalid`` inputs with the reason."""
    from phi3v.data.download import is_placeholder, source_kind

    if not csv_file.is_file():
        raise PredictError(f"--csv {csv_file}: no such file")
    with open(csv_file, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or column not in reader.fieldnames:
            columns = ", ".join(reader.fieldnames or []) or "none (empty file)"
            raise PredictError(f"--csv {csv_file}: no column {column!r}; its columns are: {columns}")
        rows = list(reader)
    collected = []
    for number, row in enumerate(rows, start=1):
        value = row.get(column)
        where = f"{csv_file} row {number}"
        if value is None or is_placeholder(value):
            collected.append(PredictInput(value or "", "invalid", "", f"{where}: no image in column {column!r}"))
            continue
        kind = source_kind(value)
        path = Path(value.strip())
        location = path if path.is_absolute() else csv_file.parent / path
        if kind == "url":
            collected.append(PredictInput(value, "url", value.strip()))
        elif kind == "path" or location.is_file():  # an existing file named like a scheme ("img:1.jpg") too
            collected.append(PredictInput(value, "path", str(location)))
        else:
            collected.append(
                PredictInput(value, "invalid", "", f"{where}: {value[:200]!r} is neither a path nor an http(s) URL")
            )
    return collected


def _locate_images(
    inputs: list[PredictInput], scratch: Path, options: PredictOptions
) -> tuple[dict[int, str], dict[int, tuple[int, int]], dict[int, str]]:
    """A local file and the (width, height) of every usable input; the error of every other one.

    URLs are fetched into a content-addressed `ImageStore` under ``scratch`` (names from the content's hash).
    """
    from phi3v.data.download import DownloadConfig, FetchResult, ImageStore, fetch_sources

    paths: dict[int, str] = {}
    sizes: dict[int, tuple[int, int]] = {}
    errors: dict[int, str] = {}
    urls = [item.location for item in inputs if item.kind == "url"]
    fetched: dict[str, FetchResult] = {}
    store = ImageStore(scratch / "downloads", fsync=False)
    if urls:
        config = DownloadConfig(
            concurrency=min(8, len(urls)),
            timeout=options.timeout,
            retries=options.retries,
            max_bytes=options.max_bytes,
        )
        logger.info("downloading %d image URL(s)", len(set(urls)))
        fetch_sources(urls, store, config, lambda result: fetched.__setitem__(result.source, result))
    for index, item in enumerate(inputs):
        if item.kind == "invalid":
            errors[index] = item.error or "no image"
        elif item.kind == "url":
            result = fetched[item.location]
            if result.ok and result.path is not None and result.width and result.height:
                paths[index] = str(store.path_of(result.path))
                sizes[index] = (result.width, result.height)
            else:
                errors[index] = f"download failed: {result.reason} ({result.detail})"
        else:
            try:
                sizes[index] = _header_size(Path(item.location))
                paths[index] = item.location
            except (OSError, ValueError, SyntaxError) as err:
                errors[index] = f"{item.label}: {err}"
    for index, reason in sorted(errors.items()):
        logger.warning("input %d (%s) left out: %s", index, inputs[index].label, reason)
    return paths, sizes, errors


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, nothing decoded; a clear error for a missing file or a non-image."""
    if not path.exists():
        raise FileNotFoundError("file not found")
    if not path.is_file():
        raise OSError("not a regular file")
    try:
        with Image.open(path) as image:
            return image.size
    except Image.UnidentifiedImageError as err:
        raise ValueError("not a recognised image format") from err
    except Image.DecompressionBombError as err:
        raise ValueError(f"possible decompression bomb: {err}") from err


# ------------------------------------------------------------------------------------------------------- categories
@dataclass(frozen=True)
class TrainingVocabulary:
    """What constrained decoding needs from the training data, as `phi3v evaluate --constrained` derives it.

    Attributes:
        categories: The training split's categories, sorted.
        title_max_chars: The training split's longest title plus 20 characters (the bound of a generated title).
    """

    categories: list[str]
    title_max_chars: int


def training_vocabulary(data: str | os.PathLike | None) -> TrainingVocabulary | None:
    """The categories and title bound of a `phi3v prepare` output's ``train`` split; None when the folder is absent
    or not a prepared dataset (e.g. the run moved machines)."""
    from phi3v.data.collate import TRAIN_SPLIT, DatasetError, load_prepared_dataset

    if not data:
        return None
    try:
        train = load_prepared_dataset(data, [TRAIN_SPLIT])[TRAIN_SPLIT].select_columns(["title", "category"])
    except (DatasetError, OSError, ValueError) as err:
        logger.info("no training vocabulary from %s (%s)", data, err)
        return None
    rows = train.to_list()
    categories = sorted({str(row["category"]) for row in rows if row["category"]})
    return TrainingVocabulary(categories, max(len(str(row["title"])) for row in rows) + 20) if categories else None


def model_vocabulary(model: str, train_config: dict[str, Any]) -> TrainingVocabulary | None:
    """For constrained decoding: the export's ``export_info.json`` (written from the training data at export time),
    else the training data named in ``train_config.yaml``."""
    from phi3v.inference import EXPORT_INFO_NAME

    info_file = Path(model) / EXPORT_INFO_NAME
    if info_file.is_file():
        info = json.loads(info_file.read_text(encoding="utf-8"))
        if info.get("categories"):
            return TrainingVocabulary(
                [str(c) for c in info["categories"]], int(info.get("title_max_chars") or TITLE_MAX_CHARS)
            )
    return training_vocabulary(train_config.get("data"))


# ------------------------------------------------------------------------------------------------------- output
def _check_out(out: Path, inputs: list[PredictInput], csv_file: str | None) -> None:
    """Refuse an ``--out`` that is a folder or one of the inputs (the answers would replace it), before any work."""
    if out.is_dir():
        raise PredictError(f"--out {out} is a folder; give a file name ending in .jsonl or .csv")
    target = out.resolve()
    sources = [Path(csv_file)] if csv_file else []
    sources += [Path(item.location) for item in inputs if item.kind == "path"]
    clash = next((source for source in sources if source.resolve() == target), None)
    if clash is not None:
        raise PredictError(f"--out {out} is the input {clash}: the answers would replace it; choose another file")


def write_rows(rows: list[dict[str, Any]], out: Path | None, stdout: IO[str]) -> None:
    """JSON Lines (``out`` None: to ``stdout``) or CSV (``out`` ending in ``.csv``), written to a temporary file
    and renamed, so a crash never leaves a half-written output."""
    fmt = "csv" if out is not None and out.suffix.lower() == ".csv" else "jsonl"
    buffer = io.StringIO(newline="" if fmt == "csv" else None)
    if fmt == "csv":
        writer = csv.DictWriter(buffer, fieldnames=list(OUTPUT_FIELDS))  # \r\n rows: a \r or \n in a field is quoted
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row[key] is None else row[key] for key in OUTPUT_FIELDS})
    else:
        for row in rows:
            buffer.write(json.dumps(row, ensure_ascii=False) + "\n")
    text = buffer.getvalue()
    if out is None:
        stdout.write(text)
        stdout.flush()
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
