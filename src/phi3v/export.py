"""`phi3v export`: a trained model as one self-contained folder in the official Phi-3-V layout.

    phi3v export --model runs/burberry-lora --out exports/burberry --dtype bfloat16

Steps, top to bottom (`export`):

1. Check the arguments before anything heavy loads: MODEL must be a `phi3v train` output, one of its
   ``checkpoint-N`` folders or an earlier export (it needs the run's ``train_config.yaml``; a run folder without a
   final model stands for its latest complete checkpoint, `phi3v.runs`); OUT must be empty or
   absent unless ``overwrite``, and must not hold MODEL.
2. Load the model with `phi3v.inference.load_for_inference` in float32 (a LoRA adapter is merged into its base at
   full precision; a ``qlora`` adapter into the base chosen by ``qlora_base``, below), then cast it to the export
   dtype: ``auto`` keeps the dtype of the checkpoint the weights came from (the base model's ``torch_dtype`` for an
   adapter: bfloat16 for the Phi-3 hub models; float32 for a full run).
3. Write everything into a temporary sibling folder ``.OUT.tmp-<random>``:

   - the weights with `Phi3VForCausalLM.save_pretrained` (official tensor names, shards of at most
     ``max_shard_size``, ``config.json``), always with ``model.safetensors.index.json`` (a single shard is named
     ``model-00001-of-00001.safetensors``, as transformers names shards), then checked back from the shard headers
     (`phi3v.model.checkpoint.scan_official_checkpoint`);
   - ``generation_config.json`` whose ``eos_token_id`` is ``[<|end|>, <|endoftext|>]`` (ids read from the tokenizer)
     and whose ``pad_token_id`` is the processor's: the hub's own generation config stops at id 2, which the model
     never emits, so generations run on (../shared/docs/field-survey.md, summary item 8; phi3v-reference.md §5.4);
   - the processor and tokenizer files (`Phi3VProcessor.save_pretrained`);
   - ``train_config.yaml`` (and ``training_summary.json``) copied from the run, so `phi3v evaluate` / `phi3v predict`
     on the export use the prompt and answer template the model learned;
   - ``export_info.json``: where the export came from (source, base model, mode, dtype, shards, the category
     vocabulary for ``phi3v predict --constrained``), which also marks the folder as an export
     (`phi3v.inference` then labels it ``exported``);
   - ``eval_metrics.json`` (a copy of the metrics.json found) and the model card ``README.md``.

4. Rename the temporary folder to OUT (an existing OUT, with ``overwrite``, is moved aside first and deleted after),
   so a crash never leaves a half-written export under OUT.

Nothing is ever unpickled: the run's ``training_args.bin`` is not read nor copied.

A ``qlora`` adapter was trained against the LM's linear weights quantized to NF4, not against the original ones.
``qlora_base`` says which base it is merged into; either way the export is a plain dense model (loading it needs no
bitsandbytes):

- ``nf4`` (default): the NF4 round trip of the base's LM linear weights (the same codes as in training,
  dequantized; `phi3v.quantization`). The merged model computes what the trained model computed in training and in
  `phi3v evaluate` of the run, up to float rounding (tests/test_qlora.py checks the logits), so the metrics copied
  into the model card describe the exported weights. Its LM weights are a lossy copy of the original base; the
  adapter was fitted to that copy.
- ``original``: the base as stored. Adding the adapter to weights it never saw brings back the quantization error
  (W - NF4(W)), which the adapter may have partly compensated: that is a model nobody trained nor evaluated, so
  score it (``phi3v evaluate --qlora-base original``) before shipping it. docs/train.md ("QLoRA") has the
  difference between the two measured on the tiny random model.

``export_info.json`` records the choice (``qlora_base``; null for other modes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch

from phi3v.inference import (
    EXPORT_INFO_NAME,
    TRAIN_CONFIG_NAME,
    LoadedModel,
    load_for_inference,
    read_train_config,
)
from phi3v.runs import RunFolderError, resolve_model_folder_of_run

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "phi3v-export"
SUMMARY_NAME = "training_summary.json"
METRICS_COPY_NAME = "eval_metrics.json"
CARD_NAME = "README.md"
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")
SINGLE_SHARD_NAME = "model-00001-of-00001.safetensors"

# Headline metrics of the model card: metrics.json key -> (label, format). The price scores cover every row (a row
# without a price scored as a predicted price of 0); ``price_ape_median_parsed`` only the answers with a price.
CARD_METRICS: dict[str, tuple[str, str]] = {
    "parse_rate": ("parse rate", "percent"),
    "price_coverage": ("answers with a price", "percent"),
    "price_ape_median": ("price median APE", "percent"),
    "price_mape": ("price MAPE", "percent"),
    "price_smape": ("price SMAPE (0 to 200 %)", "percent"),
    "price_within_10": ("price within 10 %", "percent"),
    "price_within_25": ("price within 25 %", "percent"),
    "price_rmsle": ("price RMSLE", "number"),
    "price_ape_median_parsed": ("price median APE, answers with a price only", "percent"),
    "category_accuracy": ("category accuracy", "percent"),
    "category_macro_f1": ("category macro-F1", "number"),
    "title_exact_match": ("title exact match", "percent"),
    "title_similarity": ("title similarity", "number"),
    "title_token_f1": ("title token F1", "number"),
}


class ExportError(ValueError):
    """An export that cannot run (bad MODEL, OUT not empty, missing metrics file); the message says why."""


@dataclass
class ExportOptions:
    """What `phi3v export` does (the CLI flags, one to one).

    Attributes:
        model: A `phi3v train` output (LoRA adapter or full weights), one of its ``checkpoint-N`` folders, or an
            earlier export.
        out: The export folder (created; must be empty or absent unless ``overwrite``).
        max_shard_size: Largest shard, in bytes or as ``"5GB"``, ``"500MB"``, ``"2GiB"`` (transformers' default
            ``"5GB"``).
        dtype: ``auto`` (the dtype of the checkpoint the weights came from), ``float32``, ``bfloat16`` or
            ``float16``.
        metrics: A ``metrics.json`` of `phi3v evaluate` for the model card (default: ``MODEL/eval/metrics.json``
            when it exists).
        base_model: The base of a LoRA adapter, overriding the one it names.
        qlora_base: What a ``qlora`` adapter is merged into: ``nf4`` (default: the NF4 round trip of the base's LM
            weights, which the adapter was trained against) or ``original`` (the base as stored; see the module
            docstring).
        device: Where the model is loaded and merged (default ``cpu``; ``cuda`` merges faster).
        overwrite: Replace a non-empty OUT.
    """

    model: str
    out: str
    max_shard_size: str = "5GB"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    metrics: str | None = None
    base_model: str | None = None
    qlora_base: Literal["nf4", "original"] = "nf4"
    device: str | None = "cpu"
    overwrite: bool = False

    def __post_init__(self) -> None:
        from phi3v.model.checkpoint import _parse_size

        if self.dtype not in EXPORT_DTYPES:
            raise ExportError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {self.dtype!r}")
        try:
            size = _parse_size(_shard_size(self.max_shard_size))
        except ValueError as err:
            raise ExportError(f"--max-shard-size: {err}") from err
        if size < 1:
            raise ExportError(f"--max-shard-size must be positive, got {self.max_shard_size!r}")


@dataclass
class ExportResult:
    """What `export` wrote.

    Attributes:
        out: The export folder.
        kind: What MODEL was: ``adapter`` (merged), ``full`` or ``exported``.
        base_model: The base model (an adapter's base, or the run's ``model``).
        dtype: The weights' dtype in the export.
        shards: The safetensors files, in order.
        tensors: Number of tensors in the index.
        total_bytes: Bytes of tensor data.
        metrics_source: The metrics.json the card reports (None when none was found).
        files: Every file of the export, by name.
    """

    out: Path
    kind: str
    base_model: str | None
    dtype: torch.dtype
    shards: list[str]
    tensors: int
    total_bytes: int
    metrics_source: Path | None
    files: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------- the stage
def export(options: ExportOptions) -> ExportResult:
    """Export one trained model (see the module docstring for the steps).

    Raises:
        ExportError: MODEL is not a training output / checkpoint / export, OUT is not empty (without
            ``overwrite``) or holds MODEL, or ``metrics`` does not exist.
        ModelLoadError / FileNotFoundError / OSError: The model cannot be loaded (the message says why).
    """
    # 1. arguments, before anything heavy loads (a run folder without a final model: its latest complete checkpoint)
    try:
        source = Path(resolve_model_folder_of_run(options.model))
    except RunFolderError as err:
        raise ExportError(str(err)) from err
    out = Path(options.out)
    train_config, train_config_file = _check_model_folder(source)
    _check_out(out, source, options.overwrite)
    metrics_file = _find_metrics(source, options.metrics, run=Path(options.model))
    metrics = _read_json(metrics_file, "--metrics") if metrics_file is not None else None
    summary_file = _next_to_run(source, SUMMARY_NAME)
    summary = _read_summary(summary_file) if summary_file is not None else None
    info_before = _read_export_info(source)

    # 2. the model, merged at full precision, then cast
    logger.info("loading %s", source)
    loaded = load_for_inference(
        str(source),
        base_model=options.base_model,
        device=options.device,
        dtype="float32",
        num_crops=None,
        qlora_base=options.qlora_base,
    )
    dtype = _export_dtype(options.dtype, loaded, info_before)
    loaded.model.to(dtype)
    base_model = loaded.base or train_config.get("model")  # an adapter's base, or the one an export came from
    kind = loaded.kind  # adapter, full or exported
    logger.info("exporting %s model (base %s) as %s", kind, base_model, str(dtype).removeprefix("torch."))

    # 3. everything into a temporary sibling folder
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shards, tensors, total_bytes = _write_weights(loaded, tmp, options.max_shard_size)
        end_ids = _write_generation_config(loaded, tmp)
        loaded.processor.save_pretrained(tmp)
        shutil.copyfile(train_config_file, tmp / TRAIN_CONFIG_NAME)
        if summary is not None and summary_file is not None:
            shutil.copyfile(summary_file, tmp / SUMMARY_NAME)
        if metrics_file is not None:
            shutil.copyfile(metrics_file, tmp / METRICS_COPY_NAME)
        info = {
            "format": EXPORT_FORMAT,
            "phi3v_version": _phi3v_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": str(source),
            "source_kind": kind,
            "base_model": base_model,
            "mode": train_config.get("mode"),
            "qlora_base": loaded.qlora_base,
            "dtype": str(dtype).removeprefix("torch."),
            "max_shard_size": options.max_shard_size,
            "shards": shards,
            "tensors": tensors,
            "total_bytes": total_bytes,
            "end_token_ids": end_ids,
            **_vocabulary(source, train_config),
            "metrics_source": str(metrics_file) if metrics_file is not None else None,
        }
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        card = model_card(info, train_config, summary, metrics, out_name=out.name)
        (tmp / CARD_NAME).write_text(card, encoding="utf-8")
        _verify(loaded, tmp)
        _move_into_place(tmp, out)
    except ExportError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as err:  # disk full, permissions, a failing shard write: one message, OUT untouched
        shutil.rmtree(tmp, ignore_errors=True)
        state = "left as it was" if out.exists() else "not created"
        raise ExportError(f"writing the export failed ({type(err).__name__}: {err}); {out} was {state}") from err
    except BaseException:  # KeyboardInterrupt, SystemExit: clean up, then let them through
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in out.iterdir())
    logger.info("exported %d tensors in %d shard(s) to %s", tensors, len(shards), out)
    return ExportResult(out, kind, base_model, dtype, shards, tensors, total_bytes, metrics_file, files)


# ------------------------------------------------------------------------------------------------------- checks
def _check_model_folder(source: Path) -> tuple[dict[str, Any], Path]:
    """The run's train_config (and its file) of a training output, checkpoint or export; ExportError otherwise."""
    if not source.exists():
        raise ExportError(f"model folder {source} does not exist")
    if not source.is_dir():
        raise ExportError(f"{source}: expected a model folder, found a file")
    has_weights = (source / "adapter_config.json").is_file() or (source / "config.json").is_file()
    if not has_weights:
        raise ExportError(
            f"{source}: not a model folder (no adapter_config.json, no config.json); expected a phi3v train output, "
            "one of its checkpoint-N folders or an earlier export"
        )
    train_config_file = _next_to_run(source, TRAIN_CONFIG_NAME)
    if train_config_file is None:
        raise ExportError(
            f"{source}: no {TRAIN_CONFIG_NAME} next to it or one folder up, so it is not a phi3v training output "
            "(a base model needs no export: load it as it is)"
        )
    train_config = read_train_config(source) or {}
    return train_config, train_config_file


def _next_to_run(source: Path, name: str) -> Path | None:
    """``source/name``, else ``source/../name`` (a checkpoint's run), as `phi3v.inference.read_train_config`."""
    for candidate in (source / name, source.parent / name):
        if candidate.is_file():
            return candidate
    return None


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    """OUT must be absent, an empty folder or (with ``overwrite``) an earlier export; not a link; not MODEL's."""
    if out.is_symlink():
        raise ExportError(f"--out {out} is a symbolic link; give the real folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    resolved_out, resolved_source = out.resolve(), source.resolve()
    if resolved_out == resolved_source or resolved_out in resolved_source.parents:
        raise ExportError(f"--out {out} is or holds the model folder {source}; choose another folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"--out {out} is not empty; pass --overwrite to replace it")
        if not (out / EXPORT_INFO_NAME).is_file():
            raise ExportError(
                f"--out {out} is not empty and not a phi3v export (no {EXPORT_INFO_NAME}): --overwrite replaces only "
                "an earlier export; choose an empty or new folder"
            )


def _find_metrics(source: Path, metrics: str | None, run: Path | None = None) -> Path | None:
    """``--metrics`` (must exist), else ``MODEL/eval/metrics.json`` when present, else None.

    When MODEL was a run folder standing for its latest checkpoint (``run`` is that folder, ``source`` the
    checkpoint), ``run/eval/metrics.json`` counts too, if it scored that checkpoint (its ``model`` names it).
    """
    if metrics is not None:
        path = Path(metrics)
        if path.is_dir():
            path = path / "metrics.json"
        if not path.is_file():
            raise ExportError(f"--metrics {metrics}: no such file (expected the metrics.json of phi3v evaluate)")
        return path
    default = source / "eval" / "metrics.json"
    if default.is_file():
        return default
    beside = run / "eval" / "metrics.json" if run is not None and run != source else None
    if beside is not None and beside.is_file():
        try:
            scored = json.loads(beside.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError):
            scored = None
        if scored is not None and Path(str(scored)).resolve() == source.resolve():
            return beside
        logger.warning("%s scored %s, not %s: not used for the model card", beside, scored, source)
    logger.warning("no evaluation metrics found (%s does not exist, no --metrics given)", default)
    return None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file; ExportError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(f"{what} {path}: not a readable JSON file ({err})") from err
    if not isinstance(data, dict):
        raise ExportError(f"{what} {path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_summary(path: Path) -> dict[str, Any] | None:
    """The run's ``training_summary.json``; a damaged one is left out of the export and the card, with a warning."""
    try:
        return _read_json(path, "training summary")
    except ExportError as err:
        logger.warning("%s; the export and its card go without it", err)
        return None


def _read_export_info(folder: Path) -> dict[str, Any] | None:
    """The ``export_info.json`` of an earlier export (None for anything else)."""
    path = folder / EXPORT_INFO_NAME
    if not path.is_file():
        return None
    info = _read_json(path, "export info")
    return info if info.get("format") == EXPORT_FORMAT else None


def _export_dtype(dtype: str, loaded: LoadedModel, info_before: dict[str, Any] | None) -> torch.dtype:
    """``auto``: the dtype of the checkpoint the weights came from (the base's for an adapter); else the name."""
    if dtype != "auto":
        return getattr(torch, dtype)
    from phi3v.model.configuration import Phi3VConfig
    from phi3v.model.hub import resolve_model_folder

    if info_before is not None and info_before.get("dtype") in EXPORT_DTYPES:
        return getattr(torch, info_before["dtype"])
    weights = loaded.base if loaded.kind == "adapter" else loaded.source
    config = Phi3VConfig.from_pretrained(resolve_model_folder(weights))
    return config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32


def _vocabulary(source: Path, train_config: dict[str, Any]) -> dict[str, Any]:
    """The training split's categories and title bound, for ``phi3v predict --constrained`` on the export (which
    may move to a machine without the training data); None values when the data cannot be read now."""
    from phi3v.predict import model_vocabulary

    vocabulary = model_vocabulary(str(source), train_config)
    if vocabulary is None:
        logger.warning(
            "the training data (%s) cannot be read: the export has no category list for predict --constrained",
            train_config.get("data"),
        )
        return {"categories": None, "title_max_chars": None}
    return {"categories": vocabulary.categories, "title_max_chars": vocabulary.title_max_chars}


# ------------------------------------------------------------------------------------------------------- writing
def _write_weights(loaded: LoadedModel, folder: Path, max_shard_size: str) -> tuple[list[str], int, int]:
    """Shards + ``config.json`` via `save_pretrained`, then the index (also for a single shard)."""
    from phi3v.model.checkpoint import WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    loaded.model.save_pretrained(folder, max_shard_size=_shard_size(max_shard_size))
    index_file = folder / WEIGHTS_INDEX_NAME
    if not index_file.is_file():  # one shard: give it a shard name and an index, as every official checkpoint has
        from safetensors import safe_open

        (folder / WEIGHTS_NAME).rename(folder / SINGLE_SHARD_NAME)
        with safe_open(folder / SINGLE_SHARD_NAME, framework="pt") as reader:
            keys = list(reader.keys())
            total = sum(
                math.prod(reader.get_slice(k).get_shape()) * _itemsize(reader.get_slice(k).get_dtype()) for k in keys
            )
        index = {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(sorted(keys), SINGLE_SHARD_NAME)}
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    shards = sorted(set(index["weight_map"].values()))
    return shards, len(index["weight_map"]), int(index["metadata"]["total_size"])


def _shard_size(value: str | int) -> str | int:
    """``"5GB"`` stays a string, ``"1000"`` (bytes) becomes an int, as `save_pretrained` takes them."""
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def _itemsize(safetensors_dtype: str) -> int:
    """Bytes per element of a safetensors dtype name (``F32``, ``BF16``, ``I64``...)."""
    sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
    return sizes.get(safetensors_dtype, 1)


def _write_generation_config(loaded: LoadedModel, folder: Path) -> list[int]:
    """``generation_config.json``: stop at ``<|end|>`` or ``<|endoftext|>``, pad with the processor's pad id."""
    from transformers import GenerationConfig

    from phi3v.generation import end_token_ids

    processor = loaded.processor
    end_ids = end_token_ids(processor)
    if processor.end_token_id is None:
        logger.warning("the tokenizer has no <|end|> token; generation_config stops at %s only", end_ids)
    config = GenerationConfig(
        bos_token_id=processor.tokenizer.bos_token_id,
        eos_token_id=end_ids,
        pad_token_id=processor.pad_token_id,
    )
    config.save_pretrained(folder)
    loaded.model.generation_config = config
    return end_ids


def _verify(loaded: LoadedModel, folder: Path) -> None:
    """Check the written shards against the model from their headers, and that the index lists every tensor."""
    from phi3v.model.checkpoint import WEIGHTS_INDEX_NAME, official_shapes, scan_official_checkpoint

    scan_official_checkpoint(loaded.model, folder)  # raises CheckpointError naming any problem
    listed = set(json.loads((folder / WEIGHTS_INDEX_NAME).read_text(encoding="utf-8"))["weight_map"])
    expected = set(official_shapes(loaded.model))
    if listed != expected:
        raise ExportError(f"{folder}: the index does not list exactly the model's tensors ({len(listed ^ expected)})")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temporary folder to OUT; an existing OUT is moved aside first and deleted after."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        else:
            out.rmdir()
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)  # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _phi3v_version() -> str:
    from phi3v import __version__

    return __version__


# ------------------------------------------------------------------------------------------------------- model card
def _cell(text: str) -> str:
    """Markdown table cell text: ``|`` (in ``<|end|>``, ``<|image_1|>``) escaped so it does not split the cell."""
    return text.replace("|", "\\|").replace("\n", " ")


# An illustrative product for the card's example answer (the price as a whole float, as catalogs store it)
_EXAMPLE_ROW = {"title": "Check Cotton Shirt", "category": "SHIRTS", "price": 590.0}


def _example_answer(train_config: dict[str, Any]) -> str:
    """`_EXAMPLE_ROW` in the run's answer template, formatted as training formats answers (``Full Price: 590``)."""
    from phi3v.metrics import DEFAULT_ANSWER_TEMPLATE, AnswerTemplate

    return AnswerTemplate(train_config.get("answer_template") or DEFAULT_ANSWER_TEMPLATE).format(_EXAMPLE_ROW)


def _format_metric(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100 * value:.1f} %" if kind == "percent" else f"{value:.3f}"


def _merge_note(info: dict[str, Any]) -> str:
    """How an adapter became the export's weights, for the model card (empty for full weights)."""
    if info.get("source_kind") != "adapter":
        return ""
    if info.get("qlora_base") == "nf4":
        return " (QLoRA adapter merged into the NF4-dequantized base weights it was trained against)"
    if info.get("qlora_base") == "original":
        return " (QLoRA adapter merged into the original base weights, not the NF4 ones it was trained against)"
    return " (LoRA adapter merged into the base weights)"


def model_card(
    info: dict[str, Any],
    train_config: dict[str, Any],
    summary: dict[str, Any] | None,
    metrics: dict[str, Any] | None,
    *,
    out_name: str = "EXPORT",
) -> str:
    """The export's ``README.md``: what it is, how it was trained, how it scored, how to use it.

    Args:
        info: The content of ``export_info.json``.
        train_config: The run's resolved config (``train_config.yaml``).
        summary: ``training_summary.json`` (None when the run has none).
        metrics: ``metrics.json`` of `phi3v evaluate` (None when none was found: the card says so).
        out_name: The export folder's name, used in the usage snippet.
    """
    base = info.get("base_model") or "unknown"
    mode = info.get("mode") or "unknown"
    lines = [
        "---",
        "library_name: phi3v",
        "pipeline_tag: image-text-to-text",
        *([f"base_model: {base}"] if "/" in base and not base.startswith(("/", ".")) else []),
        "tags: [phi3v, phi-3-vision, product-photos]",
        "---",
        "",
        f"# {out_name}",
        "",
        f"Phi-3-Vision fine-tuned with phi3v to read product photos: given a photo, it answers "
        f"`{train_config.get('answer_template', '')}`, written as it was trained, "
        f"e.g. `{_example_answer(train_config)}`.",
        "",
        "| | |",
        "|---|---|",
        *(
            f"| {name} | {_cell(value)} |"
            for name, value in (
                ("base model", f"`{base}`"),
                (
                    "fine-tuning mode",
                    f"`{mode}`" + _merge_note(info),
                ),
                ("exported from", f"`{info.get('source')}` ({info.get('source_kind')})"),
                (
                    "weights",
                    f"{info.get('dtype')}, {info.get('tensors')} tensors in {len(info.get('shards') or [])} "
                    f"safetensors shard(s), {info.get('total_bytes', 0) / 1e9:.3f} GB",
                ),
                ("prompt", f"`{train_config.get('prompt', '')}`"),
                ("crops per image", str(train_config.get("num_crops", "n/a"))),
                ("stop tokens", f"{info.get('end_token_ids')} (`<|end|>`, `<|endoftext|>`)"),
                ("training data", f"`{train_config.get('data', 'n/a')}`"),
                ("exported", f"{info.get('created')} with phi3v {info.get('phi3v_version')}"),
            )
        ),
        "",
        "## Training",
        "",
    ]
    if summary is not None:
        loss = summary.get("train_loss")
        params = summary.get("parameters") or {}
        loss_text = f"{loss:.4f}" if isinstance(loss, int | float) else "n/a"
        lines.append(
            f"- {summary.get('global_step')} optimiser steps, {float(summary.get('epochs') or 0):.2f} epochs, "
            f"final training loss {loss_text}"
        )
        if params:
            lines.append(f"- {params.get('trainable', 0):,} of {params.get('total', 0):,} parameters trained")
        lines.append(
            f"- run time {float(summary.get('runtime_seconds') or 0):.0f} s on {summary.get('world_size', 1)} "
            "process(es)"
        )
        if summary.get("best_checkpoint"):
            lines.append(f"- best checkpoint `{summary['best_checkpoint']}` (metric {summary.get('best_metric')})")
        if "checkpoint-" in str(info.get("source")):
            lines.append("- exported from a checkpoint: this summary describes the whole run, not the checkpoint")
    else:
        lines.append("No training_summary.json was found with the run.")
    lines += ["", "## Evaluation", ""]
    if metrics is None:
        lines.append(
            "No evaluation metrics were found (no `--metrics` given and no `eval/metrics.json` in the run folder). "
            f"Score the export with `phi3v evaluate --model {out_name} --data DATA --out {out_name}-eval`."
        )
    else:
        lines += _metrics_section(metrics)
    lines += [
        "",
        "## Usage",
        "",
        "```bash",
        f"phi3v predict --model {out_name} photo.jpg photos/ https://example.com/shirt.jpg --out predictions.jsonl",
        f"phi3v evaluate --model {out_name} --data data/catalog --out {out_name}-eval",
        "```",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from phi3v import Phi3VForCausalLM, Phi3VProcessor",
        "",
        f'model = Phi3VForCausalLM.from_pretrained("{out_name}", dtype=torch.bfloat16, device="cuda")',
        f'processor = Phi3VProcessor.from_pretrained("{out_name}")',
        "prompt = processor.apply_chat_template(",
        f'    [{{"role": "user", "content": {json.dumps(train_config.get("prompt", ""))}}}], '
        "add_generation_prompt=True",
        ")",
        'inputs = processor(prompt, images=[Image.open("photo.jpg")], padding_side="left").to("cuda")',
        "out = model.generate(**inputs, max_new_tokens=64, do_sample=False)  # stops at <|end|> "
        "(generation_config.json)",
        'print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])',
        "```",
        "",
        "The weights use the official Phi-3-V tensor names and shard layout (`model.safetensors.index.json`), so the "
        "folder also loads in tools that read the official checkpoints once the remote-code `*.py` files are added.",
        "",
    ]
    return "\n".join(lines)


def _metrics_section(metrics: dict[str, Any]) -> list[str]:
    scores = metrics.get("metrics") or {}
    counts = metrics.get("counts") or {}
    lines = [
        f"`phi3v evaluate` of `{metrics.get('model')}` on split `{metrics.get('split')}` of `{metrics.get('data')}`: "
        f"{counts.get('scored', scores.get('n', '?'))} of {counts.get('rows', '?')} rows scored"
        + (" (constrained decoding)" if (metrics.get("decoding") or {}).get("constrained") else "")
        + ".",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, (label, kind) in CARD_METRICS.items():
        if key in scores:
            lines.append(f"| {label} | {_format_metric(scores[key], kind)} |")
    if "price_coverage" in scores:
        lines += [
            "",
            "The price scores cover every row: a row without a price is scored as a predicted price of 0 (APE 100 %, "
            "SMAPE 200 %).",
        ]
    baselines = metrics.get("baselines") or {}
    if baselines:
        lines += ["", "Baselines on the same rows:", ""]
        for name, baseline in baselines.items():
            values = baseline.get("metrics") or {}
            keys = dict.fromkeys(
                [baseline.get("metric"), "price_ape_median", "price_smape", "category_accuracy", "title_similarity"]
            )
            shown = [
                f"{CARD_METRICS[key][0]} {_format_metric(values[key], CARD_METRICS[key][1])}"
                for key in keys
                if key in CARD_METRICS and key in values
            ]
            lines.append(f"- {name} ({baseline.get('description', '')}): " + ", ".join(shown))
    ablation = metrics.get("ablation")
    if ablation:
        verdict = "uses the image" if ablation.get("uses_image") else "does NOT use the image"
        lines += [
            "",
            f"With blank images in place of the photos, {100 * float(ablation.get('answers_changed') or 0):.0f} % of "
            f"the answers change: the model {verdict}.",
        ]
    return lines
