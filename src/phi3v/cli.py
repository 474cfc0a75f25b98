"""The `phi3v` command line.

    phi3v prepare SOURCE --out DIR [options]   catalog (hub id, CSV, Parquet, JSONL) -> validated image dataset
    phi3v synth --out DIR --n N --seed S       draw a sample catalog in the DBQ schema
    phi3v info MODEL [--check-weights]        architecture, parameter count and image-token budget of a model
    phi3v tokens WIDTH HEIGHT [--num-crops N]  crop grid and token count of an image of that size
    phi3v tokenizer DATA --out DIR            a small tokenizer trained on a prepared catalog (for init-model)
    phi3v init-model OUT [--config tiny]       a random-weight model folder (offline stand-in for a hub checkpoint)
    phi3v train --config FILE [--resume] [--key value ...]   fine-tune (LoRA / QLoRA / full / frozen vision)
    phi3v evaluate --model MODEL --data DIR --out DIR   generated answers scored against baselines + a report
    phi3v predict --model MODEL INPUTS... [--out FILE]   answers for image files, folders, URLs or a CSV column
    phi3v export --model RUN --out DIR   a trained model in the official layout, with a model card
    phi3v serve --model MODEL [--host H] [--port P]   HTTP service: /v1/predict, OpenAI /v1/chat/completions
    phi3v demo [--n N] [--epochs E]   the whole job on a drawn sample catalog, offline, on a CPU

MODEL is a folder, a hub id (e.g. microsoft/Phi-3.5-vision-instruct) or a named config (`tiny`,
`phi-3-vision-128k-instruct`, `phi-3.5-vision-instruct`). Heavy imports happen inside the commands, so `phi3v --help`
answers at once.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from phi3v import __version__


def _log_info() -> None:
    """INFO log lines on standard error, for the commands that run a stage."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per downloaded image otherwise


def _thread_count(text: str) -> int:
    """argparse type of ``--threads``."""
    from phi3v.threads import parse_thread_count

    try:
        return parse_thread_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_thread_count,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: the cores this process may use, or OMP_NUM_THREADS when set)",
    )


def _set_threads(args: argparse.Namespace) -> None:
    """Apply and log ``--threads`` (`phi3v.threads.set_threads`) before the command's heavy work."""
    from phi3v.threads import set_threads

    set_threads(args.threads)


def _options(cls: type, args: argparse.Namespace, **given: object) -> object:
    """An options dataclass from the parsed flags of the same names (``given`` sets the others)."""
    import dataclasses

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**flags, **given})


def _load_config(model: str):
    from phi3v.model.configuration import OFFICIAL_CONFIG_FILES, TINY_CONFIGS, Phi3VConfig
    from phi3v.model.hub import resolve_model_folder

    if model in TINY_CONFIGS or model in OFFICIAL_CONFIG_FILES:
        return Phi3VConfig.from_name(model), None
    folder = resolve_model_folder(model)
    return Phi3VConfig.from_pretrained(folder), folder


def cmd_info(args: argparse.Namespace) -> int:
    from phi3v.model import checkpoint
    from phi3v.model.image_processing import num_image_tokens
    from phi3v.model.modeling import Phi3VForCausalLM

    config, folder = _load_config(args.model)
    model = checkpoint.build_on_meta(Phi3VForCausalLM, config)
    shapes = checkpoint.official_shapes(model)
    total = sum(math.prod(shape) for shape in shapes.values())
    vision = config.vision_config
    rope = config.rope_parameters
    print(f"model            {args.model}")
    print(
        f"language model   Phi-3: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads, vocab {config.vocab_size}, rope {rope['rope_type']}"
    )
    print(
        f"vision tower     CLIP: {vision.num_hidden_layers} layers (features of layer "
        f"{vision.num_hidden_layers + config.vision_layer_idx + 1}), width {vision.hidden_size}, "
        f"{vision.image_size} px / {vision.patch_size} px patches"
    )
    print(f"parameters       {total:,} in {len(shapes)} checkpoint tensors")
    print(
        f"image token id   {config.image_token_id}; tokens per square image: "
        + ", ".join(f"{num_image_tokens(s, s, config.num_img_tokens)} (num_crops {s * s})" for s in (1, 2, 4))
    )
    if args.check_weights:
        if folder is None:
            print("check-weights    needs a folder or hub id, not a named config", file=sys.stderr)
            return 2
        try:
            found = checkpoint.scan_official_checkpoint(model, folder)
        except checkpoint.CheckpointError as err:
            print(f"check-weights    FAILED: {err}", file=sys.stderr)
            return 1
        print(f"check-weights    ok: {len(found)} tensors, names and shapes as expected")
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from phi3v.model.image_processing import CROP_SIZE, hd_transform_size, num_image_tokens

    width, height = hd_transform_size(args.width, args.height, args.num_crops)
    h_crops, w_crops = height // CROP_SIZE, width // CROP_SIZE
    print(
        f"image {args.width}x{args.height} at num_crops {args.num_crops}: HD {width}x{height}, "
        f"{h_crops}x{w_crops} crops, {num_image_tokens(h_crops, w_crops)} tokens"
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from phi3v.data.catalog import ColumnMap
    from phi3v.data.download import DownloadConfig
    from phi3v.prepare import PrepareOptions, prepare, summary_table

    _log_info()
    fractions = tuple(float(x) for x in args.splits.split(","))
    if len(fractions) != 3:
        raise ValueError(f"--splits takes three fractions (train,validation,test), got {args.splits!r}")
    options = PrepareOptions(
        columns=ColumnMap(
            image=args.image_column,
            title=args.title_column,
            category=args.category_column,
            price=args.price_column,
            id=args.id_column,
        ),
        hub_split=args.hub_split,
        fractions=fractions,
        seed=args.seed,
        download=DownloadConfig(
            concurrency=args.concurrency,
            timeout=args.timeout,
            retries=args.retries,
            max_bytes=args.max_bytes,
            max_side=args.max_side,
        ),
        retry_failed=not args.no_retry_failed,
        progress=not args.quiet,
    )
    report = prepare(args.source, args.out, options)
    print(summary_table(report))
    return 0 if report.kept else 1


def cmd_synth(args: argparse.Namespace) -> int:
    from phi3v.data.synthetic import make_synthetic_catalog

    catalog = make_synthetic_catalog(
        Path(args.out), args.n, seed=args.seed, base_url=args.base_url, image_size=args.image_size
    )
    print(f"wrote {args.n} products to {catalog} (images in {catalog.parent / 'images'})")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from phi3v.catalog_tokenizer import TokenizerError, train_catalog_tokenizer
    from phi3v.data.collate import DatasetError

    _log_info()
    try:
        out = train_catalog_tokenizer(args.data, args.out, args.vocab_size, args.answer_template)
    except (DatasetError, TokenizerError) as err:
        print(f"phi3v tokenizer: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote a {args.vocab_size}-token tokenizer for {args.data} to {out} (use: phi3v init-model --tokenizer {out})"
    )
    return 0


def cmd_init_model(args: argparse.Namespace) -> int:
    from phi3v.model.random_init import write_random_checkpoint

    out = write_random_checkpoint(
        args.out, args.config, seed=args.seed, num_crops=args.num_crops, tokenizer_folder=args.tokenizer
    )
    print(f"wrote a random-weight {args.config} model to {out}")
    return 0


def _end_process_group() -> None:
    """Tear down the launcher's process group before the interpreter exits: left to interpreter teardown, a rank
    (seen under DeepSpeed on CPU) can abort at exit with "terminate called without an active exception", failing a
    run that trained and saved everything."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from phi3v.config import ConfigError
    from phi3v.data.collate import DatasetError
    from phi3v.train import TrainingError, load_train_config, train

    _log_info()
    _set_threads(args)
    try:
        config = load_train_config(args.config, overrides)
        summary = train(config, resume=args.resume, progress=not args.quiet)
    except (ConfigError, DatasetError, TrainingError) as err:
        print(f"phi3v train: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    finally:
        _end_process_group()
    print(
        f"trained {summary.mode}: {summary.global_step} steps, train loss {summary.train_loss:.4f}; "
        f"outputs in {summary.output_dir}"
    )
    if summary.wandb_offline_run:
        print(f"W&B run logged offline; upload it with: wandb sync {summary.wandb_offline_run}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from phi3v.data.collate import DatasetError
    from phi3v.evaluate import EvaluateOptions, EvaluationError, evaluate
    from phi3v.inference import ModelLoadError
    from phi3v.report import verdicts

    _log_info()
    _set_threads(args)
    try:
        options = _options(EvaluateOptions, args, ablation=not args.no_ablation, progress=not args.quiet)
        result = evaluate(options)
    except (DatasetError, EvaluationError, ModelLoadError) as err:
        print(f"phi3v evaluate: {err}", file=sys.stderr)
        return 1
    counts = result.results["counts"]
    print(
        f"scored {counts['scored']} of {counts['rows']} rows of {args.split!r} "
        f"({counts['image_failures']} image failures, {counts['parse_failures']} answers not parsed)"
    )
    for sentence in verdicts(result.results):
        print(f"- {sentence}")
    for name in ("html", "markdown", "metrics", "predictions"):
        print(f"{name:12} {result.files[name]}")
    if result.wandb_offline_run:
        print(f"W&B run logged offline; upload it with: wandb sync {result.wandb_offline_run}")
    return 0


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> int:
    from phi3v.inference import ModelLoadError
    from phi3v.predict import PredictError, PredictOptions, predict

    # Inputs may come before, between and after options; argparse hands the ones after an option over as extras.
    unknown = [value for value in extra if value.startswith("-")]
    if unknown:
        print(f"phi3v predict: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    _log_info()
    _set_threads(args)
    try:
        options = _options(PredictOptions, args, inputs=[*args.inputs, *extra], progress=not args.quiet)
        result = predict(options)
    except (PredictError, ModelLoadError) as err:
        print(f"phi3v predict: {err}", file=sys.stderr)
        return 1
    summary = (
        f"predicted {len(result.rows)} inputs: {result.answered} answered ({result.parse_failures} not following "
        f"the template), {result.failed} failed"
    )
    if result.out is not None:
        print(f"{summary}; wrote {result.out}")
    else:  # standard output holds the JSON Lines
        print(summary, file=sys.stderr)
    return 0 if result.answered else 1


def cmd_export(args: argparse.Namespace) -> int:
    from phi3v.export import ExportError, ExportOptions, export
    from phi3v.inference import ModelLoadError

    _log_info()
    try:
        options = _options(ExportOptions, args)
        result = export(options)
    except (ExportError, ModelLoadError) as err:
        print(f"phi3v export: {err}", file=sys.stderr)
        return 1
    dtype = str(result.dtype).removeprefix("torch.")
    print(
        f"exported the {result.kind} model ({dtype}, {result.tensors} tensors in {len(result.shards)} shard(s), "
        f"{result.total_bytes / 1e9:.3f} GB) to {result.out}"
    )
    if result.metrics_source is not None:
        print(f"model card metrics from {result.metrics_source}")
    else:
        print("no evaluation metrics found (no --metrics, no MODEL/eval/metrics.json): the model card says so")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from phi3v.serve import ServeError, ServeOptions, serve

    _log_info()
    _set_threads(args)
    options = _options(
        ServeOptions,
        args,
        batching=not args.no_batching,
        warmup=not args.no_warmup,
        access_log=not args.no_access_log,
    )
    try:
        serve(options)
    except ServeError as err:
        print(f"phi3v serve: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from phi3v.demo import DemoError, DemoOptions, run_demo, summary_rows
    from phi3v.report import verdicts

    _log_info()
    _set_threads(args)
    options = _options(DemoOptions, args, progress=not args.quiet)
    try:
        result = run_demo(options)
    except DemoError as err:
        print(f"phi3v demo: {err}", file=sys.stderr)
        return 1
    counts = result.prepare_counts
    timing = ", ".join(f"{step} {seconds:.0f} s" for step, seconds in result.seconds.items())
    lines = [
        "",
        "phi3v demo: done",
        f"catalog   {counts['rows']} rows -> {counts['kept']} kept, {counts['failed']} failed, "
        f"{counts['duplicates']} duplicates (failures.csv in {result.data})",
        f"time      {timing}",
        "",
        f"{'test split':22} {'model':>10} {'blank images':>13}   baselines",
    ]
    lines += [
        f"{what:22} {model:>10} {blank:>13}   {baselines}"
        for what, model, blank, baselines in summary_rows(result.results)
    ]
    lines += ["", *(f"- {sentence}" for sentence in verdicts(result.results)), ""]
    lines += [f"report    {result.report}", f"model     {result.model}", f"data      {result.data}"]
    lines += [f"W&B       offline run {run} (upload: wandb sync {run})" for run in result.wandb_runs]
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi3v", description="Fine-tune Phi-3-Vision to read product photos.")
    parser.add_argument("--version", action="version", version=f"phi3v {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="catalog -> validated image dataset (resumable)")
    prep.add_argument("source", help="hub dataset id, or a .csv / .parquet / .jsonl file")
    prep.add_argument("--out", required=True, help="output folder (re-running on it resumes)")
    prep.add_argument("--image-column", default="imageurl", help="image URL or local path (default: %(default)s)")
    prep.add_argument("--title-column", default="title", help="default: %(default)s")
    prep.add_argument("--category-column", default="category3_code", help="default: %(default)s")
    prep.add_argument("--price-column", default="full_price", help="default: %(default)s")
    prep.add_argument("--id-column", default="product_code", help="default: %(default)s")
    prep.add_argument("--hub-split", default="train", help="split of a hub dataset to read (default: %(default)s)")
    prep.add_argument("--splits", default="0.8,0.1,0.1", help="train,validation,test fractions (default: %(default)s)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the split (default: %(default)s)")
    prep.add_argument("--concurrency", type=int, default=32, help="simultaneous downloads (default: %(default)s)")
    prep.add_argument("--timeout", type=float, default=20.0, help="seconds per request (default: %(default)s)")
    prep.add_argument(
        "--retries", type=int, default=3, help="extra attempts on timeouts/5xx/429 (default: %(default)s)"
    )
    prep.add_argument("--max-bytes", type=int, default=20_000_000, help="per image (default: %(default)s)")
    prep.add_argument("--max-side", type=int, default=None, help="resize on the way in: long side <= N px")
    prep.add_argument("--no-retry-failed", action="store_true", help="on a re-run, keep journaled transient failures")
    prep.add_argument("--quiet", action="store_true", help="no progress (bar or log lines)")
    prep.set_defaults(func=cmd_prepare)
    synth = commands.add_parser("synth", help="draw a sample catalog whose photos determine the labels")
    synth.add_argument("--out", required=True)
    synth.add_argument("--n", type=int, default=200, help="products (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--base-url", default=None, help="write image URLs under this base instead of local paths")
    synth.add_argument("--image-size", type=int, default=512)
    synth.set_defaults(func=cmd_synth)
    info = commands.add_parser("info", help="architecture, parameters and token budget of a model")
    info.add_argument("model", help="folder, hub id, or config name (tiny, phi-3-vision-128k-instruct, ...)")
    info.add_argument(
        "--check-weights", action="store_true", help="check every checkpoint key and shape (headers only)"
    )
    info.set_defaults(func=cmd_info)
    tokens = commands.add_parser("tokens", help="crop grid and token count of an image size")
    tokens.add_argument("width", type=int)
    tokens.add_argument("height", type=int)
    tokens.add_argument("--num-crops", type=int, default=4, help="4 for Phi-3.5-V (its default), 16 for Phi-3-V")
    tokens.set_defaults(func=cmd_tokens)
    tok = commands.add_parser(
        "tokenizer",
        help="train a small tokenizer on a prepared catalog (for init-model --tokenizer)",
        description="Train a byte-level BPE with Phi-3's special tokens and chat template on the training answers of "
        "a phi3v prepare output (plus a general corpus): the tokenizer `phi3v demo` gives its tiny model. Guide: "
        "docs/train.md.",
    )
    tok.add_argument("data", help="phi3v prepare output folder")
    tok.add_argument("--out", required=True, help="tokenizer folder (absent, empty, or an earlier tokenizer)")
    tok.add_argument("--vocab-size", type=int, default=1024, help="the tiny config's is 1024 (default: %(default)s)")
    tok.add_argument("--answer-template", default=None, help="the template the model will learn (default: phi3v's)")
    tok.set_defaults(func=cmd_tokenizer)
    init = commands.add_parser("init-model", help="write a random-weight model folder (offline stand-in)")
    init.add_argument("out")
    init.add_argument("--config", default="tiny", help="named config (default: %(default)s)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--num-crops", type=int, default=4)
    init.add_argument("--tokenizer", default=None, help="tokenizer folder (required for full-size configs)")
    init.set_defaults(func=cmd_init_model)
    train = commands.add_parser(
        "train",
        allow_abbrev=False,
        help="fine-tune on a prepared dataset",
        description="Fine-tune Phi-3-Vision. Any config key or TrainingArguments option can be overridden after "
        "the config: --learning_rate 1e-4 --lora.r 8 --report_to wandb.",
    )
    train.add_argument("--config", default=None, help="YAML config (see configs/)")
    train.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress (bar or log lines); warnings still show")
    _add_threads(train)
    train.set_defaults(func=cmd_train, takes_overrides=True)
    ev = commands.add_parser(
        "evaluate",
        help="score generated answers against baselines, with an image ablation and a report",
        description="Generate answers for a prepared split, score price / category / title against baselines and "
        "against the same model on blank images, and write metrics.json, predictions.jsonl, report.md and "
        "report.html.",
    )
    ev.add_argument("--model", required=True, help="training output, checkpoint, exported or base model, or hub id")
    ev.add_argument("--data", required=True, help="phi3v prepare output folder")
    ev.add_argument("--out", required=True, help="folder for the metrics, predictions and report")
    ev.add_argument("--split", default="test", help="split to score (default: %(default)s)")
    ev.add_argument("--batch-size", type=int, default=16, help="images per generate call (default: %(default)s)")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="answer length bound (default: %(default)s)")
    ev.add_argument(
        "--constrained",
        action="store_true",
        help="decode within the template's grammar (training categories, numeric price); free answers shown too",
    )
    ev.add_argument("--no-ablation", action="store_true", help="skip the blank-image run")
    ev.add_argument("--limit", type=int, default=None, help="score only the first N rows of the split")
    ev.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: a GPU when present)")
    ev.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    ev.add_argument("--num-crops", type=int, default=None, help="crops per image (default: the trained value)")
    ev.add_argument("--base-model", default=None, help="base model of a LoRA adapter (default: the one it names)")
    ev.add_argument(
        "--qlora-base",
        default="nf4",
        choices=["nf4", "original"],
        help="what a qlora adapter is merged into: nf4 = the NF4 weights it trained against, original = the base as "
        "stored (default: %(default)s)",
    )
    ev.add_argument("--prompt", default=None, help="default: the prompt the model was trained with")
    ev.add_argument("--answer-template", default=None, help="default: the template the model was trained with")
    ev.add_argument(
        "--override-trained",
        action="store_true",
        help="allow --num-crops / --prompt / --answer-template other than the trained ones (the report says so)",
    )
    ev.add_argument("--report-to", default="none", choices=["none", "wandb"], help="default: %(default)s")
    ev.add_argument("--wandb-project", default="phi3v", help="default: %(default)s")
    ev.add_argument("--quiet", action="store_true", help="no progress (bars or log lines)")
    _add_threads(ev)
    ev.set_defaults(func=cmd_evaluate)
    pred = commands.add_parser(
        "predict",
        help="answer product photos: files, folders, URLs or a CSV column -> JSON Lines or CSV",
        description="Answer each image with the model's trained prompt and parse the answer into title, category "
        "and price. One output row per input, in input order; an image that fails to load gets a row with its error.",
    )
    pred.add_argument("inputs", nargs="*", help="image files, folders of images, http(s) URLs")
    pred.add_argument("--model", required=True, help="training output, checkpoint, exported or base model, or hub id")
    pred.add_argument("--csv", default=None, help="CSV file with a column of image URLs or paths (relative to it)")
    pred.add_argument("--image-column", default=None, help="the CSV column holding the images")
    pred.add_argument("--recursive", action="store_true", help="take images from sub-folders of a folder too")
    pred.add_argument("--out", default=None, help="output file: .csv for CSV, else JSON Lines (default: stdout)")
    pred.add_argument("--batch-size", type=int, default=8, help="images per generate call (default: %(default)s)")
    pred.add_argument("--max-new-tokens", type=int, default=64, help="answer length bound (default: %(default)s)")
    pred.add_argument(
        "--constrained", action="store_true", help="decode within the template's grammar (training categories)"
    )
    pred.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: a GPU when present)")
    pred.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    pred.add_argument("--num-crops", type=int, default=None, help="crops per image (default: the trained value)")
    pred.add_argument("--base-model", default=None, help="base model of a LoRA adapter (default: the one it names)")
    pred.add_argument(
        "--qlora-base",
        default="nf4",
        choices=["nf4", "original"],
        help="what a qlora adapter is merged into: nf4 = the NF4 weights it trained against, original = the base as "
        "stored (default: %(default)s)",
    )
    pred.add_argument("--override-trained", action="store_true", help="allow a --num-crops other than the trained one")
    pred.add_argument("--timeout", type=float, default=20.0, help="seconds per download attempt (default: %(default)s)")
    pred.add_argument("--retries", type=int, default=2, help="extra download attempts (default: %(default)s)")
    pred.add_argument("--max-bytes", type=int, default=20_000_000, help="largest download (default: %(default)s)")
    pred.add_argument("--quiet", action="store_true", help="no progress (bar or log lines)")
    _add_threads(pred)
    pred.set_defaults(func=cmd_predict, takes_overrides=True)  # extras: inputs given after options
    exp = commands.add_parser(
        "export",
        help="a trained model as one folder in the official Phi-3-V layout, with a model card",
        description="Merge a LoRA adapter into its base (or take full weights) and write sharded safetensors, "
        "config, processor, generation config with the right stop tokens, train_config.yaml and a model card.",
    )
    exp.add_argument("--model", required=True, help="phi3v train output, checkpoint-N folder or earlier export")
    exp.add_argument("--out", required=True, help="export folder (must be empty or absent unless --overwrite)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default: %(default)s)")
    exp.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: the dtype of the checkpoint the weights came from (default: %(default)s)",
    )
    exp.add_argument(
        "--metrics", default=None, help="metrics.json for the model card (default: MODEL/eval/metrics.json)"
    )
    exp.add_argument("--base-model", default=None, help="base model of a LoRA adapter (default: the one it names)")
    exp.add_argument(
        "--qlora-base",
        default="nf4",
        choices=["nf4", "original"],
        help="what a qlora adapter is merged into: nf4 = the NF4 weights it trained against, original = the base as "
        "stored (default: %(default)s)",
    )
    exp.add_argument("--device", default="cpu", help="where the adapter is merged (default: %(default)s)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    exp.set_defaults(func=cmd_export)
    srv = commands.add_parser(
        "serve",
        help="an HTTP service answering photos (/v1/predict, OpenAI /v1/chat/completions), micro-batched",
        description="Serve a model over HTTP: POST /v1/predict (multipart or base64 JSON), POST "
        "/v1/chat/completions (OpenAI format, one image), GET /healthz, GET /v1/models. Concurrent requests are "
        "answered in batches. Guide: docs/serve.md.",
    )
    srv.add_argument("--model", required=True, help="training output, checkpoint, exported or base model, or hub id")
    srv.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0: all) (default: %(default)s)")
    srv.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    srv.add_argument("--served-model-name", default=None, help="model id in responses (default: the folder name)")
    srv.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: a GPU when present)")
    srv.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    srv.add_argument("--num-crops", type=int, default=None, help="crops per image (default: the trained value)")
    srv.add_argument("--base-model", default=None, help="base model of a LoRA adapter (default: the one it names)")
    srv.add_argument(
        "--qlora-base",
        default="nf4",
        choices=["nf4", "original"],
        help="what a qlora adapter is merged into: nf4 = the NF4 weights it trained against, original = the base as "
        "stored (default: %(default)s)",
    )
    srv.add_argument("--prompt", default=None, help="default: the prompt the model was trained with")
    srv.add_argument("--answer-template", default=None, help="default: the template the model was trained with")
    srv.add_argument(
        "--override-trained",
        action="store_true",
        help="allow --num-crops / --prompt / --answer-template other than the trained ones",
    )
    srv.add_argument("--max-batch-size", type=int, default=8, help="requests per generate call (default: %(default)s)")
    srv.add_argument(
        "--batch-timeout-ms", type=float, default=10.0, help="most wait for a batch to fill (default: %(default)s)"
    )
    srv.add_argument("--no-batching", action="store_true", help="one request per generate call")
    srv.add_argument("--max-queue", type=int, default=64, help="waiting requests; more get 503 (default: %(default)s)")
    srv.add_argument("--max-new-tokens", type=int, default=64, help="default max_tokens (default: %(default)s)")
    srv.add_argument("--max-tokens-limit", type=int, default=256, help="largest max_tokens (default: %(default)s)")
    srv.add_argument("--request-timeout", type=float, default=120.0, help="seconds, else 504 (default: %(default)s)")
    srv.add_argument("--max-body-bytes", type=int, default=20_000_000, help="else 413 (default: %(default)s)")
    srv.add_argument("--max-image-pixels", type=int, default=25_000_000, help="else 422 (default: %(default)s)")
    srv.add_argument("--max-prompt-chars", type=int, default=4000, help="chat text, else 422 (default: %(default)s)")
    srv.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (public hosts only)")
    srv.add_argument("--remote-image-timeout", type=float, default=10.0, help="seconds (default: %(default)s)")
    srv.add_argument("--remote-image-max-bytes", type=int, default=20_000_000, help="default: %(default)s")
    srv.add_argument("--no-warmup", action="store_true", help="report ready without a first blank-image answer")
    srv.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's"
    )
    srv.add_argument("--no-access-log", action="store_true", help="no line per request")
    _add_threads(srv)
    srv.set_defaults(func=cmd_serve)
    demo = commands.add_parser(
        "demo", help="the whole job on a drawn sample catalog: prepare, train, evaluate (offline, CPU, minutes)"
    )
    demo.add_argument("--out", default="runs/demo", help="folder for everything (default: %(default)s)")
    demo.add_argument("--n", type=int, default=3000, help="products in the drawn catalog (default: %(default)s)")
    demo.add_argument("--epochs", type=float, default=3.0, help="training epochs (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--catalog", default=None, help="a real catalog (hub id or file) instead of the drawn one")
    demo.add_argument("--model", default=None, help="a real base model (hub id or folder), trained with LoRA")
    demo.add_argument("--report-to", default="wandb", choices=["wandb", "none"], help="W&B: offline without a key")
    demo.add_argument("--quiet", action="store_true", help="no progress (bars or log lines)")
    _add_threads(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "takes_overrides", False):
            return args.func(args, extra)
        return args.func(args)
    except (OSError, ValueError) as err:
        print(f"phi3v {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
