"""`phi3v train` on a tiny random model and a prepared synth catalog (CPU): batches, modes, checkpoints, errors.

Each short run takes a few seconds; runs are shared between assertions where they can be.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phi3v.config import ConfigError
from phi3v.data.collate import DatasetError, Phi3VCollator, load_prepared_dataset, sequence_lengths
from phi3v.metrics import AnswerTemplate
from phi3v.model.checkpoint import CheckpointError
from phi3v.model.modeling import Phi3VForCausalLM
from phi3v.model.processing import Phi3VProcessor
from phi3v.train import (
    COMPLETE_MARKER,
    NonFiniteLossError,
    Phi3VTrainer,
    TrainingError,
    latest_checkpoint,
    load_train_config,
    train,
)
from train_helpers import kill_at_checkpoint, logged_losses, tiny_config_args

REPO = Path(__file__).resolve().parents[1]


def _config(model, data, out, **overrides):
    return load_train_config(None, tiny_config_args(model, data, out, **overrides))


def _initial_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in Phi3VForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict().items()
    }


# ------------------------------------------------------------------------------------------------------- batches
def test_collator_masks_everything_but_the_answer_token_by_token(tiny_model_dir, tiny_dataset_dir):
    processor = Phi3VProcessor.from_pretrained(tiny_model_dir)
    split = load_prepared_dataset(tiny_dataset_dir)["train"]
    template = AnswerTemplate()
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>What is shown in this image?"}])
    rows = [split[i] for i in range(3)]
    assert {row["image"].size for row in rows} == {(256, 256), (448, 224), (224, 448)}, "mixed shapes expected"
    batch = Phi3VCollator(processor, prompt, template)(rows)

    assert batch["pixel_values"].shape[:2] == (3, 5)  # num_crops 4 + global view, padded to the largest grid
    grids = {tuple(size.tolist()) for size in batch["image_sizes"]}
    assert len(grids) == 3, grids  # three different crop grids in one batch
    lengths = sequence_lengths(split.select(range(3)), processor, prompt, template)
    assert batch["attention_mask"].sum(1).tolist() == lengths  # header-only lengths == real token counts
    for i, row in enumerate(rows):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        supervised = (labels != -100).nonzero().flatten()
        # one contiguous run, ending at the last real token, holding exactly the answer + <|end|>
        assert supervised.tolist() == list(range(int(supervised[0]), int(supervised[-1]) + 1))
        assert int(supervised[-1]) == int(mask.sum()) - 1
        assert torch.equal(labels[supervised], ids[supervised])
        assert processor.tokenizer.decode(ids[supervised]) == template.format(row) + "<|end|>"
        unsupervised = labels == -100
        assert (ids[unsupervised & (mask == 1)] == processor.image_token_id).sum() > 0  # image tokens unlearned
        assert not torch.any((labels == processor.image_token_id) | (labels == processor.tokenizer.bos_token_id))
        assert torch.all(labels[mask == 0] == -100)  # padding unlearned


# ------------------------------------------------------------------------------------------------------- modes
@pytest.fixture(scope="module")
def freeze_vision_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("freeze-vision") / "run"
    config = _config(
        tiny_model_dir,
        tiny_dataset_dir,
        out,
        mode="freeze_vision",
        max_steps=10,
        learning_rate=3e-3,
        warmup_steps=0,
        lr_scheduler_type="constant",
        eval_steps=5,
        save_steps=5,
        projector_lr=0.0,
    )
    return train(config), out


def test_full_training_lowers_the_loss(freeze_vision_run):
    summary, out = freeze_vision_run
    losses = logged_losses(out)
    assert sorted(losses) == list(range(1, 11))
    first, last = losses[1], (losses[9] + losses[10]) / 2
    assert last < first - 0.5, losses
    assert summary.final_eval["eval_loss"] < first
    assert summary.global_step == 10


def test_freeze_vision_changes_only_the_language_model(freeze_vision_run, tiny_model_dir):
    _, out = freeze_vision_run
    before = _initial_state(tiny_model_dir)
    after = Phi3VForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    vision = {n for n in before if "img_processor." in n}
    projector = {n for n in before if "img_projection." in n or n.endswith(("glb_GN", "sub_GN"))}
    lm = set(before) - vision - projector
    assert vision and not (changed & vision), sorted(changed & vision)[:5]
    assert not (changed & projector), "projector_lr 0 must leave the projector as it was"
    lm_trained = {n for n in lm if "layers." in n}
    assert lm_trained <= changed, sorted(lm_trained - changed)[:5]


def test_final_outputs_and_summary(freeze_vision_run):
    _, out = freeze_vision_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "training_summary.json").read_text())
    assert saved["global_step"] == 10 and saved["mode"] == "freeze_vision"
    assert saved["parameters"]["trainable"] < saved["parameters"]["total"]
    assert (out / "train_config.yaml").is_file()
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-10", "checkpoint-5"]
    assert latest_checkpoint(out).name == "checkpoint-10"
    generations = [json.loads(line) for line in (out / "generations" / "step-10.jsonl").read_text().splitlines()]
    assert len(generations) == 2 and {"prediction", "truth", "parsed_price"} <= set(generations[0])
    Phi3VProcessor.from_pretrained(out)  # the final folder is a complete model + processor


def test_lora_trains_adapters_and_projector_only(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    summary = train(
        _config(
            tiny_model_dir,
            tiny_dataset_dir,
            out,
            max_steps=3,
            eval_strategy="no",
            save_steps=3,
            **{"lora.projector": True, "lora.vision": True},
        )
    )
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("img_processor" in k and "lora_B" in k for k in adapter), "vision LoRA requested"
    assert any("layers.0.self_attn.qkv_proj.lora_B" in k for k in adapter)
    assert any("img_projection" in k for k in adapter), "projector saved with the adapter"
    separators = {k for k in adapter if k.endswith(("glb_GN", "sub_GN"))}
    assert len(separators) == 2, f"the learned separators are part of the projector: {sorted(adapter)[:8]}"
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "lora_B starts at 0 and must move"
    base = Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, out)
    merged = model.merge_and_unload().state_dict()
    assert not torch.equal(
        merged["model.layers.0.self_attn.qkv_proj.weight"], before["model.layers.0.self_attn.qkv_proj.weight"]
    )
    for name in ("model.vision_embed_tokens.separators.glb_GN", "model.vision_embed_tokens.separators.sub_GN"):
        assert not torch.equal(merged[name], before[name]), f"{name} trained and restored with the adapter"
    assert torch.equal(merged["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert summary.parameters["trainable"] < summary.parameters["total"] / 2


def test_per_component_learning_rates(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from phi3v.train import load_model_and_processor

    config = _config(
        tiny_model_dir,
        tiny_dataset_dir,
        tmp_path / "o",
        mode="full",
        vision_lr=1e-5,
        projector_lr=1e-4,
        eval_strategy="no",
    )
    args = config.training_arguments()
    model, _ = load_model_and_processor(config, args)
    trainer = Phi3VTrainer(model=model, args=args, phi3v_config=config)
    groups = {g["name"]: g for g in trainer.create_optimizer().param_groups}
    assert groups["vision"]["lr"] == 1e-5 and groups["projector"]["lr"] == 1e-4 and groups["lm"]["lr"] == 2e-4
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("img_processor." in names[id(p)] for p in groups["vision"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(g["weight_decay"] == 0.0 for name, g in groups.items() if name.endswith("_no_decay"))


def test_gradient_checkpointing_gives_the_same_losses(tiny_model_dir, tiny_dataset_dir, tmp_path):
    runs = {}
    for flag in (False, True):
        out = tmp_path / f"gc-{flag}"
        train(
            _config(
                tiny_model_dir,
                tiny_dataset_dir,
                out,
                max_steps=2,
                eval_strategy="no",
                save_strategy="no",
                activation_checkpointing=flag,
            )
        )
        runs[flag] = logged_losses(out)
    assert runs[True].keys() == runs[False].keys()
    for step in runs[False]:
        assert math.isclose(runs[True][step], runs[False][step], rel_tol=1e-4), (step, runs)


# ------------------------------------------------------------------------------------------------------- resume
def _train_process(args: list[str], env_extra: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "phi3v.cli", "train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "kill_after"),
    [
        ({}, 4),
        # packed rows under a token budget (8-10 batches an epoch): killed in the second epoch
        ({"packing": True, "max_tokens_per_batch": 3000, "max_steps": 16}, 12),
        ({"packing": True, "max_steps": 12}, 10),  # packed, fixed batch size: 10 batches an epoch
        ({"max_tokens_per_batch": 2400, "max_steps": 16}, 14),  # padded under a budget: about 12 batches an epoch
    ],
    ids=["padded", "packed-budget", "packed", "padded-budget"],
)
def test_sigkill_then_resume_matches_an_uninterrupted_run(
    tiny_model_dir, tiny_dataset_dir, tmp_path, extra, kill_after
):
    common = {"max_steps": 8, "save_steps": 2, "eval_steps": 4, "dataloader_num_workers": 1, "learning_rate": 1e-3}
    common.update(extra)
    reference = tmp_path / "reference"
    uninterrupted = train(_config(tiny_model_dir, tiny_dataset_dir, reference, **common))

    out = tmp_path / "killed"
    args = tiny_config_args(tiny_model_dir, tiny_dataset_dir, out, **common)
    proc = _train_process(args)
    kill_at_checkpoint(proc, out, kill_after)
    assert not (out / "training_summary.json").exists(), "killed before the end"
    resumed_from = latest_checkpoint(out)
    steps = common["max_steps"]
    assert resumed_from is not None and kill_after <= int(resumed_from.name.split("-")[1]) <= steps

    again = _train_process(args)  # without --resume: refused
    output = again.communicate(timeout=120)[0]
    assert again.returncode == 1 and "--resume" in output, output[-2000:]

    summary = train(_config(tiny_model_dir, tiny_dataset_dir, out, **common), resume=True)
    assert summary.resumed_from == str(resumed_from)
    assert summary.global_step == steps
    # the whole run's mean loss, not the mean since the resume (transformers' own training_loss)
    assert math.isclose(summary.train_loss, uninterrupted.train_loss, rel_tol=1e-6), (summary, uninterrupted)
    expected, got = logged_losses(reference), logged_losses(out)
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    for step in expected:
        assert math.isclose(got[step], expected[step], rel_tol=1e-4, abs_tol=1e-5), (step, expected, got)
    ref_adapter = load_file(reference / "adapter_model.safetensors")
    res_adapter = load_file(out / "adapter_model.safetensors")
    for key, value in ref_adapter.items():
        torch.testing.assert_close(res_adapter[key], value, rtol=1e-4, atol=1e-6)


def test_resume_refuses_a_changed_config_and_an_empty_folder(tiny_model_dir, tiny_dataset_dir, tmp_path):
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        train(_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "empty"), resume=True)
    out = tmp_path / "run"
    train(_config(tiny_model_dir, tiny_dataset_dir, out, max_steps=1, eval_strategy="no", save_steps=1))
    with pytest.raises(TrainingError, match=r"differs .* in mode"):
        train(_config(tiny_model_dir, tiny_dataset_dir, out, max_steps=2, mode="full", eval_strategy="no"), resume=True)
    # every key that changes the trajectory is refused, named; the run's own keys may change
    same = {"max_steps": 1, "eval_strategy": "no", "save_steps": 1}
    for key, value in [
        ("learning_rate", 1e-3),
        ("per_device_train_batch_size", 2),
        ("gradient_accumulation_steps", 2),
        ("seed", 7),
        ("lr_scheduler_type", "linear"),
        ("train_sampling_strategy", "random"),
        ("packing", True),
        ("max_tokens_per_batch", 4000),
        ("vision_lr", 1e-5),
    ]:
        name = key if key in ("packing", "max_tokens_per_batch", "vision_lr") else f"training.{key}"
        with pytest.raises(TrainingError, match=rf"differs .* in {name.replace('.', '[.]')};"):
            train(_config(tiny_model_dir, tiny_dataset_dir, out, **{**same, key: value}), resume=True)
    resumed = train(
        _config(tiny_model_dir, tiny_dataset_dir, out, **{**same, "logging_steps": 5, "save_steps": 3}),
        resume=True,
    )  # logging and save cadence may change
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-1")


def test_resume_from_the_runs_last_checkpoint_trains_nothing_more(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """Killed after its last checkpoint (during the final evaluation or save): the resumed run finishes with the
    uninterrupted run's steps, loss and weights, and takes no step past max_steps."""
    out = tmp_path / "run"
    common = {"max_steps": 2, "save_steps": 2, "eval_strategy": "no", "learning_rate": 1e-3}
    uninterrupted = train(_config(tiny_model_dir, tiny_dataset_dir, out, mode="full", **common))
    final = load_file(out / "model.safetensors")
    for name in ("model.safetensors", "config.json", "training_summary.json", "log_history.jsonl"):
        (out / name).unlink()  # what a kill during the final save leaves: the complete checkpoint-2 only
    resumed = train(_config(tiny_model_dir, tiny_dataset_dir, out, mode="full", **common), resume=True)
    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.global_step == 2
    assert sorted(logged_losses(out)) == [1, 2], "no step 3"
    assert resumed.train_loss == pytest.approx(uninterrupted.train_loss, rel=1e-6)
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(again[k], v) for k, v in final.items())


# ------------------------------------------------------------------------------------------------------- failures
class _PoisonWeights:
    """Callback that sets one weight to NaN after step ``at`` (a diverged run, made on purpose)."""

    def __new__(cls, at: int):
        from transformers import TrainerCallback

        class Poison(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step == at:
                    with torch.no_grad():
                        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

        return Poison()


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "nan"
    config = _config(tiny_model_dir, tiny_dataset_dir, out, mode="full", max_steps=6, save_steps=2, eval_strategy="no")
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 4 .*checkpoint-2"):
        train(config, callbacks=[_PoisonWeights(3)])
    assert latest_checkpoint(out).name == "checkpoint-2"
    assert not (out / "checkpoint-4").exists()
    weights = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_failed_checkpoint_write_keeps_the_last_complete_one(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """A real write failure: the resumed run may write no file over 1 MB (RLIMIT_FSIZE, SIGXFSZ ignored)."""
    import resource

    out = tmp_path / "full"
    args = tiny_config_args(
        tiny_model_dir, tiny_dataset_dir, out, mode="full", max_steps=4, save_steps=2, eval_strategy="no"
    )
    first = _train_process([*args, "--max_steps", "2"])
    assert first.wait(timeout=120) == 0, first.communicate()[0][-3000:]
    assert latest_checkpoint(out).name == "checkpoint-2"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    second = _train_process([*args, "--resume"], preexec_fn=limit_file_size)
    output = second.communicate(timeout=120)[0]
    assert second.returncode == 1, output[-3000:]
    assert "saving" in output and "checkpoint-4 failed" in output and "checkpoint-2" in output, output[-3000:]
    assert not (out / "checkpoint-4").exists(), "the partial checkpoint must be removed"
    assert latest_checkpoint(out).name == "checkpoint-2"


def test_bad_data_folders_are_named(tiny_dataset_dir, tmp_path):
    import datasets

    with pytest.raises(DatasetError, match="does not exist"):
        load_prepared_dataset(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "photos.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="is not a phi3v dataset"):
        load_prepared_dataset(tmp_path / "plain")

    def copy_with(name, change):
        folder = tmp_path / name
        shutil.copy(tiny_dataset_dir / "manifest.json", folder.mkdir() or folder / "manifest.json")
        splits = datasets.load_from_disk(str(tiny_dataset_dir / "dataset"))
        change(splits).save_to_disk(str(folder / "dataset"))
        return folder

    no_price = copy_with(
        "no-price", lambda d: datasets.DatasetDict({k: v.remove_columns("price") for k, v in d.items()})
    )
    with pytest.raises(DatasetError, match=r"split 'train' lacks the column\(s\) price"):
        load_prepared_dataset(no_price)

    def empty_validation(d):
        features = d["validation"].features
        return datasets.DatasetDict(
            {**d, "validation": datasets.Dataset.from_dict({c: [] for c in features}, features)}
        )

    empty = copy_with("empty", empty_validation)
    with pytest.raises(DatasetError, match="split 'validation' is empty"):
        load_prepared_dataset(empty)
    no_split = copy_with("no-split", lambda d: datasets.DatasetDict({"train": d["train"]}))
    with pytest.raises(DatasetError, match="no 'validation' split"):
        load_prepared_dataset(no_split)


def test_model_folder_without_weights(tiny_model_dir, tiny_dataset_dir, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        train(_config(broken, tiny_dataset_dir, tmp_path / "o1"))
    assert not (tmp_path / "o1").exists(), "nothing written for a run that cannot start"
    # qlora runs on CPU too: tests/test_qlora.py


def test_cli_reports_config_errors(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    from phi3v.cli import main

    args = tiny_config_args(tiny_model_dir, tiny_dataset_dir, tmp_path / "o")
    assert main(["train", *args, "--learning_rat", "1e-4"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err
    assert main(["train", *args, "--lora.r", "many"]) == 2
    assert "lora.r: expected an integer, got 'many'" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        load_train_config(REPO / "configs" / "tiny.yaml", ["--mode", "half"])


def test_rotation_keeps_the_newest_and_the_best_within_the_limit(tmp_path):
    from types import SimpleNamespace

    def run(limit, best, steps=(100, 200, 300)):
        folder = tmp_path / f"rot-{limit}-{best}"
        for step in steps:
            (folder / f"checkpoint-{step}").mkdir(parents=True)
            (folder / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("{}")
        (folder / "checkpoint-400").mkdir()  # partial: never counted, never removed by rotation
        fake = SimpleNamespace(
            phi3v_config=SimpleNamespace(save_total_limit=limit),
            state=SimpleNamespace(best_model_checkpoint=str(folder / f"checkpoint-{best}") if best else None),
        )
        Phi3VTrainer._rotate_complete_checkpoints(fake, folder)
        return sorted(p.name for p in folder.iterdir())

    assert run(1, 300) == ["checkpoint-300", "checkpoint-400"]
    assert run(1, 100) == ["checkpoint-100", "checkpoint-300", "checkpoint-400"]
    assert run(2, None) == ["checkpoint-200", "checkpoint-300", "checkpoint-400"]
    assert run(3, 100) == ["checkpoint-100", "checkpoint-200", "checkpoint-300", "checkpoint-400"]


def test_lora_on_bf16_weights_trains_fp32_copies(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from phi3v.train import load_model_and_processor

    config = _config(
        tiny_model_dir,
        tiny_dataset_dir,
        tmp_path / "o",
        model_dtype="bfloat16",
        eval_strategy="no",
        **{"lora.projector": True},
    )
    model, _ = load_model_and_processor(config, config.training_arguments())
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("img_projection" in n for n in trained)
    assert set(trained.values()) == {torch.float32}, trained
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------------- packing
def test_packed_training_matches_padded_training_step_by_step(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """Same batches (same sampler and seed), packed into one row or padded: the same losses at every step."""
    logs = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        train(
            _config(
                tiny_model_dir,
                tiny_dataset_dir,
                out,
                mode="full",
                packing=packing,
                max_steps=5,
                learning_rate=1e-3,
                eval_strategy="no",
                save_strategy="no",
            )
        )
        logs[packing] = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    padded, packed = ([row for row in logs[p] if "loss" in row] for p in (False, True))
    assert [row["step"] for row in packed] == [row["step"] for row in padded] == [1, 2, 3, 4, 5]
    for a, b in zip(padded, packed, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4, abs_tol=1e-4), (a, b)
        assert a["tokens_per_batch"] == b["tokens_per_batch"] and a["samples_per_batch"] == b["samples_per_batch"] == 4
        assert b["padding_ratio"] == 1.0
    assert max(row["padding_ratio"] for row in padded) > 1.05  # the photos' mixed grids pad the padded batches


def test_token_budget_batches_and_their_bad_inputs(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from phi3v.model.processing import Phi3VProcessor

    processor = Phi3VProcessor.from_pretrained(tiny_model_dir)
    split = load_prepared_dataset(tiny_dataset_dir)["train"]
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>What is shown in this image?"}])
    lengths = sequence_lengths(split, processor, prompt, AnswerTemplate())
    longest = max(range(len(lengths)), key=lengths.__getitem__)

    out = tmp_path / "budget"
    common = {"eval_strategy": "no", "save_strategy": "no", "max_steps": 3}
    train(_config(tiny_model_dir, tiny_dataset_dir, out, max_tokens_per_batch=2000, **common))
    steps = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    padded_sizes = [row["tokens_per_batch"] * row["padding_ratio"] for row in steps if "loss" in row]
    assert len(padded_sizes) == 3 and all(size <= 2000 + 1 for size in padded_sizes), padded_sizes

    with pytest.raises(TrainingError, match=rf"train row {longest}, which has {lengths[longest]} tokens"):
        train(_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "small", max_tokens_per_batch=300, **common))
    with pytest.raises(TrainingError, match=r"packing with max_length=400 would cut \d+ train row"):
        train(_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "cut", packing=True, max_length=400, **common))
    with pytest.raises(ConfigError, match="eager has no packed path"):
        _config(tiny_model_dir, tiny_dataset_dir, tmp_path / "eager", packing=True, attn_implementation="eager")
    assert not any((tmp_path / name).exists() for name in ("small", "cut"))  # refused before writing
