"""Constrained-decoding benchmark: `generate_answers` with the template's grammar (xgrammar) against free decoding.

    python benchmarks/constrained.py                 # tiny model, the tiny 1k and a ~32k vocabulary, on the CPU
    python benchmarks/constrained.py --device cuda --repeats 5

What is compared: the same call of the real code path, `phi3v.generation.generate_answers`, over the same images at
the same batch size (``--batch-size``, default 16), with ``constraint=TemplateConstraint(...)`` (what
``phi3v evaluate --constrained`` and ``phi3v predict --constrained`` run) and without. Two vocabularies, each with
the tiny random model (the mask's cost grows with the vocabulary, the model's barely at this width):

- ``tiny``: the tiny config's own byte-level BPE (~1k tokens);
- ``32k``: `train_tokenizer(wide_corpus(), vocab_size=32064)` (~30k tokens) and a tiny model with 32,064 logits,
  Phi-3's size.

Answer lengths differ (a random model's free answer runs to ``--max-new-tokens``; a constrained one ends when the
grammar does), so the measure of what the grammar costs is the **time per decoding step**: the median interval
between two successive decode-step forward passes of one `generate` call (timestamps taken by a hook on
``lm_head``; an interval holds the grammar's work for the step, HF's step overhead and the model's forward; prefill
is left out, which would otherwise weigh more on the shorter constrained runs). Images/s (whole calls) are reported
beside it. Runs alternate free, constrained, constrained, free, ... (``--repeats`` of each); medians.
The grammar is compiled once per vocabulary before timing (its compile time is reported).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from PIL import Image

from evaluate import PROMPT, build_images  # benchmarks/evaluate.py: the same synth photos
from machine import describe
from phi3v.generation import TemplateConstraint, end_token_ids, generate_answers
from phi3v.metrics import AnswerTemplate

GOAL = 1.2  # constrained / free time per decoding step at batch 16


def build(vocabulary: str, device: str) -> tuple[Any, Any]:
    """The tiny random model and its processor (num_crops 1) for a vocabulary name."""
    from phi3v.model.configuration import Phi3VConfig
    from phi3v.model.image_processing import Phi3VImageProcessor
    from phi3v.model.modeling import Phi3VForCausalLM
    from phi3v.model.processing import Phi3VProcessor
    from phi3v.model.tokenizer import default_corpus, train_tokenizer, wide_corpus

    config = Phi3VConfig.from_name("tiny") if vocabulary == "tiny" else Phi3VConfig.from_name("tiny", vocab_size=32064)
    corpus = default_corpus() if vocabulary == "tiny" else wide_corpus()
    tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size)
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=1), tokenizer)
    config.image_token_id = processor.image_token_id
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Phi3VForCausalLM(config).eval().to(device), processor


def measure(
    vocabulary: str,
    args: argparse.Namespace,
    paths: list[Path],
    sizes: dict[int, tuple[int, int]],
    categories: list[str],
) -> list[dict[str, Any]]:
    """Free and constrained runs, alternating, for one vocabulary; a result row per mode."""
    model, processor = build(vocabulary, args.device)
    prompt = processor.apply_chat_template([{"role": "user", "content": PROMPT}])
    template = AnswerTemplate()
    constraint = TemplateConstraint(template, processor.tokenizer, categories, end_token_ids(processor), 80)
    compile_started = time.perf_counter()
    constraint.compiled(model.config.vocab_size)
    compile_s = time.perf_counter() - compile_started
    intervals: list[float] = []  # decode-step intervals of the current run
    last: list[float | None] = [None]

    def hook(_module: Any, _inputs: Any, logits: torch.Tensor) -> None:
        now = time.perf_counter()
        if logits.shape[1] == 1 and last[0] is not None:  # a decode step following a forward of this call
            intervals.append(now - last[0])
        last[0] = now

    model.lm_head.register_forward_hook(hook)

    def run(held: bool, subset: list[int]) -> tuple[float, list[float], Any]:
        intervals.clear()
        result = generate_answers(
            model,
            processor,
            prompt,
            subset,
            lambda i: Image.open(paths[i]),
            sizes=sizes,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            constraint=constraint if held else None,
        )
        return result.seconds, list(intervals), result

    indices = list(range(len(paths)))
    run(False, indices[: args.batch_size])  # warm-up
    run(True, indices[: args.batch_size])
    timings: dict[bool, list[tuple[float, list[float], Any]]] = {False: [], True: []}
    for repeat in range(args.repeats):
        for held in (False, True) if repeat % 2 == 0 else (True, False):
            timings[held].append(run(held, indices))
    rows = []
    for held in (False, True):
        runs = timings[held]
        result = runs[0][2]
        rows.append(
            {
                "vocabulary": vocabulary,
                "vocab": len(processor.tokenizer),
                "mode": "constrained" if held else "free",
                "step_ms": 1000 * statistics.median(t for _, steps, _ in runs for t in steps),
                "images_s": statistics.median(len(r.answers) / s for s, _, r in runs),
                "steps": statistics.median(len(steps) for _, steps, _ in runs),
                "parsed": sum(template.parse(a).ok for a in result.answers.values()),
                "n": len(result.answers),
                "truncated": len(result.truncated),
                "compile_s": compile_s,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--vocabularies", default="tiny,32k")
    parser.add_argument("--n-images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="phi3v-bench-constrained-") as tmp:
        paths = build_images(Path(tmp), args.n_images)
        sizes = {}
        for i, path in enumerate(paths):
            with Image.open(path) as image:
                sizes[i] = image.size
        categories = sorted({path.stem.split("-")[0].upper() for path in paths} | {"BAGS", "COATS", "SHIRTS"})
        for vocabulary in [v.strip() for v in args.vocabularies.split(",") if v.strip()]:
            print(f"... {vocabulary}", file=sys.stderr, flush=True)
            rows += measure(vocabulary, args, paths, sizes, categories)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else describe()
    print(
        f"# constrained decoding: tiny model, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, on {name}"
    )
    print(f"torch {torch.__version__}, {args.threads} threads; {args.repeats} runs of each mode, alternating; medians")
    print()
    print(
        "| vocabulary | tokens | mode | ms per decoding step | decode steps | images/s | answers parsed | "
        "no end token | grammar compile s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['vocabulary']} | {r['vocab']:,} | {r['mode']} | {r['step_ms']:.1f} | {r['steps']:.0f} "
            f"| {r['images_s']:.2f} | {r['parsed']}/{r['n']} | {r['truncated']} "
            f"| {r['compile_s']:.2f} |"
        )
    print()
    for vocabulary in dict.fromkeys(r["vocabulary"] for r in rows):
        free, held = (
            next(r for r in rows if r["vocabulary"] == vocabulary and r["mode"] == m) for m in ("free", "constrained")
        )
        ratio = held["step_ms"] / free["step_ms"]
        print(
            f"{vocabulary}: constrained / free time per step **{ratio:.2f}x** (goal <= {GOAL}x: "
            f"{'met' if ratio <= GOAL else 'not met'}); images/s {held['images_s'] / free['images_s']:.2f}x"
        )
    print(
        f"total {time.perf_counter() - started:.0f} s; load average (1 min) {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after"
    )


if __name__ == "__main__":
    main()
