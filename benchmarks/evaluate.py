"""Evaluation-generation benchmark: `phi3v evaluate`'s batched greedy answers against a batch-size-1 loop.

    python benchmarks/evaluate.py                    # tiny random model on the CPU (or cuda when available)
    python benchmarks/evaluate.py --device cpu --n-images 16 --repeats 1 --max-new-tokens 8   # a smoke run
    python benchmarks/evaluate.py --device cuda --config phi-3.5-vision-instruct --num-crops 4
    python benchmarks/evaluate.py --device cuda --config phi-3-vision-128k-instruct --num-crops 16 --tokenizer DIR

What one run is: one call of the real code path, `phi3v.generation.generate_answers` (what `phi3v evaluate`,
`phi3v predict` and the training generation check use), over all ``--n-images`` images at one batch size: images
sorted by image-token count, the next batch's images decoded and HD-transformed on a background thread, left
padding, greedy decoding with the KV cache. Its time is `Generation.seconds` (the whole call: image loading of the
first batch, processor, ``model.generate``, detokenisation). The baseline is the same call at batch size 1, on the
same model and the same images, in the same run.

Configurations (``--batch-sizes``, batch size 1 always included) run in turn, ``--repeats`` times, the order
reversed every other repeat (1, 8, 16, 32, then 32, 16, 8, 1, ...), so a change in machine load hits all alike;
one warm-up call per batch size (its first ``batch`` images) before timing. Reported per batch size: median
images/s and median generated tokens/s (generated tokens / seconds) [min-max], the ratio of medians to batch size
1, the prompt padding ratio of its batches (padded / real prompt tokens, from the processor's per-image
lengths), and the number of answers equal to batch size 1's (a correctness check next to the speed: left padding
must not change a greedy answer; batch size 1's own repeats are compared with its first).

Fixed answer length: a random model stops at arbitrary points, and a batch decodes until its longest answer ends, so
a batch size could look faster or slower just by generating fewer or more tokens. The end tokens' logits
(``<|end|>``, ``<|endoftext|>``) are therefore set to the dtype's minimum by a forward hook on ``lm_head``, at every
batch size alike: every answer runs to exactly ``--max-new-tokens`` tokens, which is the count tokens/s uses; the
count `generate_answers` reports (`Generation.new_tokens`) is printed beside it as a check. ``--natural-stop`` removes
the hook: answers stop where the model says, tokens are `Generation.new_tokens`, and tokens/s is the fair measure.

Data: a `phi3v synth` catalog (``quirks=False``, 256 px drawings) in a temporary folder (``--work DIR`` keeps it),
photos reshaped round-robin to square / wide / tall (`reshape_photos`), so batches mix crop grids and image-token
counts like a real catalog; images are read from their files by `PIL.Image.open`. Prompt: "What is shown in this
image?" in the processor's chat template.

Model: ``tiny`` is the real architecture at toy width (`write_random_checkpoint`, seed 0, fp32). Full-size configs
(``phi-3.5-vision-instruct``, ``phi-3-vision-128k-instruct``; meant for ``--device cuda``, bf16) are random weights
written the way `benchmarks/train_step.py` does it; they need a tokenizer: ``--tokenizer DIR`` (e.g. the hub's
files), otherwise a byte-level BPE is trained with `phi3v.model.tokenizer.train_tokenizer` (its ``<|image|>`` id is
not 32044; `write_random_checkpoint` writes that id into the model's config). ``--model DIR`` reuses an
existing model folder. SDPA attention (the loader's default; flash-attention on CUDA when installed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from PIL import Image

from machine import describe  # benchmarks/machine.py (this script's folder is on sys.path)
from phi3v.data.synthetic import MIXED_SHAPES
from phi3v.generation import Generation, end_token_ids, generate_answers
from train_step import build_model_folder  # the same random-init model set-up as the training benchmark

CONFIGS = ("tiny", "phi-3.5-vision-instruct", "phi-3-vision-128k-instruct")
DTYPES = ("auto", "float32", "bfloat16")
PROMPT = "<|image_1|>What is shown in this image?"
SHAPES = MIXED_SHAPES  # square, wide (1x2 crops at num_crops 4), tall (2x1)
GOAL = 5.0  # images/s of the best batch size / batch size 1


# ------------------------------------------------------------------------------------------------------- set-up
def build_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """A `phi3v synth` catalog of ``n`` products, photos reshaped round-robin to `SHAPES`; the image files, sorted."""
    from phi3v.data.synthetic import make_synthetic_catalog, reshape_photos

    catalog = make_synthetic_catalog(folder / "synth", n, seed=seed, image_size=256, quirks=False)
    reshape_photos(catalog, SHAPES)
    paths = sorted((catalog.parent / "images").glob("*.*"))
    if len(paths) != n:
        raise RuntimeError(f"{catalog}: {len(paths)} image files for {n} products")
    return paths


def load_model(model_dir: Path, device: str, dtype: torch.dtype, num_crops: int) -> tuple[Any, Any]:
    """`Phi3VForCausalLM` on ``device`` in ``dtype`` (eval mode) and its `Phi3VProcessor` at ``num_crops``."""
    from phi3v.model.modeling import Phi3VForCausalLM
    from phi3v.model.processing import Phi3VProcessor

    model = Phi3VForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device=device).eval()
    return model, Phi3VProcessor.from_pretrained(str(model_dir), num_crops=num_crops)


def suppress_end_tokens(model: Any, end_ids: list[int]) -> Any:
    """Hook ``lm_head`` so the end tokens are never the greedy choice: every answer runs to max_new_tokens."""
    ids = torch.tensor(end_ids, device=model.lm_head.weight.device)

    def hook(_module: Any, _inputs: Any, logits: torch.Tensor) -> torch.Tensor:  # [B, T, vocab]
        logits[..., ids] = torch.finfo(logits.dtype).min
        return logits

    return model.lm_head.register_forward_hook(hook)


def padding_ratio(order_key: dict[int, int], lengths: dict[int, int], indices: list[int], batch_size: int) -> float:
    """Padded / real prompt tokens of `generate_answers`' batches (sorted by image tokens, longest first)."""
    order = sorted(indices, key=lambda i: -order_key[i])  # stable, like generate_answers' list.sort
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return padded / sum(lengths[i] for i in indices)


# ------------------------------------------------------------------------------------------------------- report
def _median_range(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=CONFIGS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bf16 for full size on cuda, else fp32")
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8,16,32", help="comma-separated; 1 (the baseline) is always run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (order alternates)")
    parser.add_argument("--max-new-tokens", type=int, default=22, help="22 = a real answer with the tiny tokenizer")
    parser.add_argument("--natural-stop", action="store_true", help="let answers end at <|end|> (no fixed length)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for full-size configs")
    parser.add_argument("--model", default=None, help="an existing model folder (skips writing a random one)")
    parser.add_argument("--work", default=None, help="folder for the model and images (default: a temporary one)")
    args = parser.parse_args()

    try:
        batch_sizes = sorted({1, *(int(b) for b in args.batch_sizes.split(",") if b.strip())})
    except ValueError:
        parser.error(f"--batch-sizes: integers expected, got {args.batch_sizes!r}")
    if batch_sizes[0] < 1 or args.repeats < 1 or args.n_images < 1 or args.max_new_tokens < 1:
        parser.error("batch sizes, --repeats, --n-images and --max-new-tokens must be >= 1")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if cuda and args.config != "tiny" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    transformers.logging.set_verbosity_error()

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="phi3v-bench-evaluate-") as tmp:
        root = Path(args.work) if args.work is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print("... set-up", file=sys.stderr, flush=True)
        if args.model is not None:
            model_dir = Path(args.model)
        else:
            model_dir = build_model_folder(root, args.config, args.num_crops, args.tokenizer)
        paths = build_images(root, args.n_images)
        model, processor = load_model(model_dir, args.device, dtype, args.num_crops)
        end_ids = end_token_ids(processor)
        if not args.natural_stop:
            suppress_end_tokens(model, end_ids)
        prompt = processor.apply_chat_template([{"role": "user", "content": PROMPT}])

        indices = list(range(len(paths)))
        sizes: dict[int, tuple[int, int]] = {}
        for i, path in enumerate(paths):
            with Image.open(path) as image:
                sizes[i] = image.size
        image_tokens = {i: processor.image_processor.num_image_tokens_for_size(*sizes[i]) for i in indices}
        lengths: dict[int, int] = {}
        for i, path in enumerate(paths):
            with Image.open(path) as image:
                lengths[i] = int(processor(prompt, images=[image.convert("RGB")])["input_ids"].shape[1])

        def load_image(i: int) -> Image.Image:
            return Image.open(paths[i])

        def run(batch_size: int, subset: list[int]) -> Generation:
            return generate_answers(
                model,
                processor,
                prompt,
                subset,
                load_image,
                sizes=sizes,
                batch_size=batch_size,
                max_new_tokens=args.max_new_tokens,
            )

        setup_s = time.perf_counter() - started
        warmup_started = time.perf_counter()
        for batch_size in batch_sizes:  # one batch of each size: allocator, kernels, thread pools
            print(f"... warm-up, batch {batch_size}", file=sys.stderr, flush=True)
            run(batch_size, indices[:batch_size])
        warmup_s = time.perf_counter() - warmup_started

        runs: dict[int, list[Generation]] = {b: [] for b in batch_sizes}
        peaks: dict[int, float] = {}
        errors: dict[int, str] = {}
        for repeat in range(args.repeats):
            order = batch_sizes if repeat % 2 == 0 else list(reversed(batch_sizes))
            for batch_size in order:
                if batch_size in errors:
                    continue
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    generation = run(batch_size, indices)
                except torch.OutOfMemoryError as err:
                    errors[batch_size] = f"out of memory: {str(err).splitlines()[0]}"
                    continue
                if cuda:
                    peaks[batch_size] = max(peaks.get(batch_size, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                if generation.failures:
                    errors[batch_size] = f"{len(generation.failures)} images failed to load"
                runs[batch_size].append(generation)
                print(
                    f"... repeat {repeat + 1}/{args.repeats}, batch {batch_size}: "
                    f"{generation.images_per_second:.2f} images/s, {generation.seconds:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )

    # ---------------------------------------------------------------------------------------------------- tables
    name = torch.cuda.get_device_name(0) if cuda else describe()
    dtype_name = str(dtype).removeprefix("torch.")
    attention = model.config._attn_implementation
    shapes = Counter(f"{w}x{h} ({image_tokens[i]} image tokens)" for i, (w, h) in sizes.items())
    stop = "answers end at <|end|> (--natural-stop)" if args.natural_stop else "end tokens masked: fixed length"
    print(
        f"# evaluate generation: {args.config}, {dtype_name}, {attention}, num_crops {args.num_crops}, "
        f"{args.n_images} images, max_new_tokens {args.max_new_tokens}, on {name}"
    )
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"`generate_answers` per batch size, {args.repeats} repeats (order alternating), medians [min-max], "
        f"after one warm-up batch per size ({warmup_s:.0f} s); {stop}"
    )
    print(
        "images: "
        + ", ".join(f"{count} x {shape}" for shape, count in sorted(shapes.items()))
        + f"; prompt lengths {min(lengths.values())}-{max(lengths.values())} tokens; set-up {setup_s:.0f} s"
    )
    print()
    memory = " peak GiB |" if cuda else ""
    print(
        "| batch size | images/s | generated tokens/s | tokens/image | s per run | prompt padding ratio "
        f"| answers = batch 1 | images/s / batch 1 | tokens/s / batch 1 |{memory}"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""))
    baseline = runs[1][0].answers if runs[1] else {}
    base_images = statistics.median(g.images_per_second for g in runs[1]) if runs[1] else float("nan")

    def generated(g: Generation) -> int:  # fixed length: exact by construction (the hook)
        return g.new_tokens if args.natural_stop else len(g.answers) * args.max_new_tokens

    base_tokens = statistics.median(generated(g) / g.seconds for g in runs[1]) if runs[1] else float("nan")
    ratios: dict[int, float] = {}
    reported: dict[int, float] = {}  # Generation.new_tokens per image
    mismatch: tuple[int, int, str, str] | None = None
    for batch_size in batch_sizes:
        generations = runs[batch_size]
        if not generations:
            print(f"| {batch_size} | {errors.get(batch_size, 'no runs')} |" + " |" * (8 if cuda else 7))
            continue
        images_s = [g.images_per_second for g in generations]
        tokens_s = [generated(g) / g.seconds for g in generations]
        per_image = statistics.mean(generated(g) / max(len(g.answers), 1) for g in generations)
        reported[batch_size] = statistics.mean(g.new_tokens / max(len(g.answers), 1) for g in generations)
        equal = total = 0
        for generation in generations[1:] if batch_size == 1 else generations:
            for i in indices:
                answer = generation.answers.get(i)
                same = answer is not None and answer == baseline.get(i)
                equal += same
                total += 1
                if not same and mismatch is None:
                    mismatch = (batch_size, i, baseline.get(i, "<missing>"), answer or "<missing>")
        agree = f"{equal}/{total}" if total else "— (1 run)"
        ratios[batch_size] = statistics.median(images_s) / base_images
        note = f" ({errors[batch_size]})" if batch_size in errors else ""
        print(
            f"| {batch_size}{note} | {_median_range(images_s, 2)} | {_median_range(tokens_s, 1)} | {per_image:.1f} "
            f"| {statistics.median(g.seconds for g in generations):.2f} "
            f"| {padding_ratio(image_tokens, lengths, indices, batch_size):.3f} | {agree} "
            f"| **{ratios[batch_size]:.2f}x** | {statistics.median(tokens_s) / base_tokens:.2f}x |"
            + (f" {peaks[batch_size]:.2f} |" if cuda else "")
        )
    print()
    batched = {b: r for b, r in ratios.items() if b > 1}
    if batched:
        best = max(batched, key=lambda b: batched[b])
        verdict = "met" if batched[best] >= GOAL else "NOT met"
        print(
            f"- best: batch {best}, **{batched[best]:.2f}x** the images/s of batch size 1 "
            f"(goal >= {GOAL:g}x: {verdict})."
        )
    counts = ", ".join(f"{reported[b]:.1f} (batch {b})" for b in reported)
    if args.natural_stop:
        print(f"- generated tokens per image (`Generation.new_tokens`): {counts}.")
    else:
        wrong = any(abs(value - args.max_new_tokens) > 1e-9 for value in reported.values())
        verdict = "the reported count is WRONG; tokens/s above uses the fixed length" if wrong else "agrees"
        print(
            f"- `Generation.new_tokens` per image: {counts}; every answer has {args.max_new_tokens} tokens "
            f"(end tokens masked): {verdict}."
        )
    if mismatch is not None:
        b, i, want, got = mismatch
        print(f"- first answer differing from batch size 1: batch {b}, image {i}: {want[:60]!r} vs {got[:60]!r}")
    print(
        f"- total {time.perf_counter() - started:.0f} s; load average (1 min) {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after (other work on the machine, if any)"
    )


if __name__ == "__main__":
    main()
