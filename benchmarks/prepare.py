"""Benchmark: catalog image download of `phi3v prepare` against a reference-style sequential downloader.

    python benchmarks/prepare.py                      # 2,000 images, 3 repeats, appends to benchmarks/RESULTS.md
    python benchmarks/prepare.py --n 500 --no-record  # quick look

Setup: a `tests/http_server.LoopbackServer` in a separate process (spawned, so it does not share the client's GIL;
it still shares the machine's cores) serves N distinct photo-like 800×800 JPEGs (~120 KB, generated once in its
memory) with a fixed latency added to every request. Measured:

(a) phi3v: `phi3v.data.download.fetch_sources` with the default `DownloadConfig` (32 concurrent requests, 2 decode
    threads, full decode + verification, content-hash store with fsync) into a fresh temporary store;
(b) baseline, like the reference recipe (`generate_dataset.py`): one request at a time with a sync `httpx.Client`,
    `Image.open` + full decode, `save` as `{i}.jpg` (a PIL round trip at the default JPEG quality), on a subset;
(c) phi3v with `concurrency=1` on the same subset (what concurrency alone buys, at equal per-image work).

Throughput is images/s over the wall time of the whole run; medians over the repeats. CPU time of the client
process and of the server process is recorded too, and single-thread costs of the per-image steps, to explain
where the ceiling is on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
HEADING = "## Catalog download (phi3v prepare)"

GOAL_RATE = 150.0  # images/s
GOAL_RATIO = 20.0  # × the sequential baseline


# --------------------------------------------------------------------------------------------------------------
# images and the server process
# --------------------------------------------------------------------------------------------------------------


def make_images(n: int, side: int = 800, quality: int = 85) -> list[bytes]:
    """N distinct photo-like JPEGs: crops of one smooth colour field with sensor-like grain, at distinct offsets."""
    import numpy as np
    from PIL import Image

    per_row = 50
    step = 48
    span = side + step * (per_row - 1)
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(span // 30, span // 30, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((span, span), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.normal(0.0, 6.0, size=field.shape)
    base = Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))
    out = []
    for i in range(n):
        x, y = (i % per_row) * step, (i // per_row) % per_row * step
        crop = base.crop((x, y, x + side, y + side))
        if (i // (per_row * per_row)) % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def serve(conn, n: int, latency: float) -> None:
    """Server process: generate the images, serve them, answer "cpu" with this process's CPU time, stop on "stop"."""
    sys.path.insert(0, str(REPO / "tests"))
    from http_server import LoopbackServer

    images = make_images(n)
    digests = {hashlib.sha256(data).hexdigest() for data in images}
    with LoopbackServer() as server:
        for i, data in enumerate(images):
            server.add(f"/img/{i}.jpg", data, delay=latency)
        conn.send(
            {
                "port": server.port,
                "distinct": len(digests),
                "mean_bytes": sum(map(len, images)) / n,
                "min_bytes": min(map(len, images)),
                "max_bytes": max(map(len, images)),
            }
        )
        while True:
            command = conn.recv()
            if command == "cpu":
                conn.send(time.process_time())
            elif command == "requests":
                conn.send(len(server.requests))
            else:
                break


class ServerProcess:
    def __init__(self, n: int, latency: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, n, latency), daemon=True)
        self.process.start()
        self.info = self.conn.recv()
        self.port = self.info["port"]

    def url(self, i: int, tag: str) -> str:
        return f"http://127.0.0.1:{self.port}/img/{i}.jpg?run={tag}"

    def cpu(self) -> float:
        self.conn.send("cpu")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send("stop")
        self.process.join(10)


# --------------------------------------------------------------------------------------------------------------
# the two downloaders
# --------------------------------------------------------------------------------------------------------------


def run_phi3v(urls: list[str], config, fsync: bool = True) -> tuple[float, int]:
    """Returns (wall seconds, images stored)."""
    from phi3v.data.download import ImageStore, fetch_sources

    ok = 0

    def count(result) -> None:
        nonlocal ok
        ok += result.ok

    with tempfile.TemporaryDirectory(prefix="phi3v-bench-") as tmp:
        store = ImageStore(Path(tmp) / "images", fsync=fsync)
        started = time.perf_counter()
        fetch_sources(urls, store, config, count)
        return time.perf_counter() - started, ok


def run_phi3v_http_only(urls: list[str], config) -> tuple[float, int]:
    """Diagnostic: phi3v with decode/verify/store replaced by a sha256 stub (what the HTTP side alone costs)."""
    import phi3v.data.download as download

    original = download._verify_and_store

    def stub(data: bytes, store, config, content_type=None):
        digest = hashlib.sha256(data).hexdigest()
        return download._Stored(digest, store.relpath_for(digest), 0, 0, "stub")

    download._verify_and_store = stub
    try:
        return run_phi3v(urls, config)
    finally:
        download._verify_and_store = original


def run_phi3v_one_pool(urls: list[str], config) -> tuple[float, int]:
    """phi3v with a plain `httpx.AsyncClient` (one connection pool of `concurrency`) instead of its own client."""
    import asyncio

    import httpx

    from phi3v.data.download import ImageStore, fetch_all

    ok = 0

    def count(result) -> None:
        nonlocal ok
        ok += result.ok

    async def main(store) -> None:
        limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=config.timeout, follow_redirects=True) as client:
            await fetch_all(urls, store, config, count, client=client)

    with tempfile.TemporaryDirectory(prefix="phi3v-bench-") as tmp:
        store = ImageStore(Path(tmp) / "images")
        started = time.perf_counter()
        asyncio.run(main(store))
        return time.perf_counter() - started, ok


def run_baseline(urls: list[str]) -> tuple[float, int]:
    """The reference recipe's loop: sequential GET (no timeout, no retry), PIL open + decode, save `{i}.jpg`."""
    import httpx
    from PIL import Image

    ok = 0
    with tempfile.TemporaryDirectory(prefix="phi3v-bench-ref-") as tmp, httpx.Client(timeout=None) as client:
        started = time.perf_counter()
        for i, url in enumerate(urls):
            try:
                response = client.get(url)
                if response.status_code != 200:
                    continue
                image = Image.open(io.BytesIO(response.content))
                image.load()
                image.save(os.path.join(tmp, f"{i}.jpg"))
                ok += 1
            except Exception:  # the reference drops failures silently
                continue
        return time.perf_counter() - started, ok


def timed(server: ServerProcess, fn, *args) -> dict:
    cpu0, server0 = time.process_time(), server.cpu()
    wall, ok = fn(*args)
    return {
        "wall": wall,
        "ok": ok,
        "client_cpu": time.process_time() - cpu0,
        "server_cpu": server.cpu() - server0,
    }


# --------------------------------------------------------------------------------------------------------------
# single-thread step costs (the "profile")
# --------------------------------------------------------------------------------------------------------------


def step_costs(images: list[bytes], rounds: int = 5) -> dict[str, float]:
    """Median ms per image of the per-image steps: one thread, steps interleaved image by image, fresh stores."""
    from PIL import Image

    from phi3v.data.download import DownloadConfig, ImageStore, _verify_and_store

    def decode(data: bytes) -> None:
        with Image.open(io.BytesIO(data)) as image:
            image.load()

    def decode_draft(data: bytes) -> None:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (image.width // 8, image.height // 8))
            image.load()

    def reference(data: bytes) -> None:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image.save(io.BytesIO(), "JPEG")

    config = DownloadConfig()
    names = [
        "JPEG full decode (Image.open + load)",
        "JPEG decode at 1/8 scale (draft), for comparison",
        "sha256 of the file",
        "ImageStore.put_bytes (write + fsync + rename)",
        "ImageStore.put_bytes without fsync",
        "phi3v worker step: verify + store (fast path, fsync)",
        "reference: decode + save q75",
    ]
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="phi3v-bench-steps-") as tmp:
        for r in range(rounds):
            stores = [ImageStore(Path(tmp) / f"{r}-{k}", fsync=k != 1) for k in range(3)]
            steps = [
                decode,
                decode_draft,
                lambda d: hashlib.sha256(d).hexdigest(),
                stores[0].put_bytes,
                stores[1].put_bytes,
                lambda d, store=stores[2]: _verify_and_store(d, store, config),
                reference,
            ]
            for data in images:
                for name, step in zip(names, steps, strict=True):
                    started = time.perf_counter()
                    step(data)
                    times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def versions() -> str:
    import httpcore
    import httpx
    import PIL

    return (
        f"Python {platform.python_version()}, httpx {httpx.__version__}, httpcore {httpcore.__version__}, "
        f"Pillow {PIL.__version__}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="images for phi3v (default: %(default)s)")
    parser.add_argument("--baseline-n", type=int, default=200, help="images for the baseline (default: %(default)s)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added per request (default: 0.02)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (default: %(default)s)")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from phi3v.data.download import DownloadConfig
    from phi3v.model import image_processing  # noqa: F401  (imports torch once, outside the timed runs)

    print(f"generating {args.n} images in the server process ...", flush=True)
    server = ServerProcess(args.n, args.latency)
    info = server.info
    if info["distinct"] != args.n:
        raise SystemExit(f"image generator gave {info['distinct']} distinct images for {args.n}")
    config = DownloadConfig()
    sequential = DownloadConfig(concurrency=1)
    rows: dict[str, list[dict]] = {
        "phi3v": [],
        "baseline": [],
        "phi3v, concurrency=1": [],
        "phi3v, no fsync": [],
        "phi3v, one plain httpx pool of 32": [],
        "diagnostic: phi3v HTTP only (decode + store stubbed)": [],
    }
    load_before = os.getloadavg()
    try:
        # warm-up: connections, thread pools, imports
        run_phi3v([server.url(i, "warm") for i in range(min(64, args.n))], config)
        run_baseline([server.url(i, "warm-ref") for i in range(min(8, args.n))])
        subset = min(args.baseline_n, args.n)
        for r in range(args.repeats):
            rows["phi3v"].append(timed(server, run_phi3v, [server.url(i, f"p{r}") for i in range(args.n)], config))
            rows["baseline"].append(timed(server, run_baseline, [server.url(i, f"b{r}") for i in range(subset)]))
            print(
                f"repeat {r + 1}: phi3v {args.n / rows['phi3v'][-1]['wall']:.1f} img/s, "
                f"baseline {subset / rows['baseline'][-1]['wall']:.1f} img/s",
                flush=True,
            )
        rows["phi3v, concurrency=1"].append(
            timed(server, run_phi3v, [server.url(i, "seq") for i in range(subset)], sequential)
        )
        rows["phi3v, no fsync"].append(
            timed(server, run_phi3v, [server.url(i, "nofsync") for i in range(args.n)], config, False)
        )
        rows["phi3v, one plain httpx pool of 32"].append(
            timed(server, run_phi3v_one_pool, [server.url(i, "onepool") for i in range(args.n)], config)
        )
        rows["diagnostic: phi3v HTTP only (decode + store stubbed)"].append(
            timed(server, run_phi3v_http_only, [server.url(i, "http") for i in range(args.n)], config)
        )
        load_after = os.getloadavg()
    finally:
        server.close()
    steps = step_costs(make_images(40))

    counts = {name: args.n for name in rows}
    counts["baseline"] = counts["phi3v, concurrency=1"] = subset
    summary = {}
    for name, runs in rows.items():
        n = counts[name]
        bad = [run["ok"] for run in runs if run["ok"] != n]
        if bad:
            raise SystemExit(f"{name}: only {bad} of {n} images stored")
        rates = [n / run["wall"] for run in runs]
        summary[name] = {
            "n": n,
            "rate": statistics.median(rates),
            "rates": rates,
            "client_cores": statistics.median(run["client_cpu"] / run["wall"] for run in runs),
            "server_cores": statistics.median(run["server_cpu"] / run["wall"] for run in runs),
            "client_ms": statistics.median(1000 * run["client_cpu"] / n for run in runs),
            "server_ms": statistics.median(1000 * run["server_cpu"] / n for run in runs),
        }
    ratio = summary["phi3v"]["rate"] / summary["baseline"]["rate"]

    lines = [
        "| downloader | images | images/s (median) | runs | client CPU, cores | server CPU, cores "
        "| client CPU ms/img | server CPU ms/img |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        runs = ", ".join(f"{rate:.1f}" for rate in s["rates"])
        lines.append(
            f"| {name} | {s['n']} | {s['rate']:.1f} | {runs} | {s['client_cores']:.2f} | {s['server_cores']:.2f} "
            f"| {s['client_ms']:.2f} | {s['server_ms']:.2f} |"
        )
    table = "\n".join(lines)
    step_lines = ["| step (one thread, 800×800 JPEG) | ms per image |", "|---|---:|"]
    step_lines += [f"| {name} | {ms:.2f} |" for name, ms in steps.items()]
    step_table = "\n".join(step_lines)
    rate = summary["phi3v"]["rate"]
    cpu_per_image = summary["phi3v"]["client_ms"] + summary["phi3v"]["server_ms"]
    ceiling = 1000 * (os.cpu_count() or 1) / cpu_per_image
    http_only = summary["diagnostic: phi3v HTTP only (decode + store stubbed)"]
    needed = GOAL_RATIO * summary["baseline"]["rate"]
    cores = os.cpu_count() or 1
    decode_ms = steps["JPEG full decode (Image.open + load)"]
    latency_cap = config.concurrency / args.latency if args.latency > 0 else float("inf")
    http_bound = (
        f"bounded by concurrency / latency = {latency_cap:.0f} images/s"
        if http_only["rate"] > 0.8 * latency_cap
        else f"event-loop thread busy, {http_only['client_cores']:.2f} cores"
    )
    verdict = [
        f"- phi3v: **{rate:.1f} images/s** → goal ≥ {GOAL_RATE:.0f}: {'met' if rate >= GOAL_RATE else 'NOT met'}.",
        f"- phi3v / baseline: **{ratio:.1f}×** → goal ≥ {GOAL_RATIO:.0f}×: "
        f"{'met' if ratio >= GOAL_RATIO else 'NOT met'}.",
        f"- Where the time goes: the baseline spends {1000 / summary['baseline']['rate']:.1f} ms per image, "
        f"{args.latency * 1000:.0f} ms of it waiting for the server and {summary['baseline']['client_ms']:.1f} ms on "
        f"the CPU, so it is latency-bound; phi3v overlaps the waiting and is CPU-bound: {cpu_per_image:.1f} ms of "
        f"CPU per image (client {summary['phi3v']['client_ms']:.1f} + server {summary['phi3v']['server_ms']:.1f}), "
        f"i.e. at most ~{ceiling:.0f} images/s on {cores} cores with both cores busy all the time; it reaches "
        f"{rate / ceiling:.0%} of that (the event loop's Python work and the decode threads share one GIL). "
        f"The HTTP side alone (decode + store stubbed out) reaches {http_only['rate']:.0f} images/s at "
        f"{http_only['client_ms']:.1f} ms of client CPU per image ({http_bound}).",
    ]
    if ratio < GOAL_RATIO:
        floor = decode_ms + http_only["client_ms"] + http_only["server_ms"]
        verdict.append(
            f"- Why {GOAL_RATIO:.0f}× is out of reach here: it needs {needed:.0f} images/s, i.e. at most "
            f"{1000 * cores / needed:.1f} ms of CPU per image on {cores} cores, but the full decode alone costs "
            f"{decode_ms:.1f} ms and the HTTP side {http_only['client_ms']:.1f} + {http_only['server_ms']:.1f} ms "
            f"(client + server): {floor:.1f} ms before storing anything. The ratio is set by the core count and "
            "the latency (the baseline's time per image grows with the latency, phi3v's does not), not by "
            "waiting."
        )
    print()
    print(table)
    print()
    print(step_table)
    print()
    print("\n".join(verdict))

    if not args.no_record:
        machine = (
            f"- Machine: {cpu_model()}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}; "
            f"{versions()}"
        )
        setup = (
            f"- Setup: `python benchmarks/prepare.py --n {args.n} --baseline-n {args.baseline_n} --latency "
            f"{args.latency} --repeats {args.repeats}`. Server: `tests/http_server.LoopbackServer` in a separate "
            f"(spawned) process, {args.n} distinct 800×800 JPEGs of {info['mean_bytes'] / 1024:.0f} KiB on average "
            f"({info['min_bytes'] / 1024:.0f}–{info['max_bytes'] / 1024:.0f} KiB), {args.latency * 1000:.0f} ms "
            "added to every request, HTTP/1.1 keep-alive. phi3v: default `DownloadConfig` (concurrency 32, "
            "2 workers, full decode, fsync'd content-hash store). Baseline: sync `httpx.Client`, one request at a "
            "time, `Image.open` + `load` + `save(f'{i}.jpg')`, on the first "
            f"{subset} images. Medians over {args.repeats} runs (one run for the last four rows). Load average "
            f"(1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after (other work on the machine, if any)."
        )
        existing = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
        title = (
            HEADING
            if HEADING not in existing
            else f"### Same benchmark at {args.latency * 1000:.0f} ms latency per request"
        )
        section = "\n".join(
            [
                "",
                title,
                "",
                f"Measured {datetime.date.today().isoformat()} with `benchmarks/prepare.py`.",
                "",
                machine,
                setup,
                "",
                table,
                "",
                step_table,
                "",
                *verdict,
                "",
            ]
        )
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write(section)
        print(f"\nappended to {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
