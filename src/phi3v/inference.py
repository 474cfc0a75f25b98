"""Load a Phi-3-V model for answering: what `phi3v evaluate` (and `phi3v predict`) accept as ``--model``.

- A `phi3v train` output or one of its ``checkpoint-N`` folders holding a LoRA adapter (``adapter_config.json``):
  the base model named in the adapter (or ``--base-model``) is loaded and the adapter merged into it. The adapter of
  a ``qlora`` run was trained against the NF4-quantized LM, so by default (``qlora_base="nf4"``) its base's LM
  linear weights are first replaced by their NF4 round trip (`phi3v.quantization.round_trip_lm_weights`: the same
  codes, dequantized), which makes the merged model compute what the adapter computed in training, in full
  precision; ``qlora_base="original"`` merges into the original weights instead (they differ by the quantization
  error; docs/train.md, "QLoRA", has the measured difference). The NF4 base needs bitsandbytes.
- A folder with full weights (``config.json`` + safetensors): a full / frozen-vision training output, a checkpoint, a
  `phi3v export` folder (marked by its ``export_info.json``), or a base model (zero-shot).
- A hub id such as ``microsoft/Phi-3.5-vision-instruct`` (zero-shot); offline, that fails at once with the reason.
- A run folder without a final model (an interrupted run): its latest complete ``checkpoint-N``, with a log line
  naming it (`phi3v.runs.resolve_model_folder_of_run`; a partial checkpoint is never used, an ambiguous folder is
  an error listing its checkpoints or model folders).

The processor comes from the same folder when it holds one (training outputs and checkpoints do), else from the base
model. A training run's ``train_config.yaml`` (next to the weights, or one folder up for a checkpoint) gives the
prompt and answer template the model learned.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml
from torch import nn

if TYPE_CHECKING:
    from phi3v.metrics import AnswerTemplate

logger = logging.getLogger(__name__)

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer.model")
TRAIN_CONFIG_NAME = "train_config.yaml"
EXPORT_INFO_NAME = "export_info.json"  # written by `phi3v export` (phi3v.export)


class ModelLoadError(ValueError):
    """A ``--model`` that cannot be loaded; the message says what was found and what is expected."""


@dataclass
class LoadedModel:
    """A model ready for `generate`, its processor and where it came from.

    Attributes:
        model: `Phi3VForCausalLM` in eval mode (adapters merged).
        processor: Its `Phi3VProcessor`.
        kind: ``adapter`` (LoRA merged into its base), ``full`` (trained full weights), ``exported`` (a
            `phi3v export` folder) or ``base`` (zero-shot).
        source: The ``--model`` argument.
        base: The base model of an adapter, or the one an export was made from (None otherwise).
        train_config: The training run's resolved config (None when the folder is not a training output).
        device: Where the weights are.
        dtype: Their dtype.
        overrides: Trained settings replaced at the caller's request (``--override-trained``): name ->
            ``{"trained": ..., "used": ...}``; empty when the model answers as it was trained.
        qlora_base: For a ``qlora`` adapter, the base weights it was merged into: ``nf4`` (the NF4 round trip the
            adapter was trained against) or ``original``; None for anything else.
    """

    model: nn.Module
    processor: Any
    kind: Literal["adapter", "full", "exported", "base"]
    source: str
    base: str | None
    train_config: dict[str, Any] | None
    device: torch.device
    dtype: torch.dtype
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    qlora_base: Literal["nf4", "original"] | None = None

    def prompt(self, override: str | None = None) -> str:
        """The user turn to answer with: ``override``, else the one the model was trained with, else phi3v's."""
        from phi3v.metrics import DEFAULT_PROMPT

        return override or (self.train_config or {}).get("prompt") or DEFAULT_PROMPT

    def answer_template(self, override: str | None = None) -> AnswerTemplate:
        """The answer template: ``override``, else the one the model was trained with, else phi3v's."""
        from phi3v.metrics import DEFAULT_ANSWER_TEMPLATE, AnswerTemplate

        return AnswerTemplate(override or (self.train_config or {}).get("answer_template") or DEFAULT_ANSWER_TEMPLATE)


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else the first CUDA GPU when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it, else float32; or a name (``bfloat16``, ``float16``,
    ``float32``)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ModelLoadError(f"dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
    return getattr(torch, dtype)


def read_train_config(folder: Path) -> dict[str, Any] | None:
    """The ``train_config.yaml`` of a training output (or of the run holding a checkpoint folder)."""
    for candidate in (folder / TRAIN_CONFIG_NAME, folder.parent / TRAIN_CONFIG_NAME):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text(encoding="utf-8")) or {}
    return None


def _export_info(folder: Path) -> dict[str, Any] | None:
    """The ``export_info.json`` of a `phi3v export` folder (None for any other folder)."""
    path = folder / EXPORT_INFO_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from err
    return info if isinstance(info, dict) else None


def _adapter_base(folder: Path, train_config: dict[str, Any] | None) -> str:
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path") or (train_config or {}).get("model")
    if not base:
        raise ModelLoadError(f"{folder}: the adapter does not name its base model; pass --base-model")
    return str(base)


def check_trained_settings(
    source: str, train_config: dict[str, Any] | None, given: dict[str, Any], override_trained: bool
) -> dict[str, dict[str, Any]]:
    """The settings in ``given`` (num_crops, prompt, answer_template; None = not given) that differ from the ones
    the model was trained with (its ``train_config.yaml``).

    Raises:
        ModelLoadError: One differs and ``override_trained`` is off: a model answers best with its own settings,
            and a report made with others would not be the trained model's.
    """
    if not train_config:
        return {}
    changed = {
        name: {"trained": train_config[name], "used": value}
        for name, value in given.items()
        if value is not None and name in train_config and train_config[name] != value
    }
    if changed and not override_trained:
        details = "; ".join(f"{name} {c['used']!r} (trained: {c['trained']!r})" for name, c in changed.items())
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise ModelLoadError(
            f"{source} was trained with other settings than asked: {details}. Leave out {flags} to use the trained "
            "ones, or pass --override-trained to answer with yours (the report and metrics.json then say so)"
        )
    for name, c in changed.items():
        logger.warning(
            "%s: using %s %r instead of the trained %r (--override-trained)", source, name, c["used"], c["trained"]
        )
    return changed


def load_for_inference(
    model: str,
    *,
    base_model: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    num_crops: int | None = None,
    prompt: str | None = None,
    answer_template: str | None = None,
    override_trained: bool = False,
    qlora_base: Literal["nf4", "original"] = "nf4",
) -> LoadedModel:
    """Load ``model`` (see the module docstring for what it may be) for generation.

    Args:
        model: A training output, checkpoint, exported or base model folder, or a hub id (a run folder without a
            final model stands for its latest complete checkpoint; `LoadedModel.source` is then that checkpoint).
        base_model: The base of a LoRA adapter, overriding the one the adapter names (e.g. the run moved machines).
        device: ``cuda``, ``cuda:1``, ``cpu``...; default: a GPU when present.
        dtype: ``auto`` (bfloat16 on a GPU, float32 on CPU), ``bfloat16``, ``float16`` or ``float32``.
        num_crops: Override the processor's crops per image (4 for Phi-3.5-V, 16 for Phi-3-V).
        prompt / answer_template: The ones the caller will answer with (checked here against the trained ones).
        override_trained: Allow ``num_crops`` / ``prompt`` / ``answer_template`` other than the trained ones
            (`check_trained_settings`; recorded in `LoadedModel.overrides`).
        qlora_base: What a ``qlora`` run's adapter is merged into: ``nf4`` (default: the base's LM linear weights
            quantized to NF4 as in training and dequantized) or ``original`` (the base as stored). Other adapters
            and full weights ignore it.

    Raises:
        ModelLoadError: A folder that holds neither an adapter nor a model (nor, for a run folder, one complete
            checkpoint that stands for it), an adapter without a known base or stored as a pickle
            (``adapter_model.bin``: safetensors only), settings that differ from the trained ones without
            ``override_trained``, a bad ``qlora_base``, or a ``qlora`` adapter on the ``nf4`` base without
            bitsandbytes.
        FileNotFoundError / OSError: A path that does not exist, or a hub id that cannot be fetched (offline).
    """
    from phi3v.model.hub import resolve_model_folder
    from phi3v.model.modeling import Phi3VForCausalLM
    from phi3v.model.processing import Phi3VProcessor
    from phi3v.runs import RunFolderError, resolve_model_folder_of_run

    if qlora_base not in ("nf4", "original"):
        raise ModelLoadError(f"qlora_base must be nf4 or original, got {qlora_base!r}")
    try:
        model = resolve_model_folder_of_run(model)  # an interrupted run: its latest complete checkpoint
    except RunFolderError as err:
        raise ModelLoadError(str(err)) from err
    target = pick_device(device)
    weights_dtype = pick_dtype(dtype, target)
    merged_into: Literal["nf4", "original"] | None = None
    path = Path(model)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from peft import PeftModel

        if not (path / "adapter_model.safetensors").is_file():
            found = (
                "adapter_model.bin (a pickle, which phi3v never loads)"
                if (path / "adapter_model.bin").exists()
                else "no adapter weights"
            )
            raise ModelLoadError(
                f"{path}: holds {found}; phi3v loads adapters from adapter_model.safetensors only (convert it with "
                "peft: load the adapter where you trust its source, then save_pretrained(safe_serialization=True))"
            )
        train_config = read_train_config(path)
        given = {"num_crops": num_crops, "prompt": prompt, "answer_template": answer_template}
        overrides = check_trained_settings(model, train_config, given, override_trained)
        base = base_model or _adapter_base(path, train_config)
        logger.info("loading base model %s for the adapter in %s", base, path)
        if (train_config or {}).get("mode") == "qlora":
            merged_into = qlora_base
        if merged_into == "nf4":
            network = _nf4_base(path, base, train_config or {}, weights_dtype, target)
        else:
            network = Phi3VForCausalLM.from_pretrained(base, dtype=weights_dtype, device=target)
        network = PeftModel.from_pretrained(network, str(path)).merge_and_unload()
        kind: Literal["adapter", "full", "exported", "base"] = "adapter"
        has_processor = any((path / name).is_file() for name in PROCESSOR_FILES)
        processor_folder = path if has_processor else resolve_model_folder(base)
    else:
        folder = resolve_model_folder(model)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"{model}: not a model folder (no config.json, no adapter_config.json); expected a phi3v train output, "
                "a checkpoint-N folder, an exported model or a base model such as microsoft/Phi-3.5-vision-instruct"
            )
        train_config = read_train_config(folder)
        given = {"num_crops": num_crops, "prompt": prompt, "answer_template": answer_template}
        overrides = check_trained_settings(model, train_config, given, override_trained)
        export_info = _export_info(folder)
        base = export_info.get("base_model") if export_info is not None else None
        network = Phi3VForCausalLM.from_pretrained(folder, dtype=weights_dtype, device=target)
        if export_info is not None:
            kind = "exported"
        else:
            kind = "full" if train_config is not None else "base"
        processor_folder = folder
    options = {"num_crops": num_crops} if num_crops is not None else {}
    processor = Phi3VProcessor.from_pretrained(processor_folder, **options)
    network.eval()
    network.config.use_cache = True
    return LoadedModel(
        network, processor, kind, model, base, train_config, target, weights_dtype, overrides, merged_into
    )


def _nf4_base(
    adapter: Path, base: str, train_config: dict[str, Any], dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """The base of a ``qlora`` adapter as it trained: loaded in the dtype training quantized from (the run's
    ``model_dtype``, or for ``auto`` the checkpoint's own, as `phi3v.train` picks it), the LM linear weights
    replaced by their NF4 round trip, then cast to ``dtype``."""
    from phi3v.model.modeling import Phi3VForCausalLM
    from phi3v.quantization import checkpoint_dtype, import_bitsandbytes, round_trip_lm_weights

    try:
        import_bitsandbytes(f"{adapter}: a qlora adapter merged into its NF4 base (the weights it trained against)")
    except ImportError as err:
        raise ModelLoadError(
            f"{err}; or pass --qlora-base original to merge it into the original weights (which differ from "
            "the trained ones by the quantization error)"
        ) from err
    trained_dtype = train_config.get("model_dtype")
    source_dtype = getattr(torch, trained_dtype) if trained_dtype not in (None, "auto") else checkpoint_dtype(base)
    network = Phi3VForCausalLM.from_pretrained(base, dtype=source_dtype, device=device)
    layers = round_trip_lm_weights(network)
    logger.info("qlora adapter: %d LM linear layers of %s replaced by their NF4 round trip", layers, base)
    return network.to(dtype)
