"""`phi3v train`: fine-tune Phi-3-Vision on a `phi3v prepare` dataset with the transformers Trainer.

    phi3v train --config configs/burberry-lora.yaml --learning_rate 1e-4 --report_to wandb
    torchrun --nproc_per_node 8 -m phi3v.cli train --config configs/burberry-full.yaml

Steps, top to bottom (`train`):

1. Load and validate the config (`TrainConfig`: phi3v keys, ``lora:`` block, ``training:`` = any
   `transformers.TrainingArguments` option); refuse a run that cannot work (QLoRA without bitsandbytes, FSDP1 on
   CPU processes, an output folder holding another run) before loading anything. FSDP2 on CPU processes runs
   (accelerate's FSDP2 path, which accelerate itself would replace by DDP: `Phi3VTrainer`).
2. Open the prepared dataset (`phi3v.data.collate.load_prepared_dataset`) and compute every row's token count from
   the JPEG headers, for length-grouped batches, token budgets (``max_tokens_per_batch``) and packing (``packing``:
   each batch one padding-free row, `phi3v.data.packing`); a budget below the longest row or a ``max_length`` that
   would cut a packed sample fails here, naming the row.
3. Load the processor and the model, then apply the mode: ``lora`` (peft LoRA on the LM's attention and MLP,
   optionally the CLIP tower; optionally the projector fully trained), ``qlora`` (the same on a 4-bit NF4 LM,
   bitsandbytes, quantized on the GPU or on the CPU without one: `phi3v.quantization`), ``full``, ``freeze_vision``
   (LM + projector).
4. Train with `Phi3VTrainer`: per-component learning rates, a non-finite loss stops the run, padding ratio and
   throughput logged, a generation check on a fixed validation subset at each evaluation (price scored over every
   answer, a missing price counted as an error of 100 %; category; title; a `wandb.Table` of image, truth and
   prediction), checkpoints marked complete only once fully
   written (resume never picks a partial one).
5. Save the adapter or model, the processor, the resolved config and ``training_summary.json``.

Resuming (``--resume``) continues from the latest complete checkpoint: weights, optimizer, scheduler, RNG states
and data position are restored by the Trainer, so the run reaches the same steps and losses as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
import yaml
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from phi3v.config import ConfigError, config_to_dict, load_config
from phi3v.data.collate import EVAL_SPLIT, TRAIN_SPLIT, Phi3VCollator, load_prepared_dataset, sequence_lengths
from phi3v.data.packing import TokenBudgetBatchSampler
from phi3v.generation import generate_answers
from phi3v.metrics import DEFAULT_ANSWER_TEMPLATE, DEFAULT_PROMPT, AnswerTemplate, sample_scores, score_predictions
from phi3v.model.packed import varlen_available
from phi3v.progress import attach_to_trainer
from phi3v.runs import CHECKPOINT_PREFIX, COMPLETE_MARKER, partial_checkpoints
from phi3v.runs import complete_checkpoints as _complete_checkpoints
from phi3v.tracking import finish_wandb, restore_env, setup_wandb_env, snapshot_env

logger = logging.getLogger(__name__)

CONFIG_NAME = "train_config.yaml"
SUMMARY_NAME = "training_summary.json"
GENERATIONS_DIR = "generations"

# LoRA targets (full-match regexes on module names; reference §2 for the names)
LM_LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"
VISION_LORA_TARGETS = (
    r"model\.vision_embed_tokens\.img_processor\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)"
    r"|mlp\.(fc1|fc2))"
)
VISION_PARAM = "img_processor."  # CLIP tower parameters
PROJECTOR_PARAMS = ("img_projection.", "glb_GN", "sub_GN")  # projector MLP + learned separators

# phi3v's defaults for TrainingArguments (a config's ``training:`` block overrides any of them)
TRAINING_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "num_train_epochs": 1,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "logging_steps": 10,
    "eval_strategy": "steps",
    "eval_steps": 100,
    "save_strategy": "steps",
    "save_steps": 100,
    "train_sampling_strategy": "group_by_length",
    "dataloader_num_workers": 2,
    "report_to": "none",
    "seed": 0,
    # every trainable parameter takes part in every step (each sample has a photo, LoRA adapts every layer): DDP
    # need not search the graph for unused ones. transformers would turn the search on for a PeftModel.
    "ddp_find_unused_parameters": False,
}
# TrainingArguments phi3v sets itself: the collator needs every column, the model's labels key is fixed
FORCED_TRAINING = {"remove_unused_columns": False, "label_names": ["labels"]}


class TrainingError(RuntimeError):
    """A training run that cannot start or cannot go on; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------------- config
@dataclass
class LoraSettings:
    """LoRA adapter settings (``lora:`` block). ``vision`` adds adapters to the CLIP tower's attention and MLP;
    ``projector`` trains the image projector and the ``glb_GN`` / ``sub_GN`` separators fully (saved with the
    adapter)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    vision: bool = False
    projector: bool = False

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ValueError(f"lora.r and lora.alpha must be >= 1, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    """Everything a `phi3v train` run needs; YAML keys are the field names.

    Attributes:
        model: Model folder or hub id (``microsoft/Phi-3.5-vision-instruct``).
        data: Output folder of `phi3v prepare`.
        output_dir: Run folder: checkpoints, final weights, logs, W&B and TensorBoard runs.
        mode: ``lora`` (default), ``qlora``, ``full`` or ``freeze_vision``.
        prompt: User turn; holds one ``<|image_1|>`` tag and no catalog field (the model sees only the photo).
        answer_template: Target answer over ``{title}``, ``{category}``, ``{price}``.
        num_crops: HD crops per image (4 for Phi-3.5-V, 16 for Phi-3-V).
        max_length: Truncate samples to this many tokens (None: no truncation).
        model_dtype: Weights' dtype: ``auto`` = bfloat16 for (q)lora with ``bf16``, else float32 (mixed precision
            keeps fp32 master weights); ``bfloat16`` / ``float32`` to choose.
        attn_implementation: ``sdpa`` (default), ``eager``, ``flash_attention_2`` or ``varlen`` (SDPA, with packed
            rows through torch's variable-length flash kernels on CUDA in bf16, SDPA sample by sample elsewhere).
            With ``packing``, ``sdpa`` becomes ``varlen``.
        packing: Train on padding-free batches: each batch's samples concatenated into one row, positions, longrope
            factor and attention per sample (exact; `phi3v.model.packed`). Evaluation loss batches are packed too;
            generation never is.
        max_tokens_per_batch: Fill each training batch up to this many tokens (summed when packed, count x longest
            when padded) instead of ``per_device_train_batch_size`` rows; None: fixed batch size.
        lora: `LoraSettings`.
        vision_lr / projector_lr: Learning rates of the CLIP tower / the projector (None: ``learning_rate``).
        eval_samples: Validation rows of the generation check at each evaluation (0: off).
        eval_max_new_tokens: Token budget of those answers.
        wandb_project: W&B project (``WANDB_PROJECT`` wins when set).
        wandb_log_model: ``false``, ``end`` or ``checkpoint``: upload the model as a W&B artifact.
        save_total_limit: Keep this many complete checkpoints (and always the best); None keeps all.
        training: `transformers.TrainingArguments` options (`TRAINING_DEFAULTS` fill the gaps).
    """

    model: str
    data: str
    output_dir: str
    mode: Literal["lora", "qlora", "full", "freeze_vision"] = "lora"
    prompt: str = DEFAULT_PROMPT
    answer_template: str = DEFAULT_ANSWER_TEMPLATE
    num_crops: int = 4
    max_length: int | None = None
    model_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "varlen"] = "sdpa"
    packing: bool = False
    max_tokens_per_batch: int | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    vision_lr: float | None = None
    projector_lr: float | None = None
    eval_samples: int = 16
    eval_max_new_tokens: int = 64
    wandb_project: str = "phi3v"
    wandb_log_model: Literal["false", "end", "checkpoint"] = "false"
    save_total_limit: int | None = None
    training: dict[str, Any] = field(default_factory=dict, metadata={"passthrough": TrainingArguments})

    def __post_init__(self) -> None:
        from phi3v.model.processing import IMAGE_TAG_PATTERN

        if len(IMAGE_TAG_PATTERN.findall(self.prompt)) != 1 or "<|image_1|>" not in self.prompt:
            raise ValueError(f"prompt must hold exactly one <|image_1|> tag, got {self.prompt!r}")
        if re.search(r"\{(title|category|price)[^}]*\}", self.prompt):
            raise ValueError(f"prompt {self.prompt!r} names a catalog field: the model must read it from the photo")
        AnswerTemplate(self.answer_template)  # raises on a bad template
        if self.num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {self.num_crops}")
        if self.max_length is not None and self.max_length < 16:
            raise ValueError(f"max_length must be >= 16 (or null), got {self.max_length}")
        if self.packing and self.attn_implementation == "eager":
            raise ValueError(
                "packing: true needs an attention that keeps the packed samples apart; eager has no packed path in "
                "phi3v: use attn_implementation sdpa (exact block-diagonal mask, any device) or varlen (CUDA)"
            )
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 16:
            raise ValueError(f"max_tokens_per_batch must be >= 16 (or null), got {self.max_tokens_per_batch}")
        if self.eval_samples < 0 or self.eval_max_new_tokens < 1:
            raise ValueError("eval_samples must be >= 0 and eval_max_new_tokens >= 1")
        for key in ("vision_lr", "projector_lr"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        for key, value in FORCED_TRAINING.items():
            if key in self.training and self.training[key] != value:
                raise ValueError(f"training.{key} is set by phi3v ({value!r}); remove it from the config")
        if "output_dir" in self.training:
            raise ValueError("set output_dir at the top level of the config, not under training:")
        if "save_total_limit" in self.training:
            raise ValueError("set save_total_limit at the top level (phi3v rotates only complete checkpoints)")

    def training_arguments(self) -> TrainingArguments:
        """The `TrainingArguments` of this run: `TRAINING_DEFAULTS`, then ``training:``, then what phi3v forces."""
        options = {**TRAINING_DEFAULTS, **self.training, **FORCED_TRAINING, "output_dir": self.output_dir}
        options.setdefault("dataloader_pin_memory", torch.cuda.is_available())
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            options.setdefault("use_cpu", True)  # else each CPU process (gloo) takes itself for the only one
        if options.get("eval_strategy") == "no":
            options.pop("eval_steps", None)
        try:
            return TrainingArguments(**options)
        except (ImportError, TypeError, ValueError) as err:  # ImportError: e.g. --deepspeed without deepspeed
            raise ConfigError(f"training: {err}") from err


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """`TrainConfig` from a YAML file and ``--key value`` overrides; ConfigError on any bad key or value."""
    config = load_config(TrainConfig, path, overrides)
    config.training_arguments()  # TrainingArguments' own checks (strategy combinations, ...) fail now, not later
    return config


# ------------------------------------------------------------------------------------------------------- checks
def _preflight(config: TrainConfig, args: TrainingArguments) -> None:
    """Refuse runs that cannot work, before any weights load."""
    if config.mode == "qlora":  # NF4 on the GPU, or on the CPU without one (bitsandbytes >= 0.50)
        from packaging.version import Version

        from phi3v.quantization import CPU_BITSANDBYTES, import_bitsandbytes

        try:
            bnb = import_bitsandbytes("mode qlora (the LM quantized to 4-bit NF4)")
        except ImportError as err:
            raise TrainingError(f"{err}; or use mode lora (the same adapters on full-precision weights)") from err
        on_cpu = args.use_cpu or not torch.cuda.is_available()
        if on_cpu and Version(bnb.__version__) < Version(CPU_BITSANDBYTES):
            raise TrainingError(
                f"mode qlora on the CPU needs bitsandbytes >= {CPU_BITSANDBYTES} (4-bit NF4 on CPU), found "
                f"{bnb.__version__}: pip install 'phi3v[qlora]'"
            )
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and not args.use_cpu and local_processes > torch.cuda.device_count():
        raise TrainingError(
            f"{local_processes} processes per node but {torch.cuda.device_count()} visible GPU(s): each process "
            "needs a GPU of its own (NCCL refuses two ranks on one GPU). Set --nproc_per_node to the GPU count."
        )
    if _fsdp_requested(args) and not torch.cuda.is_available():
        version = (args.fsdp_config or {}).get("version") or os.environ.get("FSDP_VERSION") or 2
        if int(version) != 2:
            raise TrainingError("FSDP on CPU processes needs FSDP2 (fsdp_version: 2); FSDP1 needs CUDA devices")


def _rank0_loading(args: TrainingArguments) -> bool:
    """FSDP with ``cpu_ram_efficient_loading``: only rank 0 reads the checkpoint, the others build on meta."""
    return _fsdp_requested(args) and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("1", "true")


def _fsdp_requested(args: TrainingArguments) -> bool:
    """FSDP asked for by ``training.fsdp`` or by `accelerate launch` with an FSDP config."""
    return bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder (partial ones, e.g. from a crash mid-save, are skipped)."""
    output_dir = Path(output_dir)
    complete = _complete_checkpoints(output_dir)
    for path in partial_checkpoints(output_dir):
        logger.warning("%s is incomplete (no %s): not resuming from it", path, COMPLETE_MARKER)
    return complete[-1] if complete else None


# The keys that must match for a resumed run to continue the same training
_RESUME_KEYS = (
    "model",
    "data",
    "mode",
    "prompt",
    "answer_template",
    "num_crops",
    "max_length",
    "model_dtype",
    "lora",
    "packing",
    "max_tokens_per_batch",
    "vision_lr",
    "projector_lr",
    "attn_implementation",
)
# TrainingArguments that change the trajectory (schedule, batches, data order, precision): refused on --resume when
# they differ. The others (logging, evaluation / save cadence, trackers, workers) may change, and so may max_steps /
# num_train_epochs: extending or shortening a run is what a resume is often for.
_RESUME_TRAINING_KEYS = (
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "optim_args",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "data_seed",
    "train_sampling_strategy",
    "group_by_length",
    "bf16",
    "fp16",
    "tf32",
)


def _check_lengths(config: TrainConfig, lengths: list[int]) -> None:
    """Packing never truncates: a ``max_length`` shorter than a row is an error naming the row."""
    if config.packing and config.max_length is not None:
        too_long = [i for i, n in enumerate(lengths) if n > config.max_length]
        if too_long:
            raise TrainingError(
                f"packing with max_length={config.max_length} would cut {len(too_long)} train row(s), the first "
                f"row {too_long[0]} with {lengths[too_long[0]]} tokens; packed samples are never truncated: raise "
                f"max_length to at least {max(lengths)} or set it to null"
            )


def _budget_sampler(config: TrainConfig, args: TrainingArguments, lengths: list[int]) -> TokenBudgetBatchSampler:
    try:
        return TokenBudgetBatchSampler(
            lengths,
            config.max_tokens_per_batch,
            packed=config.packing,
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )
    except ValueError as err:
        raise TrainingError(str(err)) from err


def attention_for_run(config: TrainConfig, args: TrainingArguments) -> str:
    """The attention implementation the model loads with: a packed run's ``sdpa`` becomes ``varlen`` (torch's
    varlen flash kernels on CUDA in half precision, SDPA sample by sample elsewhere; unpacked calls stay SDPA)."""
    if config.packing and config.attn_implementation == "sdpa":
        half = args.bf16 or args.fp16 or _model_dtype(config, args) != torch.float32
        kernels = "torch's variable-length flash kernels" if half and not args.use_cpu and varlen_available() else None
        logger.info("packing: packed rows use %s (attn varlen)", kernels or "SDPA sample by sample")
        return "varlen"
    return config.attn_implementation


def _check_output_dir(config: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuse to mix two runs in one folder."""
    output_dir = Path(config.output_dir)
    saved_config = output_dir / CONFIG_NAME
    if not resume:
        if saved_config.exists() or any(output_dir.glob(f"{CHECKPOINT_PREFIX}*")):
            raise TrainingError(
                f"{output_dir} holds an earlier run: pass --resume to continue it, or choose another output_dir"
            )
        return None
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        raise TrainingError(f"--resume: {output_dir} has no complete checkpoint to resume from")
    if saved_config.is_file():
        before = yaml.safe_load(saved_config.read_text(encoding="utf-8")) or {}
        now = config_to_dict(config)
        changed = [key for key in _RESUME_KEYS if before.get(key) != now.get(key)]
        trained = {**TRAINING_DEFAULTS, **(before.get("training") or {})}
        asked = {**TRAINING_DEFAULTS, **(now.get("training") or {})}
        changed += [f"training.{key}" for key in _RESUME_TRAINING_KEYS if trained.get(key) != asked.get(key)]
        if changed:
            raise TrainingError(
                f"--resume: the config differs from the run in {output_dir} in {', '.join(changed)}; "
                "a resumed run must train the same model on the same data along the same trajectory (start a new "
                "run to change them)"
            )
    return checkpoint


# ------------------------------------------------------------------------------------------------------- model
def _model_dtype(config: TrainConfig, args: TrainingArguments) -> torch.dtype:
    if config.model_dtype != "auto":
        return getattr(torch, config.model_dtype)
    if config.mode == "qlora":
        from phi3v.quantization import checkpoint_dtype

        # the NF4 codes come from the weights as stored (bf16 for the hub models), the compute dtype too; the rest is
        # upcast to fp32 (`prepare_model_for_kbit_training`). `phi3v.inference` recomputes the same codes for a merge.
        return checkpoint_dtype(config.model)
    if config.mode == "lora" and args.bf16:
        return torch.bfloat16  # frozen base weights in bf16; every trained tensor is made fp32 (`_apply_lora`)
    return torch.float32  # trained weights: fp32 master copy, bf16 autocast when args.bf16


def _quantize_lm_4bit(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Replace the LM decoder's linear layers by frozen bitsandbytes NF4 ``Linear4bit`` (QLoRA), quantized on
    ``device`` (a GPU, or the CPU). The other weights stay as loaded; `prepare_model_for_kbit_training` (in
    `_apply_lora`) then upcasts them to float32."""
    from phi3v.quantization import lm_linear_layers, nf4_linear

    replaced = 0
    for parent, name, child in list(lm_linear_layers(model)):
        setattr(parent, name, nf4_linear(child, compute_dtype, device))
        replaced += 1
    model.is_loaded_in_4bit = True  # peft: wrap Linear4bit layers with its bnb LoRA layers
    logger.info("qlora: %d LM linear layers quantized to NF4 on %s (compute dtype %s)", replaced, device, compute_dtype)


def _untouched_cpu_parameters(model: nn.Module) -> None:
    """Give meta parameters uninitialised CPU storage (``torch.empty``): no values are read or written, so the
    pages are never touched and do not count in the process's resident memory, yet every parameter is a distinct
    tensor (accelerate maps the optimizer's parameters onto their FSDP2 shards by tensor identity, which meta
    tensors do not have). Buffers (rotary frequencies) are real already and are not broadcast, so they stay."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                module._parameters[name] = nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype), requires_grad=param.requires_grad
                )


def _set_trainable(model: nn.Module, mode: str) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = not (mode == "freeze_vision" and VISION_PARAM in name)


def _apply_lora(model: nn.Module, config: TrainConfig, gradient_checkpointing: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    targets = LM_LORA_TARGETS + (f"|{VISION_LORA_TARGETS}" if config.lora.vision else "")
    lora_config = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=f"({targets})",
        modules_to_save=["img_projection", "separators"] if config.lora.projector else None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_config)
    # the adapter names its base (a folder as an absolute path), so `phi3v evaluate` / `predict` find it
    base = Path(config.model)
    model.peft_config["default"].base_model_name_or_path = str(base.resolve()) if base.exists() else config.model
    for param in model.parameters():  # peft upcasts adapters, not modules_to_save copies: fp32 master weights
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def load_processor(config: TrainConfig) -> Any:
    from phi3v.model.processing import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(config.model, num_crops=config.num_crops)


def load_model_and_processor(
    config: TrainConfig, args: TrainingArguments, processor: Any | None = None
) -> tuple[nn.Module, Any]:
    """The processor and the model of a run, with the config's mode applied (trainable parameters set)."""
    from phi3v.model.modeling import Phi3VForCausalLM

    processor = processor if processor is not None else load_processor(config)
    dtype = _model_dtype(config, args)
    device = None
    if config.mode == "qlora":  # quantized where it trains: this process's GPU, else the CPU
        on_gpu = torch.cuda.is_available() and not args.use_cpu
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
    elif _rank0_loading(args) and args.process_index != 0:
        device = torch.device("meta")  # FSDP2 broadcasts rank 0's weights into the shards (`fsdp2_prepare_model`)
        logger.info("rank %d: model built on the meta device; its shard comes from rank 0", args.process_index)
    model = Phi3VForCausalLM.from_pretrained(
        config.model, dtype=dtype, device=device, attn_implementation=attention_for_run(config, args)
    )
    if device is not None and device.type == "meta":
        _untouched_cpu_parameters(model)
    if config.mode == "qlora":
        _quantize_lm_4bit(model, dtype, device)
    if config.mode in ("lora", "qlora"):
        for param in model.parameters():
            param.requires_grad = False
        model = _apply_lora(model, config, bool(args.gradient_checkpointing))
    else:
        _set_trainable(model, config.mode)
    model.config.use_cache = False  # training; generate() turns the cache on for the generation check
    return model, processor


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (4-bit weights count their logical size, from their quant state)."""
    trainable = total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)  # bitsandbytes Params4bit: packed codes, (out * in / 2, 1)
        n = quant_state.shape.numel() if quant_state is not None else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return {"trainable": trainable, "total": total}


def parameter_digest(model: nn.Module) -> str | None:
    """SHA-256 over every parameter's bytes (None when parameters are sharded, e.g. FSDP)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.data.__class__.__name__ == "DTensor":
            return None
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ generation check
class GenerationCheck:
    """Greedy answers on a fixed validation subset, generated, parsed and scored as `phi3v evaluate` does
    (`phi3v.generation.generate_answers`, `phi3v.metrics.score_predictions`).

    The subset is the same at every evaluation (first ``n`` rows of a seed-0 shuffle). Under several processes
    each rank answers its share (``synced_gpus``, so sharded models stay in step) and rank 0 gathers them.
    """

    # The scores logged as ``eval_gen_*`` (the evaluation report has them all). The price scores without a suffix
    # cover every answer, a missing price scored as 0 (APE 1, SMAPE 2): leaving a price out scores no better than a
    # price off by 100 % (SMAPE: than any price). ``price_ape_median_parsed`` is over the answers with a price only,
    # ``price_coverage`` their share.
    LOGGED = (
        "parse_rate",
        "price_coverage",
        "price_ape_median",
        "price_mape",
        "price_smape",
        "price_within_25",
        "price_ape_median_parsed",
        "category_accuracy",
        "category_macro_f1",
        "title_similarity",
        "title_exact_match",
    )

    def __init__(self, dataset: Any, n: int, prompt: str, answer_template: AnswerTemplate, max_new_tokens: int):
        order = list(range(len(dataset)))
        random.Random(0).shuffle(order)
        self.rows = [dataset[i] for i in sorted(order[:n])]
        self.prompt = prompt
        self.template = answer_template
        self.max_new_tokens = max_new_tokens

    def run(self, model: nn.Module, processor: Any, batch_size: int) -> list[dict[str, Any]]:
        """Records of ``index`` and ``prediction`` for this rank's share."""
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        share = list(range(rank, len(self.rows), world))
        per_rank = math.ceil(len(self.rows) / world)
        # equal generate calls on every rank: pad the share with its first row, answered once more and dropped
        positions = list(range(per_rank))
        index_of = [share[p] if p < len(share) else (share[0] if share else 0) for p in positions]
        generation = generate_answers(
            model,
            processor,
            self.prompt,
            positions,
            lambda p: self.rows[index_of[p]]["image"],
            sizes=None,  # keep the padded positions in the same batches on every rank
            batch_size=batch_size,
            max_new_tokens=self.max_new_tokens,
            synced_gpus=distributed,
        )
        return [
            {"index": index_of[p], "prediction": generation.answers.get(p, "")} for p in positions if p < len(share)
        ]

    def score(self, records: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The logged scores over all records and the records completed with truth and parsed fields, in subset
        order."""
        records = sorted(records, key=lambda r: r["index"])
        parsed = [self.template.parse(r["prediction"]) for r in records]
        truths = [self.rows[r["index"]] for r in records]
        scores = score_predictions(parsed, truths)
        for record, pred, truth in zip(records, parsed, truths, strict=True):
            per_sample = sample_scores(pred, truth)
            record.update(
                truth=self.template.format(truth),
                parsed_title=pred.title,
                parsed_category=pred.category,
                parsed_price=pred.price,
                true_price=float(truth["price"]),
                price_ape=per_sample["price_ape"],
                category_ok=per_sample["category_ok"],
                title_similarity=per_sample["title_similarity"],
            )
        return {key: scores[key] for key in self.LOGGED if key in scores}, records


# ------------------------------------------------------------------------------------------------------- trainer
class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite."""


class Phi3VTrainer(Trainer):
    """`transformers.Trainer` with phi3v's additions.

    - Per-component learning rates (CLIP tower / projector / LM), weight decay off for biases and norms.
    - A NaN/inf loss on any rank stops the run (`NonFiniteLossError`) before the optimizer applies it (under
      DeepSpeed, whose backward also steps, just after); the last complete checkpoint stays the latest.
    - Training logs gain ``padding_ratio`` (padded / real tokens: 1.0 means no padding, as when packed),
      ``images_per_second`` and ``tokens_per_second`` (real tokens, all ranks, evaluation time excluded),
      ``tokens_per_batch`` (real) and ``samples_per_batch`` (per rank and micro-batch).
    - With ``train_batch_sampler`` (token budgets), training batches come from it (accelerate deals them out to the
      ranks); its epoch is set at each epoch's start, so a resumed run sees the same batches.
    - Each evaluation adds the generation check's metrics (``eval_gen_*``), writes its answers to
      ``generations/step-N.jsonl`` and, with W&B, logs a ``wandb.Table`` of image, truth and prediction.
    - Checkpoints get a completion marker once fully written (all ranks); only complete ones are rotated
      (``save_total_limit``, best kept) or resumed from; a failed save (e.g. disk full) removes its partial folder.
    """

    def __init__(
        self,
        *args: Any,
        phi3v_config: TrainConfig,
        generation_check: GenerationCheck | None = None,
        train_batch_sampler: TokenBudgetBatchSampler | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.phi3v_config = phi3v_config
        self.generation_check = generation_check
        self.train_batch_sampler = train_batch_sampler
        if train_batch_sampler is not None:
            self.add_callback(_SamplerEpochCallback(train_batch_sampler))
        self.generations_name: str | None = None  # file name of the next generation check (default: step-N)
        self._reset_stats()

    # ---- engines
    def create_accelerator_and_postprocess(self) -> None:
        """accelerate selects FSDP only on accelerators (CUDA, XPU, ...): on CPU processes (gloo) it takes an FSDP
        plugin for plain DDP, silently. FSDP2 (``fully_shard``) itself runs on a CPU device mesh, so a CPU run that
        asks for it (``training.fsdp`` or `accelerate launch` with an FSDP config) gets accelerate's own FSDP2 path:
        sharded parameters, gradients and optimizer states, sharded checkpoints, a consolidated final save."""
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU or not _fsdp_requested(self.args):
            if self.args.world_size > 1 and state.distributed_type != DistributedType.DEEPSPEED:
                logger.info(
                    "%s over %d processes, find_unused_parameters=%s",
                    state.distributed_type.value,
                    self.args.world_size,
                    self.args.ddp_find_unused_parameters,
                )
            return
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = (
            FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            if self.args.fsdp_plugin_args is not None
            else FullyShardedDataParallelPlugin()  # from accelerate launch's FSDP_* environment
        )
        if self.accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(self.accelerator.mixed_precision)
        from accelerate.state import PartialState

        PartialState().distributed_type = DistributedType.FSDP  # each AcceleratorState() re-reads it from here
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True
        logger.info("FSDP2 on %d CPU processes (gloo)", self.args.world_size)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP2 every save (checkpoints and the final one) also writes the consolidated model in the official
        layout, whatever ``state_dict_type`` the sharded resume state uses: all ranks gather, rank 0 writes."""
        if self.is_fsdp_enabled and self.accelerator.is_fsdp2:
            state_dict = self.accelerator.get_state_dict(self.model)  # collective: full tensors on rank 0
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)
            return
        super().save_model(output_dir, _internal_call=_internal_call)

    # ---- optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        lm_lr = self.args.learning_rate
        rates = {
            "vision": self.phi3v_config.vision_lr if self.phi3v_config.vision_lr is not None else lm_lr,
            "projector": self.phi3v_config.projector_lr if self.phi3v_config.projector_lr is not None else lm_lr,
            "lm": lm_lr,
        }
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if VISION_PARAM in name:
                component = "vision"
            elif any(key in name for key in PROJECTOR_PARAMS):
                component = "projector"
            else:
                component = "lm"
            groups.setdefault((component, name in decay), []).append(param)
        param_groups = [
            {
                "params": params,
                "lr": rates[component],
                "weight_decay": self.args.weight_decay if decays else 0.0,
                "name": f"{component}{'' if decays else '_no_decay'}",
            }
            for (component, decays), params in sorted(groups.items())
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=lm_lr, **optimizer_kwargs)
        return self.optimizer

    # ---- batches
    def get_train_dataloader(self) -> Any:
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        from functools import partial

        from torch.utils.data import DataLoader
        from transformers.trainer_utils import seed_worker

        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.train_batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        return self.accelerator.prepare(loader)

    # ---- loss, non-finite guard, throughput
    def _reset_stats(self) -> None:
        self._images = 0
        self._samples = 0
        self._batches = 0
        self._real_tokens = 0
        self._padded_tokens = 0
        self._stats_start: float | None = None
        self._excluded_time = 0.0

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model.training:
            if self._stats_start is None:
                self._stats_start = time.perf_counter()
            if "cu_seq_lens" in inputs:  # packed: every token is real
                self._real_tokens += inputs["input_ids"].numel()
                self._padded_tokens += inputs["input_ids"].numel()
                self._samples += inputs["cu_seq_lens"].numel() - 1
            else:
                mask = inputs["attention_mask"]
                self._real_tokens += int(mask.sum())
                self._padded_tokens += mask.numel()
                self._samples += mask.shape[0]
            self._batches += 1
            self._images += int(inputs["image_sizes"].shape[0]) if "image_sizes" in inputs else 0
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)  # already backpropagated
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.args.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank stops together (no collective left hanging)
        if bad.item() > 0:
            last = latest_checkpoint(self.args.output_dir)
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at step {self.state.global_step + 1} "
                f"(epoch {self.state.epoch or 0:.2f}); the run stopped. "
                + (
                    f"The last good checkpoint is {last}: lower the learning rate and --resume, or restart."
                    if last is not None
                    else "No checkpoint was saved yet: lower the learning rate (or check the data) and restart."
                )
            )
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stats_start is not None:
            counts = torch.tensor(
                [self._images, self._real_tokens, self._padded_tokens, self._samples, self._batches],
                dtype=torch.float64,
            )
            if self.args.world_size > 1:
                import torch.distributed as dist

                counts = counts.to(self.args.device)
                dist.all_reduce(counts)
                counts = counts.cpu()
            images, real, padded, samples, batches = counts.tolist()
            elapsed = max(time.perf_counter() - self._stats_start - self._excluded_time, 1e-9)
            if real > 0:
                logs["padding_ratio"] = round(padded / real, 4)
                logs["tokens_per_batch"] = round(real / batches, 1)
                logs["samples_per_batch"] = round(samples / batches, 2)
                logs["images_per_second"] = round(images / elapsed, 3)
                logs["tokens_per_second"] = round(real / elapsed, 1)
            self._reset_stats()
        super().log(logs, start_time)

    # ---- evaluation with the generation check
    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if self._stats_start is not None:  # inside a measured window: keep evaluation out of the throughput
                self._excluded_time += time.perf_counter() - started

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self.generation_check is None or not self.generation_check.rows:
            return output
        records = self.generation_check.run(self.model, self.processing_class, self.args.per_device_eval_batch_size)
        if self.args.world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.args.world_size
            dist.all_gather_object(gathered, records)
            records = [record for part in gathered for record in part]
        metrics, records = self.generation_check.score(records)
        output.metrics.update({f"{prefix}_gen_{key}": value for key, value in metrics.items()})
        if self.args.should_save:
            self._write_generations(records)
        return output

    def _write_generations(self, records: list[dict[str, Any]]) -> None:
        folder = Path(self.args.output_dir) / GENERATIONS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        step = self.state.global_step
        name = self.generations_name or f"step-{step}"
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        try:
            import wandb
        except ImportError:
            return
        if "wandb" not in (self.args.report_to or []) or wandb.run is None:
            return
        table = wandb.Table(columns=["step", "image", "truth", "prediction", "price_ape", "category_ok"])
        for record in records:
            image = self.generation_check.rows[record["index"]]["image"].copy()
            image.thumbnail((256, 256))
            table.add_data(
                step,
                wandb.Image(image),
                record["truth"],
                record["prediction"],
                record["price_ape"],
                record["category_ok"],
            )
        wandb.log({"eval/generations": table, "train/global_step": step})

    # ---- resume
    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        """Train nothing when the run resumed from its own last step (killed after its last checkpoint, during the
        final evaluation or save): transformers' loop would take one step more, past ``max_steps``, before it
        checks the step count. Pinned transformers (constraints.txt); `tests/test_train.py` holds it to this."""
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            logger.info("resumed at step %d of %d: nothing left to train", self.state.global_step, self.state.max_steps)
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    # ---- checkpoints
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:  # OSError, torch.save's RuntimeError, SafetensorError...: the folder is partial
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            last = latest_checkpoint(run_dir)
            reason = _write_failure(err)
            raise TrainingError(
                f"saving {folder} failed: {reason}. The partial folder was removed; the latest complete checkpoint "
                f"is {last if last is not None else 'none'} (resume from it with --resume once there is space)."
            ) from err
        if self.args.world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank has written its part (optimizer shards, RNG states)
        if self.args.should_save:
            marker = {"step": self.state.global_step, "files": sorted(p.name for p in folder.iterdir())}
            tmp = folder / f".{COMPLETE_MARKER}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(marker, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / COMPLETE_MARKER)
            self._rotate_complete_checkpoints(run_dir)

    def _rotate_complete_checkpoints(self, run_dir: Path) -> None:
        limit = self.phi3v_config.save_total_limit
        if limit is None:
            return
        complete = _complete_checkpoints(run_dir)
        if not complete:
            return
        best = Path(self.state.best_model_checkpoint).resolve() if self.state.best_model_checkpoint else None
        protected = {complete[-1].resolve()} | ({best} if best is not None and best.exists() else set())
        excess = len(complete) - max(limit, len(protected))  # the newest and the best always stay
        for path in [p for p in complete if p.resolve() not in protected][: max(0, excess)]:
            logger.info("removing old checkpoint %s (save_total_limit=%d)", path, limit)
            shutil.rmtree(path, ignore_errors=True)


def _write_failure(err: BaseException) -> str:
    """A short reason for a failed write: "the disk is full" when it is, else the error itself."""
    if (
        getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        or "os error 28" in str(err)
        or "No space left" in str(err)
    ):
        return "the disk is full"
    return f"{type(err).__name__}: {err}"


def _whole_run_loss(state: Any, result: Any, resumed_from: Path | None) -> float | None:
    """The mean training loss over every step of the run, a resumed one included.

    transformers' ``training_loss`` after a resume averages only the steps since it. The steps before are in the
    restored log history: each logged ``loss`` is the mean over the steps since the previous log, so their sum is
    the logged losses weighted by those step counts (exact when the checkpoint step is a logged step, which it is
    whenever ``save_steps`` is a multiple of ``logging_steps``).
    """
    if result.training_loss is None:
        return None
    if resumed_from is None:
        return float(result.training_loss)
    start = int(resumed_from.name.split("-")[-1])
    total, last = 0.0, 0
    for entry in state.log_history:
        if "loss" in entry and entry.get("step", 0) <= start:
            total += float(entry["loss"]) * (entry["step"] - last)
            last = entry["step"]
    if last != start:
        logger.warning(
            "steps %d-%d before the resume were not logged (save_steps is not a multiple of logging_steps): "
            "train_loss leaves them out",
            last + 1,
            start,
        )
    steps_after = state.global_step - start
    counted = last + steps_after
    return (total + float(result.training_loss) * steps_after) / counted if counted else None


# ------------------------------------------------------------------------------------------------------- tracking
def _setup_tracking(config: TrainConfig, args: TrainingArguments) -> dict[str, str | None]:
    """Point W&B and TensorBoard into the run folder (`phi3v.tracking`); return the environment to restore."""
    previous = snapshot_env()
    output_dir = Path(config.output_dir).resolve()
    report_to = args.report_to or []
    if "tensorboard" in report_to:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output_dir / "tensorboard"))
    if "wandb" in report_to:
        os.environ["WANDB_LOG_MODEL"] = config.wandb_log_model
        setup_wandb_env(output_dir, config.wandb_project)
    return previous


class _WandbConfigCallback(TrainerCallback):
    """Add phi3v's own config (mode, data, templates, LoRA...) to the W&B run's config, beside TrainingArguments."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config_to_dict(config)

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        try:
            import wandb
        except ImportError:
            return
        if state.is_world_process_zero and wandb.run is not None:
            wandb.config.update({"phi3v": self.config}, allow_val_change=True)


class _SamplerEpochCallback(TrainerCallback):
    """Set the token-budget sampler's epoch at each epoch's start (accelerate forwards ``set_epoch`` to it in most
    set-ups, but not through every wrapper it adds on resume), so a resumed run draws the same batch order."""

    def __init__(self, sampler: TokenBudgetBatchSampler) -> None:
        self.sampler = sampler

    def on_epoch_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.sampler.set_epoch(int(state.epoch or 0))


class _GradientCheckpointingCallback(TrainerCallback):
    """Keep gradients flowing into checkpointed blocks whose inputs are frozen embeddings (LoRA)."""

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if args.gradient_checkpointing and model is not None and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, in MiB (None where `resource` is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


class _MemoryCallback(TrainerCallback):
    """Peak RSS once the model is loaded and wrapped by its engine (DDP / FSDP2 / ZeRO), before the first step."""

    def __init__(self) -> None:
        self.loaded_peak_mib: float | None = None

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.loaded_peak_mib = peak_rss_mib()


# ------------------------------------------------------------------------------------------------------- the stage
@dataclass
class TrainingSummary:
    """What a run did; written to ``OUTPUT/training_summary.json``."""

    output_dir: str
    mode: str
    global_step: int
    epochs: float
    train_loss: float | None
    runtime_seconds: float
    world_size: int
    parameters: dict[str, int]
    resumed_from: str | None
    best_checkpoint: str | None
    best_metric: float | None
    final_eval: dict[str, float]
    rank_parameter_digests: list[str | None]
    rank_peak_rss_mib: dict[str, list[float]]  # per rank: "loaded" (model loaded and wrapped), "end" (whole run)
    wandb_offline_run: str | None
    versions: dict[str, str]


def train(
    config: TrainConfig, resume: bool = False, callbacks: list[TrainerCallback] | None = None, progress: bool = True
) -> TrainingSummary:
    """Run one training job end to end (see the module docstring for the steps).

    Args:
        config: A validated `TrainConfig` (`load_train_config`).
        resume: Continue from the latest complete checkpoint in ``config.output_dir``.
        callbacks: Extra `TrainerCallback`s (e.g. from a notebook).
        progress: Show progress: the Trainer's bar on a terminal, periodic log lines otherwise
            (`phi3v.progress.attach_to_trainer`); False: neither (``--quiet``).

    Returns:
        `TrainingSummary`, also written to ``training_summary.json``.

    Raises:
        TrainingError: A run that cannot start or go on (message says why), including `NonFiniteLossError`.
        DatasetError: The data folder is not a usable prepared dataset.
        ConfigError: A bad config value found when the Trainer is built.
    """
    started = time.perf_counter()
    args = config.training_arguments()
    _preflight(config, args)
    checkpoint = _check_output_dir(config, resume)
    if args.world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank has checked the run folder before rank 0 writes into it
    output_dir = Path(config.output_dir)

    # data: prepared splits, lengths for length-grouped sampling
    splits = load_prepared_dataset(
        config.data, (TRAIN_SPLIT, EVAL_SPLIT) if args.eval_strategy != "no" else (TRAIN_SPLIT,)
    )
    processor = load_processor(config)
    template = AnswerTemplate(config.answer_template)
    prompt = processor.apply_chat_template([{"role": "user", "content": config.prompt}], add_generation_prompt=True)
    train_set, eval_set = splits[TRAIN_SPLIT], splits.get(EVAL_SPLIT)
    budget_sampler = None
    if args.train_sampling_strategy == "group_by_length" or config.packing or config.max_tokens_per_batch:
        train_lengths = sequence_lengths(train_set, processor, prompt, template)
        _check_lengths(config, train_lengths)
        if config.max_tokens_per_batch is not None:
            budget_sampler = _budget_sampler(config, args, train_lengths)
            logger.info("token budget %d: %s", config.max_tokens_per_batch, budget_sampler.stats())
        train_set = train_set.add_column(args.length_column_name, train_lengths)
        if eval_set is not None and args.train_sampling_strategy == "group_by_length":  # evaluation batches too
            eval_set = eval_set.add_column(
                args.length_column_name, sequence_lengths(eval_set, processor, prompt, template)
            )
    transformers.set_seed(args.seed)  # adapters are initialised from the global RNG: same seed, same run
    model, processor = load_model_and_processor(config, args, processor)
    generation_check = (
        GenerationCheck(eval_set, config.eval_samples, prompt, template, config.eval_max_new_tokens)
        if eval_set is not None and config.eval_samples > 0
        else None
    )
    counts = parameter_counts(model)
    logger.info(
        "mode %s: %s of %s parameters trainable (%.2f%%); %d train / %d validation rows",
        config.mode,
        f"{counts['trainable']:,}",
        f"{counts['total']:,}",
        100 * counts["trainable"] / max(counts["total"], 1),
        len(train_set),
        len(eval_set) if eval_set is not None else 0,
    )

    # run folder: resolved config first (a crash later still leaves it)
    if args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / CONFIG_NAME).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")

    previous_env = _setup_tracking(config, args)
    memory = _MemoryCallback()
    try:
        trainer = Phi3VTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=Phi3VCollator(processor, prompt, template, config.max_length, packing=config.packing),
            processing_class=processor,
            callbacks=[_GradientCheckpointingCallback(), _WandbConfigCallback(config), memory, *(callbacks or [])],
            phi3v_config=config,
            generation_check=generation_check,
            train_batch_sampler=budget_sampler,
        )
        attach_to_trainer(trainer, progress)
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        trainer.generations_name = "final"  # the final model's answers (the best one with load_best_model_at_end)
        final_eval = trainer.evaluate() if eval_set is not None else {}
        try:
            trainer.save_model(str(output_dir))
        except Exception as err:
            raise TrainingError(f"saving the final model to {output_dir} failed ({_write_failure(err)})") from err
    finally:
        wandb_run = finish_wandb()
        restore_env(previous_env)  # a later run in this process (notebook, sweep) gets its own folders

    digest = parameter_digest(trainer.model)
    digests: list[str | None] = [digest]
    rss = {"loaded": memory.loaded_peak_mib, "end": peak_rss_mib()}
    rank_rss: list[dict[str, float | None]] = [rss]
    if args.world_size > 1:
        import torch.distributed as dist

        digests = [None] * args.world_size
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            logger.error("ranks ended with different weights: %s", digests)
        rank_rss = [{}] * args.world_size
        dist.all_gather_object(rank_rss, rss)
    train_loss = _whole_run_loss(trainer.state, result, checkpoint)
    summary = TrainingSummary(
        output_dir=str(output_dir),
        mode=config.mode,
        global_step=trainer.state.global_step,
        epochs=float(trainer.state.epoch or 0.0),
        train_loss=train_loss,
        runtime_seconds=round(time.perf_counter() - started, 2),
        world_size=args.world_size,
        parameters=counts,
        resumed_from=str(checkpoint) if checkpoint is not None else None,
        best_checkpoint=trainer.state.best_model_checkpoint,
        best_metric=trainer.state.best_metric,
        final_eval={k: (float(v) if math.isfinite(v) else None) for k, v in final_eval.items()},
        rank_parameter_digests=digests,
        rank_peak_rss_mib={key: [r[key] for r in rank_rss] for key in ("loaded", "end")},
        wandb_offline_run=wandb_run,
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
    )
    if args.should_save:
        (output_dir / SUMMARY_NAME).write_text(json.dumps(dataclasses.asdict(summary), indent=2), encoding="utf-8")
        with open(output_dir / "log_history.jsonl", "w", encoding="utf-8") as fh:
            for entry in trainer.state.log_history:  # strict JSON: NaN (e.g. no price parsed) becomes null
                clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()}
                fh.write(json.dumps(clean) + "\n")
    if wandb_run is not None and args.should_save:
        logger.warning("W&B ran offline; upload the run with: wandb sync %s", wandb_run)
    return summary
