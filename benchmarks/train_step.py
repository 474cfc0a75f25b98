"""Training-step benchmark: `phi3v train`'s optimizer step per mode — padded against packed batches (the same
samples), length-grouped against random batches, and optionally token-budget batches.

    python benchmarks/train_step.py                  # tiny random model on the CPU (~2 min on 2 cores)
    python benchmarks/train_step.py --device cuda --config phi-3.5-vision-instruct --num-crops 4
    python benchmarks/train_step.py --device cuda --config phi-3.5-vision-instruct --num-crops 16 --tokenizer DIR

What one step is: exactly what `phi3v.train.Phi3VTrainer` does per optimizer step at gradient accumulation 1 —
``trainer.training_step`` (inputs to the device, forward, answer-only loss, backward through accelerate), gradient
clipping at ``max_grad_norm`` and the AdamW step of ``trainer.create_optimizer()`` (phi3v's per-component parameter
groups), then ``zero_grad``. The model and its trainable parameters come from `phi3v.train.load_model_and_processor`
for each mode (``lora``, ``full``, ``freeze_vision``; ``qlora`` only with ``--device cuda`` and bitsandbytes,
otherwise reported as skipped with the reason). SDPA attention.

Data: a `phi3v synth` catalog run through `phi3v prepare` in a temporary folder, its photos reshaped round-robin to
square / wide / tall, so batches mix crop grids and token counts (the same set-up as the training tests). Batches
are the Trainer's own: ``trainer.get_train_dataloader()`` with `Phi3VCollator`. The variants, all in one run:

- ``grouped``: ``train_sampling_strategy="group_by_length"`` (transformers' `LengthGroupedSampler` over
  `sequence_lengths`, phi3v's default: random mega-batches of ``min(50, n / (4 * batch))`` batches, sorted by length
  inside), padded to each batch's longest sample;
- ``packed``: **the same batches** as ``grouped``, each packed into one padding-free row (`pack_batch`, what
  ``packing: true`` trains on), through ``attn_implementation="varlen"`` as a packed run loads it: torch's varlen
  flash kernels on CUDA in bf16, SDPA sample by sample on the CPU (the padded variants' calls of it are plain SDPA);
- ``random``: ``"random"`` sampling, padded (the old baseline);
- with ``--max-tokens B``: ``budget-padded`` / ``budget-packed``, batches of `TokenBudgetBatchSampler` at budget B
  (padded cost count x longest, packed cost sum of lengths; not the same samples per batch, the same budget), and
  the budget's memory prediction checked against the measured peak.

Batches are collated before the timed loop (a training run collates them in DataLoader workers, overlapped with the
step); the collation time is reported separately.

Each mode runs in a fresh Python process (clean allocator and peak-memory state) that trains one model on every
variant's batches, steps interleaved in ABBA order (A, B, C, C, B, A, ...), so a change in machine load hits all
alike; ``--warmup`` steps per variant, then ``--steps`` timed ones per variant (medians; machines are noisy).
Measured:

- tokens/s: real (non-padding) tokens of the batch / step time; images/s likewise;
- padding ratio: tokens through the model (batch * longest, or N when packed) / real tokens over the timed batches
  (1.0 = no padding);
- peak memory, per variant (the peak is reset before each step and read after it; the variant's value is the max
  over its steps): CUDA: ``torch.cuda.max_memory_allocated`` (weights, gradients, optimizer state, activations).
  CPU: peak RSS growth over the step = the high-water mark after the step (``VmHWM``) minus the RSS before it, freed
  heap having been returned first (glibc ``malloc_trim``) and the mark reset by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux; no tracemalloc, which misses torch's allocations). Growth, not total: weights,
  optimizer state (after the first step) and the collated batches are already resident;
- with ``--max-tokens``, the budget's prediction: (peak - the step-free baseline of weights, gradients and optimizer
  state) per token of the largest batch, from the padded fixed-size run, times the budget, compared with the
  budget variants' measured peaks.
- model FLOP/s and, on CUDA, MFU = model FLOP/s / ``--peak-tflops`` (default 790 TFLOP/s).

Model FLOPs of one step (no recomputation counted: gradient checkpointing lowers MFU). Each matmul weight costs 2
FLOPs per token and pass, with one pass for the forward, one for the activation gradients when a gradient must flow
through the block to something trainable before it, and one for the weight gradients when the block is trained:

    F = a_LM * N_LM * T + 6 * N_lora * T + 3 * 4 * L * d * sum(T_i^2)                (language model)
      + a_P * N_P * I                                                                 (projector)
      + a_V * N_V * 577 * C + c_V * 4 * L_V * d_V * 577^2 * C                        (CLIP tower)

- T = real tokens of the batch, T_i those of sample i, I = image tokens, C = CLIP crops run (global view + h*w HD
  crops per image, from ``image_sizes``; padding crops are skipped by the model), 577 = (336/14)^2 + 1 patches per
  crop (from the vision config);
- N_LM = decoder layers + final norm + ``lm_head`` (embeddings excluded: a lookup), N_lora = LoRA adapter weights,
  N_P = projector MLP, N_V = the CLIP layers the model runs (23 of 24) + patch embedding (position embedding
  excluded); L, d and L_V, d_V = layers and width of the LM and of CLIP;
- attention scores (QK^T and AV, counted non-causal as in PaLM's MFU): 4 * L * d * T_i^2 per forward, x3 with a
  backward through them (all LM modes), x1 for a frozen CLIP;
- a_LM = 6 (full, freeze_vision) or 4 (lora, qlora: frozen weights, but the backward through them still costs a
  forward's worth for the activation gradients); a_P = 6 (full), 4 (freeze_vision: nothing trainable before it),
  2 (lora: frozen, forward only); a_V = 6 and c_V = 3 (full), a_V = 2 and c_V = 1 (frozen CLIP: forward only).

Full-size configs need a tokenizer: ``--tokenizer DIR`` (e.g. the hub's Phi-3.5-vision-instruct files); without it a
byte-level BPE is trained with `phi3v.model.tokenizer.train_tokenizer` (its ``<|image|>`` id is 8, not 32044, and
`write_random_checkpoint` writes that id into the model's config; text then tokenises to more tokens than with the
real tokenizer, image tokens are unchanged). ``--model DIR`` reuses an existing model folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from machine import describe  # benchmarks/machine.py (this script's folder is on sys.path)
from phi3v.data.synthetic import MIXED_SHAPES

MODES = ("lora", "full", "freeze_vision", "qlora")
VARIANTS = ("grouped", "packed", "random")  # + ("budget-padded", "budget-packed") with --max-tokens
SAMPLER_OF = {"grouped": "group_by_length", "packed": "group_by_length", "random": "random"}
SHAPES = MIXED_SHAPES  # square, wide (1x2 crops at num_crops 4), tall (2x1)


# ------------------------------------------------------------------------------------------------------- set-up
def build_model_folder(folder: Path, config_name: str, num_crops: int, tokenizer: str | None) -> Path:
    """A random-init model folder (`write_random_checkpoint`, seed 0); full-size configs get a tokenizer."""
    from phi3v.model.configuration import TINY_CONFIGS, Phi3VConfig
    from phi3v.model.random_init import write_random_checkpoint
    from phi3v.model.tokenizer import default_corpus, train_tokenizer

    if tokenizer is None and config_name not in TINY_CONFIGS:
        vocab_size = Phi3VConfig.from_name(config_name).vocab_size
        trained = train_tokenizer(default_corpus(), vocab_size=vocab_size)
        tokenizer = str(folder / "tokenizer")
        trained.save_pretrained(tokenizer)
    dtype = torch.bfloat16 if config_name not in TINY_CONFIGS else torch.float32
    return write_random_checkpoint(
        folder / "model", config_name, seed=0, num_crops=num_crops, tokenizer_folder=tokenizer, dtype=dtype
    )


def build_prepared_catalog(folder: Path, n: int, seed: int = 0) -> Path:
    """A `phi3v synth` catalog of ``n`` products, photos reshaped round-robin to `SHAPES`, run through prepare."""
    from phi3v.data.synthetic import make_synthetic_catalog, reshape_photos
    from phi3v.prepare import PrepareOptions, prepare

    catalog = make_synthetic_catalog(folder / "synth", n, seed=seed, image_size=256, quirks=False)
    reshape_photos(catalog, SHAPES)
    report = prepare(str(catalog), folder / "prepared", PrepareOptions(progress=False))
    if not report.invariant_holds() or report.kept != n:
        raise RuntimeError(f"prepare kept {report.kept} of {n} rows: {report}")
    return folder / "prepared"


def check_lengths(model_dir: Path, data_dir: Path, num_crops: int) -> tuple[int, int, list[int]]:
    """`sequence_lengths` against the collator's unpadded lengths on every train row: (rows, mismatches, lengths)."""
    from phi3v.data.collate import TRAIN_SPLIT, Phi3VCollator, load_prepared_dataset, sequence_lengths
    from phi3v.metrics import DEFAULT_ANSWER_TEMPLATE, DEFAULT_PROMPT, AnswerTemplate
    from phi3v.model.processing import Phi3VProcessor

    split = load_prepared_dataset(data_dir, (TRAIN_SPLIT,))[TRAIN_SPLIT]
    processor = Phi3VProcessor.from_pretrained(str(model_dir), num_crops=num_crops)
    template = AnswerTemplate(DEFAULT_ANSWER_TEMPLATE)
    prompt = processor.apply_chat_template([{"role": "user", "content": DEFAULT_PROMPT}], add_generation_prompt=True)
    lengths = sequence_lengths(split, processor, prompt, template)
    collator = Phi3VCollator(processor, prompt, template)
    actual: list[int] = []
    for start in range(0, len(split), 8):
        rows = [split[i] for i in range(start, min(start + 8, len(split)))]
        actual += collator(rows)["attention_mask"].sum(dim=1).tolist()
    return len(split), sum(a != b for a, b in zip(lengths, actual, strict=True)), lengths


def qlora_skip_reason(device: str) -> str | None:
    if device != "cuda" or not torch.cuda.is_available():
        return "needs --device cuda (bitsandbytes 4-bit kernels)"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed"
    return None


# ------------------------------------------------------------------------------------------------------- worker
def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _flop_model(model: Any, mode: str) -> dict[str, Any]:
    """Parameter counts and shapes the FLOP formula of the module docstring needs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    vision = base.model.vision_embed_tokens
    lm_base = lora = 0
    for part in (base.model.layers, base.model.norm, base.lm_head):
        for name, param in part.named_parameters():
            n = param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)
            if "lora_" in name:
                lora += n
            else:
                lm_base += n
    clip = sum(p.numel() for name, p in vision.img_processor.named_parameters() if "position_embedding" not in name)
    vcfg = vision.img_processor.config
    trained_lm = mode in ("full", "freeze_vision")
    return {
        "n_lm": lm_base,
        "n_lora": lora,
        "n_proj": sum(p.numel() for p in vision.img_projection.parameters()),
        "n_clip": clip,
        "layers": config.num_hidden_layers,
        "width": config.hidden_size,
        "clip_layers": vision.num_used_layers,
        "clip_width": vcfg.hidden_size,
        "patches": (vcfg.image_size // vcfg.patch_size) ** 2 + 1,
        "crop": vcfg.image_size,
        "a_lm": 6 if trained_lm else 4,
        "a_proj": {"full": 6, "freeze_vision": 4}.get(mode, 2),
        "a_clip": 6 if mode == "full" else 2,
        "c_clip": 3 if mode == "full" else 1,
        "image_token_id": config.image_token_id,
    }


def real_lengths(batch: Any) -> torch.Tensor:
    """Real token count of each sample of a padded or a packed batch."""
    if "cu_seq_lens" in batch:
        cu = batch["cu_seq_lens"].long()
        return cu[1:] - cu[:-1]
    return batch["attention_mask"].sum(dim=1)


def model_tokens(batch: Any) -> int:
    """Tokens the model runs over: the padded batch's size, or the packed row's length."""
    return batch["input_ids"].numel()


def _batch_flops(batch: Any, f: dict[str, Any]) -> float:
    real = real_lengths(batch).double()
    tokens = float(real.sum())
    ids = batch["input_ids"]
    real_mask = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
    image_tokens = float(((ids == f["image_token_id"]) & real_mask).sum())
    sizes = batch["image_sizes"].reshape(-1, 2)
    crops = float(sum(1 + (int(h) // f["crop"]) * (int(w) // f["crop"]) for h, w in sizes.tolist()))
    p = f["patches"]
    lm = f["a_lm"] * f["n_lm"] * tokens + 6 * f["n_lora"] * tokens
    lm += 3 * 4 * f["layers"] * f["width"] * float((real**2).sum())
    proj = f["a_proj"] * f["n_proj"] * image_tokens
    clip = f["a_clip"] * f["n_clip"] * p * crops + f["c_clip"] * 4 * f["clip_layers"] * f["clip_width"] * p * p * crops
    return lm + proj + clip


def _trim_heap() -> None:
    """Give freed heap back to the OS (glibc ``malloc_trim``), so the RSS before a step is what is live."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _peak_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One mode, every variant (steps interleaved), in its own process."""
    import transformers

    from phi3v.data.collate import TRAIN_SPLIT, Phi3VCollator, load_prepared_dataset, sequence_lengths
    from phi3v.data.packing import TokenBudgetBatchSampler, pack_batch
    from phi3v.metrics import AnswerTemplate
    from phi3v.train import Phi3VTrainer, TrainConfig, load_model_and_processor, parameter_counts

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    variants = spec["variants"]
    training: dict[str, Any] = {
        "per_device_train_batch_size": spec["batch_size"],
        "dataloader_num_workers": 0,
        "train_sampling_strategy": "group_by_length",  # switched per variant below
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "bf16": cuda,
        "use_cpu": not cuda,
        "gradient_checkpointing": spec["gradient_checkpointing"],
        "seed": 0,
    }
    config = TrainConfig(
        model=spec["model"],
        data=spec["data"],
        output_dir=spec["output_dir"],
        mode=spec["mode"],
        num_crops=spec["num_crops"],
        eval_samples=0,
        packing=True,  # the attention a packed run loads (varlen on CUDA bf16); padded calls of it are plain SDPA
        training=training,
    )
    args = config.training_arguments()
    train_set = load_prepared_dataset(config.data, (TRAIN_SPLIT,))[TRAIN_SPLIT]
    model, processor = load_model_and_processor(config, args)
    template = AnswerTemplate(config.answer_template)
    prompt = processor.apply_chat_template([{"role": "user", "content": config.prompt}], add_generation_prompt=True)
    lengths = sequence_lengths(train_set, processor, prompt, template)
    train_set = train_set.add_column(args.length_column_name, lengths)
    collator = Phi3VCollator(processor, prompt, template, config.max_length)
    trainer = Phi3VTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=collator,
        processing_class=processor,
        phi3v_config=config,
    )
    model = trainer.model
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which is not used here
    flop_model = _flop_model(model, spec["mode"])

    n_steps = spec["warmup"] + spec["steps"]
    batches: dict[str, list[Any]] = {}
    collate_s: dict[str, float] = {}
    for variant in variants:  # the Trainer's own samplers and collator
        if variant == "packed":  # the grouped batches, packed: the same samples
            started = time.perf_counter()
            batches[variant] = [pack_batch(batch) for batch in batches["grouped"]]
            collate_s[variant] = collate_s["grouped"] + (time.perf_counter() - started) / n_steps
            continue
        budget = variant.startswith("budget-")
        collator.packing = variant == "budget-packed"
        args.train_sampling_strategy = SAMPLER_OF.get(variant, "group_by_length")
        trainer.train_batch_sampler = (
            TokenBudgetBatchSampler(lengths, spec["max_tokens"], packed=collator.packing, seed=0) if budget else None
        )
        batches[variant] = []
        collate_started = time.perf_counter()
        for batch in trainer.get_train_dataloader():
            batches[variant].append(batch)
            if len(batches[variant]) == n_steps:
                break
        collate_s[variant] = (time.perf_counter() - collate_started) / max(len(batches[variant]), 1)
        if len(batches[variant]) < n_steps:
            raise RuntimeError(f"only {len(batches[variant])} {variant} batches; need {n_steps} (--rows)")

    # interleaved, ABBA order: a change in machine load hits every variant alike
    order = [(v, i) for i in range(n_steps) for v in (variants if i % 2 == 0 else tuple(reversed(variants)))]
    device = args.device
    peaks: dict[str, float] = dict.fromkeys(variants, 0.0)
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, list[float]] = {v: [] for v in variants}
    static = None  # memory with weights, gradients' absence and optimizer state: after the first step
    try:
        for variant, i in order:
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            else:
                _trim_heap()
                before = _rss_kib() * 1024
                _reset_peak_rss()
            started = time.perf_counter()
            loss = trainer.training_step(model, batches[variant][i])
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - started
            if cuda:
                peak = torch.cuda.max_memory_allocated(device) / 2**30
                static = torch.cuda.memory_allocated(device) / 2**30
            else:
                peak = (_peak_kib() * 1024 - before) / 2**30
                static = 0.0
            peaks[variant] = max(peaks[variant], peak)
            losses[variant].append(float(loss))
            if i >= spec["warmup"]:
                times[variant].append(elapsed)
    except torch.OutOfMemoryError as err:
        return {"error": f"out of memory: {str(err).splitlines()[0]}"}

    counts = parameter_counts(model)
    out: dict[str, Any] = {
        "trainable": counts["trainable"],
        "total": counts["total"],
        "optimizer": type(optimizer).__name__,
        "static": static,
        "peak_reset": _reset_peak_rss(),
        "loss_first_last": {v: [losses[v][0], losses[v][-1]] for v in variants},
    }
    for variant in variants:
        timed = batches[variant][spec["warmup"] :]
        steps = times[variant]
        real = [int(real_lengths(b).sum()) for b in timed]
        through = [model_tokens(b) for b in timed]
        images = [int(b["image_sizes"].reshape(-1, 2).shape[0]) for b in timed]
        flops = [_batch_flops(b, flop_model) for b in timed]
        rates = [r / t for r, t in zip(real, steps, strict=True)]
        out[variant] = {
            "steps": len(steps),
            "step_s": statistics.median(steps),
            "tokens_s": statistics.median(rates),
            "tokens_s_min": min(rates),
            "tokens_s_max": max(rates),
            "images_s": statistics.median(i / t for i, t in zip(images, steps, strict=True)),
            "samples_per_batch": statistics.mean(images),
            "padding_ratio": sum(through) / sum(real),
            "largest_batch_tokens": max(model_tokens(b) for b in batches[variant]),
            "seq_lengths": [int(b["input_ids"].shape[1]) for b in timed],
            "flop_s": statistics.median(f / t for f, t in zip(flops, steps, strict=True)),
            "collate_s": collate_s[variant],
            "peak": peaks[variant],
        }
    return out


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"worker exited {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="tiny | phi-3.5-vision-instruct | phi-3-vision-128k-instruct")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rows", type=int, default=60, help="catalog size (80%% goes to the train split)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per sampler")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per sampler")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for full-size configs")
    parser.add_argument("--model", default=None, help="an existing model folder (skips writing a random one)")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="also run token-budget batches (padded and packed) at this budget"
    )
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="accelerator peak for MFU (bf16 dense)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    cuda = args.device == "cuda"
    variants = VARIANTS + (("budget-padded", "budget-packed") if args.max_tokens else ())
    with tempfile.TemporaryDirectory(prefix="phi3v-bench-train-") as tmp:
        root = Path(tmp)
        if args.model is not None:
            model_dir = Path(args.model)
        else:
            model_dir = build_model_folder(root, args.config, args.num_crops, args.tokenizer)
        data_dir = build_prepared_catalog(root, args.rows)
        rows, mismatches, lengths = check_lengths(model_dir, data_dir, args.num_crops)
        setup_s = time.perf_counter() - started

        results: dict[str, dict[str, Any]] = {}
        skipped: dict[str, str] = {}
        for mode in modes:
            reason = qlora_skip_reason(args.device) if mode == "qlora" else None
            if reason is not None:
                skipped[mode] = reason
                continue
            spec = {
                "mode": mode,
                "model": str(model_dir),
                "data": str(data_dir),
                "output_dir": str(root / f"run-{mode}"),
                "device": args.device,
                "num_crops": args.num_crops,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "warmup": args.warmup,
                "threads": args.threads,
                "gradient_checkpointing": args.gradient_checkpointing,
                "variants": list(variants),
                "max_tokens": args.max_tokens,
            }
            print(f"... {mode}", file=sys.stderr, flush=True)
            results[mode] = run_worker(spec)

    name = torch.cuda.get_device_name(0) if cuda and torch.cuda.is_available() else describe()
    dtype = "bf16 autocast (lora: bf16 weights)" if cuda else "fp32"
    memory = "peak allocated GiB" if cuda else "peak RSS growth GiB"
    print(f"# train step: {args.config}, {dtype}, num_crops {args.num_crops}, batch {args.batch_size}, on {name}")
    print(
        f"torch {torch.__version__}, {args.threads} threads; {args.steps} timed steps after {args.warmup} warm-up per "
        f"variant, medians [min-max]; one fresh process per mode, variants' steps interleaved (ABBA)"
        + ("; gradient checkpointing" if args.gradient_checkpointing else "")
        + (f"; token budget {args.max_tokens}" if args.max_tokens else "")
    )
    print(
        f"data: {rows} train rows (square/wide/tall photos), lengths {min(lengths)}-{max(lengths)} tokens; "
        f"sequence_lengths == collator lengths on {rows - mismatches}/{rows} rows; set-up {setup_s:.0f} s"
    )
    print()
    print(
        f"| mode | batches | attention | samples / batch | padding ratio | step s | tokens/s | images/s "
        f"| model GFLOP/s | MFU | {memory} |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in modes:
        if mode in skipped:
            print(f"| {mode} | skipped: {skipped[mode]} | | | | | | | | | |")
            continue
        r = results[mode]
        if "error" in r:
            print(f"| {mode} | {r['error']} | | | | | | | | | |")
            continue
        for variant in variants:
            v = r[variant]
            packed_rows = variant.endswith("packed")
            kernel = ("varlen kernel" if cuda else "SDPA per sample") if packed_rows else "SDPA"
            mfu = f"{100 * v['flop_s'] / (args.peak_tflops * 1e12):.1f}%" if cuda else "—"
            print(
                f"| {mode} | {variant} | {kernel} | {v['samples_per_batch']:.1f} | {v['padding_ratio']:.3f} "
                f"| {v['step_s']:.3f} | {v['tokens_s']:.0f} [{v['tokens_s_min']:.0f}-{v['tokens_s_max']:.0f}] "
                f"| {v['images_s']:.2f} | {v['flop_s'] / 1e9:.1f} | {mfu} | {v['peak']:.3f} |"
            )
    print()
    print("| mode | tokens/s packed / padded (same batches) | grouped / random | peak packed / padded |")
    print("|---|---:|---:|---:|")
    for mode in modes:
        r = results.get(mode, {})
        if not r or "error" in r:
            continue
        grouped, packed_, rand = r["grouped"], r["packed"], r["random"]
        print(
            f"| {mode} | **{packed_['tokens_s'] / grouped['tokens_s']:.2f}x** "
            f"| {grouped['tokens_s'] / rand['tokens_s']:.2f}x | {packed_['peak'] / max(grouped['peak'], 1e-9):.2f} |"
        )
    if args.max_tokens:
        print()
        print(
            "| mode | budget variant | samples / batch | largest batch (tokens through the model) | tokens/s "
            "| predicted peak GiB | measured peak GiB | measured / predicted |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for mode in modes:
            r = results.get(mode, {})
            if not r or "error" in r:
                continue
            # activation memory per token through the model, from the fixed-size padded run
            per_token = (r["grouped"]["peak"] - r["static"]) / r["grouped"]["largest_batch_tokens"]
            for variant in ("budget-padded", "budget-packed"):
                v = r[variant]
                predicted = r["static"] + per_token * args.max_tokens
                print(
                    f"| {mode} | {variant} | {v['samples_per_batch']:.1f} | {v['largest_batch_tokens']} "
                    f"| {v['tokens_s']:.0f} | {predicted:.3f} | {v['peak']:.3f} | {v['peak'] / predicted:.2f} |"
                )
    print()
    for mode, r in results.items():
        if "error" in r:
            continue
        print(f"{mode}: {r['optimizer']}" + ("" if r["peak_reset"] or cuda else ", peak RSS not reset"))
        for variant in variants:
            v = r[variant]
            print(
                f"  {variant}: loss {r['loss_first_last'][variant][0]:.3f} -> {r['loss_first_last'][variant][1]:.3f}, "
                f"row lengths {v['seq_lengths']}, collate {v['collate_s']:.3f} s/batch (not in the step)"
            )
    print(
        f"total {time.perf_counter() - started:.0f} s; load average (1 min) {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after (other work on the machine, if any)"
    )


if __name__ == "__main__":
    main()
