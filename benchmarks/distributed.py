"""Distributed engines benchmark: `phi3v train` at 2 processes under DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 (full
fine-tuning), and LoRA under DDP with and without the unused-parameter search — per-rank peak memory and throughput,
as ratios to DDP measured in the same run.

    python benchmarks/distributed.py                       # 2 CPU processes (gloo), tiny model (~6 min on 2 cores)
    python benchmarks/distributed.py --engines ddp,fsdp2 --repeats 3

Each run is a real `phi3v train` launched exactly as docs/train.md says (`torchrun --nproc_per_node 2 -m
phi3v.cli train ...`, `accelerate launch --config_file configs/launch/fsdp2.yaml ...`, `... --deepspeed
configs/launch/zero2.json`) with GPUs hidden (``CUDA_VISIBLE_DEVICES=""``) and one thread per process, on a
`phi3v synth` catalog (square / wide / tall photos) prepared in a temporary folder. Runs are interleaved ABBA
over ``--repeats`` rounds (A B C, C B A, ...) so a change in machine load hits every engine alike. Per run,
from its ``training_summary.json`` and log:

- ``loaded``: each rank's peak RSS once the model is loaded and wrapped by the engine (before the first step);
  ``end``: the peak over the whole run (the CPU analogue of peak device memory);
- images/s: the median over logged steps of ``images_per_second`` (all ranks; the first step left out as warm-up
  when there are more);
- the final loss (all engines see the same batches: equal up to rounding).

On the tiny model (272 k parameters) the RSS figures are the interpreter's; what loading costs per rank on a larger
model is measured by `tests/test_train_engines.py`'s load probe (FSDP2 with and without
``cpu_ram_efficient_loading``, ~100 M parameters, no training step: a training step of that model on 2 CPU
processes does not fit this machine's 24 GiB).

Quoted: medians over the repeats, and ratios to DDP (or, for LoRA, to the run with the search on). The first
DeepSpeed launch on a machine builds DeepSpeed's CPU shared-memory op (~1-2 min, cached afterwards); an untimed
warm-up launch does it before the measured rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import machine
from train_step import build_model_folder, build_prepared_catalog

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "configs" / "launch"
BIN = Path(sys.executable).parent
ENGINES = ("ddp", "fsdp2", "zero2", "zero3", "lora-ddp", "lora-ddp-search")


def launch(engine: str) -> list[str]:
    """The launch command of ``engine`` (2 processes), up to and including ``phi3v.cli train``."""
    if engine == "fsdp2":
        return [
            str(BIN / "accelerate"),
            *("launch", "--config_file", str(LAUNCH / "fsdp2.yaml"), "--num_processes", "2"),
            *("--mixed_precision", "no", "--main_process_port", "29531", "-m", "phi3v.cli", "train"),
        ]
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "phi3v.cli", "train"]
    if engine.startswith("zero"):
        command += ["--deepspeed", str(LAUNCH / f"{engine}.json")]
    return command


def train_args(engine: str, model: Path, data: Path, out: Path, steps: int) -> list[str]:
    options = {
        "model": model,
        "data": data,
        "output_dir": out,
        "mode": "lora" if engine.startswith("lora") else "full",
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "train_sampling_strategy": "sequential",
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "disable_tqdm": "true",
        "learning_rate": 1e-3,
    }
    if engine == "lora-ddp-search":
        options["ddp_find_unused_parameters"] = "true"
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def run_once(engine: str, model: Path, data: Path, out: Path, steps: int) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        launch(engine) + train_args(engine, model, data, out, steps), env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    summary = json.loads((out / "training_summary.json").read_text())
    logs = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    steps_logged = [row for row in logs if "loss" in row]
    return {
        "loaded": summary["rank_peak_rss_mib"]["loaded"],
        "end": summary["rank_peak_rss_mib"]["end"],
        "images_per_second": statistics.median(row["images_per_second"] for row in steps_logged[1:] or steps_logged),
        "final_loss": steps_logged[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {', '.join(ENGINES)}")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA rounds (default 2)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    parser.add_argument("--rows", type=int, default=48, help="catalog rows (default 48)")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines: {', '.join(unknown)}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build_model_folder(folder, "tiny", 4, None)
        data = build_prepared_catalog(folder / "data", args.rows)
        if any(e.startswith("zero") for e in engines):  # builds DeepSpeed's CPU op once, untimed
            run_once("zero2", model, data, folder / "warmup", 2)
        results: dict[str, list[dict]] = {e: [] for e in engines}
        for round_ in range(args.repeats):
            order = engines if round_ % 2 == 0 else engines[::-1]
            for engine in order:
                print(f"round {round_ + 1}/{args.repeats}: {engine}", file=sys.stderr, flush=True)
                out = folder / f"{engine}-{round_}"
                results[engine].append(run_once(engine, model, data, out, args.steps))

    def med(engine: str, key: str, rank: int | None = None) -> float:
        values = [r[key][rank] if rank is not None else r[key] for r in results[engine]]
        return statistics.median(values)

    print(f"machine: {machine.describe()}")
    print(f"model: tiny, 2 processes, {args.steps} steps, {args.repeats} rounds (medians)")
    print()
    print(
        "| engine | rank 0 peak RSS loaded / end (MiB) | rank 1 peak RSS loaded / end (MiB) | images/s | "
        "images/s vs baseline | final loss |"
    )
    print("|---|---|---|---|---|---|")
    for engine in engines:
        base = "lora-ddp-search" if engine.startswith("lora") else "ddp"
        ratio = (
            f"{med(engine, 'images_per_second') / med(base, 'images_per_second'):.2f}x {base}"
            if base in results
            else "n/a"
        )
        print(
            f"| {engine} | {med(engine, 'loaded', 0):.0f} / {med(engine, 'end', 0):.0f} | "
            f"{med(engine, 'loaded', 1):.0f} / {med(engine, 'end', 1):.0f} | {med(engine, 'images_per_second'):.2f} | "
            f"{ratio} | {med(engine, 'final_loss'):.4f} |"
        )


if __name__ == "__main__":
    main()
