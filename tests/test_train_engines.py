"""FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 for real: 2 CPU processes over gloo, started with the launch commands that
docs/train.md gives (`accelerate launch --config_file configs/launch/fsdp2.yaml`, `torchrun ... --deepspeed
configs/launch/zero{2,3}.json`), GPUs hidden so the test is the same on every machine.

Each engine's run is SIGKILLed after a complete checkpoint (in the engine's own sharded format), resumed, and its
final save (one official-layout `model.safetensors`, consolidated from the shards) compared with a single-process
run on the same data. The slow tests run once each (not per mode): they are the suite's most expensive.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phi3v.train import load_train_config, train
from train_helpers import kill_at_checkpoint, logged_losses, tiny_config_args

LAUNCH = Path(__file__).resolve().parents[1] / "configs" / "launch"
BIN = Path(sys.executable).parent
# 6 steps of 4 samples (2 per process), checkpoints every 2; sequential order, so 1 process x 4 sees the same batches
COMMON = {
    "mode": "full",
    "max_steps": 6,
    "save_steps": 2,
    "eval_strategy": "no",
    "train_sampling_strategy": "sequential",
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 2,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(engine: str) -> list[str]:
    """The 2-process CPU launch of `phi3v train` for ``engine`` (``ddp``, ``fsdp2``, ``zero2``, ``zero3``)."""
    if engine == "fsdp2":
        return [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(LAUNCH / "fsdp2.yaml"),
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "phi3v.cli",
            "train",
        ]
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "phi3v.cli", "train"]
    if engine.startswith("zero"):
        command += ["--deepspeed", str(LAUNCH / f"{engine}.json")]
    return command


def launch_env() -> dict[str, str]:
    # CPU and gloo everywhere; one thread per process on 2 cores
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_launch(command: list[str], timeout: int = 400) -> str:
    proc = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


@pytest.fixture(scope="module")
def single_process_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """The same 6 steps in this process: one rank, 4 samples a step."""
    out = tmp_path_factory.mktemp("engines") / "single"
    args = tiny_config_args(tiny_model_dir, tiny_dataset_dir, out, **{**COMMON, "per_device_train_batch_size": 4})
    summary = train(load_train_config(None, args))
    return summary, out


def _sharded_files(engine: str, checkpoint: Path) -> set[str]:
    if engine == "fsdp2":  # torch.distributed.checkpoint folders, one file per rank inside
        return {p.name for p in checkpoint.iterdir() if p.is_dir()}
    return {p.name for p in (checkpoint / f"global_step{checkpoint.name.split('-')[1]}").iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_sharded_engine_killed_and_resumed_saves_the_single_process_model(
    engine, single_process_run, tiny_model_dir, tiny_dataset_dir, tmp_path
):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="make test installs DeepSpeed (Makefile); a bare pytest may lack it")
    reference_summary, reference = single_process_run
    out = tmp_path / engine
    args = tiny_config_args(tiny_model_dir, tiny_dataset_dir, out, **COMMON)
    proc = subprocess.Popen(
        [*launch_command(engine), *args],
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    kill_at_checkpoint(proc, out, 2, timeout_s=400)  # DeepSpeed builds its CPU op on first use (~1-2 min)
    assert not (out / "training_summary.json").exists(), "killed before the end"

    checkpoint = out / "checkpoint-2"
    sharded = _sharded_files(engine, checkpoint)
    if engine == "fsdp2":
        assert {"pytorch_model_fsdp_0", "optimizer_0"} <= sharded, sharded
    else:  # one optimizer partition per rank
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= sharded
    assert (checkpoint / "model.safetensors").is_file(), "every save is also consolidated"

    run_launch([*launch_command(engine), *args, "--resume"])
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 6
    assert Path(summary["resumed_from"]).name in {"checkpoint-2", "checkpoint-4"}

    # the same trajectory as one process on the same batches (gradients reduced in fp32: within rounding)
    expected, got = logged_losses(reference), logged_losses(out)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, expected, got)
    assert summary["train_loss"] == pytest.approx(reference_summary.train_loss, rel=1e-5)

    # the final save: one official-layout safetensors file, the single-process run's tensors
    weights = sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".pt", ".pth") or "model" in p.name)
    assert weights == ["model.safetensors"], weights
    want, have = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert sorted(have) == sorted(want) == sorted(initial)
    moved = max((want[k] - initial[k]).abs().max().item() for k in want)
    assert moved > 1e-3, "training moved the weights (6 AdamW steps at lr 1e-3)"
    for key, value in want.items():  # Adam normalises the update: rounding in the gradients shows up to ~1e-6
        torch.testing.assert_close(have[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def _wide_tiny_model(folder: Path, tiny_processor) -> tuple[Path, int]:
    """The tiny config with a wide MLP in 8 layers: ~100 M parameters (400 MB in fp32), so that what a rank loads
    shows in its RSS above the interpreter's own ~0.5 GB. Returns the folder and the parameter bytes."""
    from phi3v.model.configuration import Phi3VConfig
    from phi3v.model.modeling import Phi3VForCausalLM

    torch.manual_seed(0)
    config = Phi3VConfig.from_name("tiny", intermediate_size=65536, num_hidden_layers=8)
    model = Phi3VForCausalLM(config)
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder, sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.slow
def test_fsdp2_ram_efficient_loading_keeps_the_full_model_off_rank_1(tiny_processor, tiny_dataset_dir, tmp_path):
    model, nbytes = _wide_tiny_model(tmp_path / "wide", tiny_processor)
    mib = nbytes / 2**20
    probe = str(Path(__file__).with_name("fsdp_load_probe.py"))
    reports, outputs = {}, {}
    for efficient in ("true", "false"):
        command = launch_command("fsdp2")[:-3]  # accelerate launch ... (without -m phi3v.cli train)
        command += ["--fsdp_cpu_ram_efficient_loading", efficient, probe]
        args = tiny_config_args(model, tiny_dataset_dir, tmp_path / f"out-{efficient}", mode="full", eval_strategy="no")
        output = outputs[efficient] = run_launch(command + args)
        lines = [json.loads(line[6:]) for line in output.splitlines() if line.startswith("PROBE ")]
        reports[efficient] = {r["rank"]: r for r in lines}
        assert sorted(reports[efficient]) == [0, 1], output[-3000:]
        assert all(r["engine"] == "DistributedType.FSDP" for r in lines), lines
    efficient, full = reports["true"], reports["false"]
    built_on_meta = "rank 1: model built on the meta device"
    assert built_on_meta in outputs["true"] and built_on_meta not in outputs["false"]
    assert "rank 0: model built on the meta device" not in outputs["true"]
    assert all(r["optimizer_on_shards"] for report in reports.values() for r in report.values()), reports
    # both ways end with each rank holding half the parameters
    assert efficient[1]["local_parameters"] == full[1]["local_parameters"]
    # rank 1 reads nothing: it holds its half of the model plus rank 0's tensors as they arrive, one at a time (the
    # largest is 1/12 of the model), instead of the whole model; so its peak is lower by about half the model, less
    # one tensor. Rank 0 loads the whole model either way. (Measured: 141 MiB of the 385 MiB model.)
    saved = full[1]["peak_rss_mib"] - efficient[1]["peak_rss_mib"]
    assert saved > 0.25 * mib, (saved, mib, reports)
    assert efficient[0]["peak_rss_mib"] - efficient[1]["peak_rss_mib"] > 0.25 * mib, reports


def test_fsdp1_on_cpu_processes_is_refused_before_loading(tmp_path):
    from phi3v.train import TrainingError, _preflight

    args = ["--model", "m", "--data", "d", "--output_dir", str(tmp_path / "o"), "--fsdp", "true"]
    fsdp1 = load_train_config(None, [*args, "--fsdp_config", '{"version": 1}'])
    with pytest.raises(TrainingError, match=r"needs FSDP2 \(fsdp_version: 2\); FSDP1 needs CUDA"):
        _preflight(fsdp1, fsdp1.training_arguments())
    fsdp2 = load_train_config(None, [*args, "--fsdp_config", '{"version": 2}'])
    _preflight(fsdp2, fsdp2.training_arguments())  # FSDP2 runs on CPU processes: no refusal
