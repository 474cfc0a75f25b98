"""2-process DDP training on CPU (gloo) with real `torchrun` processes (GPUs hidden, so it is the same anywhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from train_helpers import tiny_config_args


def _torchrun_train(args: list[str], out: Path, with_output: bool = False) -> Any:
    """`phi3v train` under `torchrun --nproc_per_node 2`; its training_summary.json (and the launch's output)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    # CPU and gloo on every machine: two ranks on a one-GPU machine would otherwise share its GPU (NCCL refuses)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "phi3v.cli", "train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((out / "training_summary.json").read_text())
    return (summary, proc.stdout + proc.stderr) if with_output else summary


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "ddp"
    args = tiny_config_args(
        tiny_model_dir,
        tiny_dataset_dir,
        out,
        mode="full",
        max_steps=3,
        eval_steps=3,
        save_steps=3,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        eval_samples=3,  # odd: one rank answers 2, the other 1 (plus a lock-step pad)
    )
    summary = _torchrun_train(args, out)
    assert summary["world_size"] == 2
    digests = summary["rank_parameter_digests"]
    assert len(digests) == 2 and digests[0] is not None and digests[0] == digests[1]
    assert summary["global_step"] == 3
    # each rank wrote its RNG state; the checkpoint is marked complete once both had
    checkpoint = out / "checkpoint-3"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert (checkpoint / "phi3v_checkpoint.json").is_file()
    # the generation check gathered every rank's answers, in subset order
    records = [json.loads(line) for line in (out / "generations" / "step-3.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    logged = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    train_logs = [row for row in logged if "loss" in row]
    assert len(train_logs) == 3 and all(row["padding_ratio"] >= 1.0 for row in train_logs)


@pytest.mark.slow
def test_ddp_packed_token_budget_epoch_gives_both_ranks_the_same_batches(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """An odd number of token-budget batches over 2 ranks: accelerate repeats one, both ranks take the same number of
    steps (a rank with one batch more would hang the other in all-reduce) and end with the same weights."""
    from phi3v.data.collate import load_prepared_dataset, sequence_lengths
    from phi3v.data.packing import TokenBudgetBatchSampler
    from phi3v.metrics import DEFAULT_PROMPT, AnswerTemplate
    from phi3v.model.processing import Phi3VProcessor

    processor = Phi3VProcessor.from_pretrained(tiny_model_dir)
    split = load_prepared_dataset(tiny_dataset_dir)["train"]
    prompt = processor.apply_chat_template([{"role": "user", "content": DEFAULT_PROMPT}], add_generation_prompt=True)
    lengths = sequence_lengths(split, processor, prompt, AnswerTemplate())
    budget = next(b for b in range(2400, 6000, 100) if len(TokenBudgetBatchSampler(lengths, b, packed=True)) % 2)
    batches = len(TokenBudgetBatchSampler(lengths, budget, packed=True))

    out = tmp_path / "ddp-packed"
    args = tiny_config_args(
        tiny_model_dir,
        tiny_dataset_dir,
        out,
        mode="full",
        packing=True,
        max_tokens_per_batch=budget,
        num_train_epochs=1,
        eval_strategy="no",
        save_strategy="no",
    )
    summary = _torchrun_train(args, out)
    assert summary["global_step"] == (batches + 1) // 2  # round-robin, the last round completed
    digests = summary["rank_parameter_digests"]
    assert len(digests) == 2 and digests[0] is not None and digests[0] == digests[1]
    logged = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    train_logs = [row for row in logged if "loss" in row]
    assert all(row["padding_ratio"] == 1.0 for row in train_logs)
    assert max(row["tokens_per_batch"] for row in train_logs) <= budget


@pytest.mark.slow
def test_lora_ddp_runs_without_the_unused_parameter_search(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """LoRA on the LM and CLIP, the projector and separators trained: every trainable parameter is used in every step,
    so DDP runs with ``find_unused_parameters=False`` (it would stop at the second step if one were not)."""
    out = tmp_path / "lora-ddp"
    args = tiny_config_args(
        tiny_model_dir,
        tiny_dataset_dir,
        out,
        mode="lora",
        max_steps=3,
        eval_strategy="no",
        save_steps=3,
        per_device_train_batch_size=2,
        **{"lora.projector": True, "lora.vision": True},
    )
    summary, output = _torchrun_train(args, out, with_output=True)
    assert "find_unused_parameters=False" in output, output[-3000:]
    assert summary["world_size"] == 2 and summary["global_step"] == 3
    digests = summary["rank_parameter_digests"]
    assert digests[0] is not None and digests[0] == digests[1]
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("glb_GN") for k in adapter) and any("lora_B" in k for k in adapter)
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in summary["rank_peak_rss_mib"].values())
