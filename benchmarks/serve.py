"""Serving benchmark: `phi3v serve` with micro-batching on against off, at client concurrency 1, 8 and 32.

    python benchmarks/serve.py                       # tiny random model on the CPU (~2-3 min on 2 cores)
    python benchmarks/serve.py --requests 32 --repeats 1 --concurrency 1,8   # a smoke run
    python benchmarks/serve.py --device cuda --config phi-3.5-vision-instruct --num-crops 4 --max-batch-size 32

What is measured: the real service, `phi3v.serve.ServerThread` (uvicorn on a loopback port, in this process, on its
own thread and event loop), answering ``POST /v1/predict`` multipart uploads sent by an `httpx.AsyncClient` (on the
main thread's event loop) that keeps ``C`` requests in flight (a semaphore over ``--requests`` requests). Two
servers run side by side on two copies of the same model: micro-batching on (``--max-batch-size``,
``--batch-timeout-ms``) and off (``--no-batching``: one request per `generate_answers` call, the baseline); only one
is driven at a time. Per run: requests/s = requests / wall time of the run, latency = per request, from sending to
the whole response (p50, p99 by the nearest-rank method over the run's requests). ``--repeats`` runs per
(concurrency, mode), the mode order alternating between repeats (on, off, then off, on, ...) so a change in machine
load hits both alike; one untimed round of ``C`` requests per server and concurrency first. Reported: medians over
the repeats [min-max], the ratio on / off of the median requests/s, the mean batch size the server formed (from the
``/healthz`` counters), and how many answers equal the unbatched server's answer for the same photo (a correctness
check next to the speed).

Fixed answer length: as in `benchmarks/evaluate.py`, the end tokens' logits are masked on both servers' models (a
forward hook on ``lm_head``, `evaluate.suppress_end_tokens`), so every answer runs to ``--max-tokens`` tokens and a
mode cannot look faster by answering shorter.

Data: a `phi3v synth` catalog (256 px drawings, photos reshaped round-robin to square / wide / tall:
`evaluate.build_images`), ``--n-images`` of them, JPEG files sent as they are; request ``i`` sends photo ``i mod n``.

Model: ``tiny`` is the real architecture at toy width (`write_random_checkpoint`, seed 0, fp32). Full-size configs
(random weights, bf16; meant for ``--device cuda``) are written by `train_step.build_model_folder`; without
``--tokenizer`` a byte-level BPE is trained, whose ``<|image|>`` id `write_random_checkpoint` writes into config.json.
``--model DIR`` serves an existing folder instead.

The client shares this process (and its GIL) with the servers: the numbers include that cost for both modes alike;
a separate client machine would see somewhat higher rates.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import torch
import transformers

from evaluate import build_images, suppress_end_tokens  # benchmarks/evaluate.py (this folder is on sys.path)
from machine import describe
from phi3v.generation import end_token_ids
from phi3v.serve import ServeOptions, ServerThread
from train_step import build_model_folder

CONFIGS = ("tiny", "phi-3.5-vision-instruct", "phi-3-vision-128k-instruct")
MODES = ("on", "off")


@dataclass
class Run:
    """One timed run: ``requests`` requests at one concurrency against one server."""

    seconds: float
    latencies: list[float]
    answers: dict[int, str]  # request index -> raw answer
    errors: int
    batches: int
    answered: int

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def drive(url: str, photos: list[bytes], requests: int, concurrency: int) -> tuple[float, list, dict, int]:
    """Send ``requests`` predict requests keeping ``concurrency`` in flight; (seconds, latencies, answers, errors)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        answers: dict[int, str] = {}
        errors = 0

        async def one(i: int) -> None:
            nonlocal errors
            async with gate:
                started = time.perf_counter()
                response = await client.post("/v1/predict", files={"image": ("p.jpg", photos[i % len(photos)])})
                latencies.append(time.perf_counter() - started)
                if response.status_code == 200:
                    answers[i] = response.json()["raw"]
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        return time.perf_counter() - started, latencies, answers, errors


def stats_of(server: ServerThread) -> tuple[int, int]:
    stats = httpx.get(f"{server.url}/healthz").json()["stats"]
    return stats["batches"], stats["answered"]


def measure(server: ServerThread, photos: list[bytes], requests: int, concurrency: int) -> Run:
    batches, answered = stats_of(server)
    seconds, latencies, answers, errors = asyncio.run(drive(server.url, photos, requests, concurrency))
    batches_after, answered_after = stats_of(server)
    return Run(seconds, latencies, answers, errors, batches_after - batches, answered_after - answered)


def _median_range(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=CONFIGS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on a GPU that has it, else fp32")
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    parser.add_argument("--requests", type=int, default=96, help="requests per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per (concurrency, mode)")
    parser.add_argument("--n-images", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=22, help="22 = a real answer with the tiny tokenizer")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batching server's --max-batch-size")
    parser.add_argument("--batch-timeout-ms", type=float, default=10.0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for full-size configs")
    parser.add_argument("--model", default=None, help="an existing model folder (skips writing a random one)")
    parser.add_argument("--work", default=None, help="folder for the model and images (default: a temporary one)")
    args = parser.parse_args()

    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency: integers expected, got {args.concurrency!r}")
    if not levels or min(levels) < 1 or args.requests < 1 or args.repeats < 1 or args.n_images < 1:
        parser.error("concurrencies, --requests, --repeats and --n-images must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    transformers.logging.set_verbosity_error()

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="phi3v-bench-serve-") as tmp:
        root = Path(args.work) if args.work is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print("... set-up", file=sys.stderr, flush=True)
        if args.model is not None:
            model_dir = Path(args.model)
        else:
            model_dir = build_model_folder(root, args.config, args.num_crops, args.tokenizer)
        photos = [path.read_bytes() for path in build_images(root, args.n_images)]
        common = {
            "model": str(model_dir),
            "port": 0,
            "device": args.device,
            "dtype": args.dtype,
            "num_crops": args.num_crops,
            "max_new_tokens": args.max_tokens,
            "max_tokens_limit": max(256, args.max_tokens),
            "max_queue": max(levels) * 4,
            "request_timeout": 600.0,
            "log_level": "warning",
            "access_log": False,
        }
        servers = {
            "on": ServerThread(
                ServeOptions(**common, max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms)
            ),
            "off": ServerThread(ServeOptions(**common, batching=False)),
        }
        for mode, server in servers.items():
            print(f"... starting the server with batching {mode}", file=sys.stderr, flush=True)
            server.start()
            runner = server.service.runner
            suppress_end_tokens(runner.loaded.model, end_token_ids(runner.processor))
        setup_s = time.perf_counter() - started
        try:
            runs: dict[tuple[int, str], list[Run]] = {(c, m): [] for c in levels for m in MODES}
            for concurrency in levels:
                for mode in MODES:  # warm-up: one untimed round at this concurrency
                    measure(servers[mode], photos, concurrency, concurrency)
                for repeat in range(args.repeats):
                    for mode in MODES if repeat % 2 == 0 else tuple(reversed(MODES)):
                        run = measure(servers[mode], photos, args.requests, concurrency)
                        runs[(concurrency, mode)].append(run)
                        print(
                            f"... concurrency {concurrency}, batching {mode}, repeat {repeat + 1}: "
                            f"{run.rate:.2f} requests/s, p50 {run.percentile(50) * 1000:.0f} ms",
                            file=sys.stderr,
                            flush=True,
                        )
            model = servers["off"].service.runner.loaded.model
        finally:
            for server in servers.values():
                server.stop()

    # ---------------------------------------------------------------------------------------------------- tables
    cuda = args.device == "cuda"
    name = torch.cuda.get_device_name(0) if cuda else describe()
    dtype = str(model.dtype).removeprefix("torch.")
    print(
        f"# serve: {args.config}, {dtype}, num_crops {args.num_crops}, max_tokens {args.max_tokens} (end tokens "
        f"masked: fixed length), {args.n_images} synth photos (square / wide / tall), on {name}"
    )
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"POST /v1/predict multipart, {args.requests} requests per run, {args.repeats} repeats per (concurrency, "
        f"mode) in alternating order, medians [min-max]; batching on = --max-batch-size {args.max_batch_size} "
        f"--batch-timeout-ms {args.batch_timeout_ms:g}, off = --no-batching; set-up {setup_s:.0f} s"
    )
    print()
    print(
        "| concurrency | batching | requests/s | p50 latency ms | p99 latency ms | mean batch | non-200 "
        "| answers = unbatched | requests/s on / off |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    reference: dict[int, str] = {}
    for run in (r for c in levels for r in runs[(c, "off")]):
        for i, answer in run.answers.items():
            reference.setdefault(i % len(photos), answer)
    for concurrency in levels:
        rates = {m: statistics.median(r.rate for r in runs[(concurrency, m)]) for m in MODES}
        for mode in MODES:
            group = runs[(concurrency, mode)]
            same = sum(a == reference.get(i % len(photos)) for r in group for i, a in r.answers.items())
            total = sum(len(r.answers) for r in group)
            mean_batch = sum(r.answered for r in group) / max(sum(r.batches for r in group), 1)
            ratio = f"**{rates['on'] / rates['off']:.2f}x**" if mode == "on" else ""
            print(
                f"| {concurrency} | {mode} | {_median_range([r.rate for r in group], 2)} "
                f"| {_median_range([r.percentile(50) * 1000 for r in group], 0)} "
                f"| {_median_range([r.percentile(99) * 1000 for r in group], 0)} | {mean_batch:.1f} "
                f"| {sum(r.errors for r in group)} | {same}/{total} | {ratio} |"
            )
    print()
    print(
        f"- total {time.perf_counter() - started:.0f} s; load average (1 min) {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after (other work on the machine, if any)"
    )


if __name__ == "__main__":
    main()
