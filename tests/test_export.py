"""`phi3v export` on briefly trained tiny runs: a LoRA run merged and sharded, a full run and its checkpoint, the
files an export holds, bad arguments, a write that fails half way, and that the guide's commands parse."""

from __future__ import annotations

import json
import re
import resource
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from safetensors import safe_open

from phi3v.cli import build_parser, main
from phi3v.evaluate import EvaluateOptions, evaluate
from phi3v.export import model_card
from phi3v.generation import generate_answers
from phi3v.inference import load_for_inference
from phi3v.metrics import DEFAULT_ANSWER_TEMPLATE
from phi3v.model.image_io import load_image
from phi3v.model.modeling import Phi3VForCausalLM
from phi3v.model.processing import Phi3VProcessor
from test_docs import documented_commands
from train_helpers import tiny_config_args

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "export.md"


def _train(model: Path, data: Path, out: Path, **overrides: object) -> Path:
    """A two-step tiny run with a learning rate large enough for the weights to move visibly."""
    from phi3v.train import load_train_config, train

    settings = {
        "max_steps": 2,
        "eval_strategy": "no",
        "save_strategy": "no",
        "learning_rate": 5e-3,
        "warmup_steps": 0,
        "lr_scheduler_type": "constant",
        "eval_samples": 0,
        **overrides,
    }
    train(load_train_config(None, tiny_config_args(model, data, out, **settings)))
    return out


def _test_images(data: Path, n: int = 3) -> list:
    split = datasets.load_from_disk(str(data / "dataset" / "test")).cast_column("image", datasets.Image(decode=False))
    return [load_image(split[i]["image"]["bytes"] or split[i]["image"]["path"]) for i in range(n)]


def _logits(model: torch.nn.Module, processor: Phi3VProcessor, images: list) -> torch.Tensor:
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>What is shown in this image?"}])
    batch = processor([prompt] * len(images), images=images, padding_side="left", return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits.float()


def _answers(model: torch.nn.Module, processor: Phi3VProcessor, images: list) -> dict[int, str]:
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>What is shown in this image?"}])
    generation = generate_answers(
        model, processor, prompt, range(len(images)), images.__getitem__, batch_size=2, max_new_tokens=10
    )
    return generation.answers


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """A LoRA run (projector trained too) with an evaluation in ``run/eval`` (found by export on its own)."""
    run = _train(tiny_model_dir, tiny_dataset_dir, tmp_path_factory.mktemp("lora") / "run", **{"lora.projector": True})
    evaluate(
        EvaluateOptions(
            model=str(run),
            data=str(tiny_dataset_dir),
            out=str(run / "eval"),
            batch_size=4,
            max_new_tokens=4,
            limit=3,
            ablation=False,
            progress=False,
        )
    )
    return run


@pytest.fixture(scope="module")
def lora_export(lora_run, tmp_path_factory):
    """The LoRA run exported in float32 with shards of at most 200 kB (the tiny model is 1.2 MB)."""
    out = tmp_path_factory.mktemp("exports") / "lora-export"
    code = main(["export", "--model", str(lora_run), "--out", str(out), "--max-shard-size", "200KB"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """A full fine-tuning run of one step that also saved ``checkpoint-1``."""
    return _train(
        tiny_model_dir,
        tiny_dataset_dir,
        tmp_path_factory.mktemp("full") / "run",
        mode="full",
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
    )


# ------------------------------------------------------------------------------------------------ LoRA
def test_the_merged_export_answers_like_base_plus_adapter(lora_run, lora_export, tiny_model_dir, tiny_dataset_dir):
    from peft import PeftModel

    images = _test_images(tiny_dataset_dir)
    processor = Phi3VProcessor.from_pretrained(lora_run)
    base = Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = _logits(base, processor, images)
    reference = PeftModel.from_pretrained(base, str(lora_run)).eval()  # adapter applied on the fly, not merged
    expected = _logits(reference, processor, images)
    exported = Phi3VForCausalLM.from_pretrained(lora_export, dtype=torch.float32)
    got = _logits(exported, processor, images)
    assert (expected - base_logits).abs().max() > 1e-3, "the adapter must change the logits for this test to bite"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert _answers(exported, processor, images) == _answers(reference, processor, images)


def test_the_export_holds_an_index_of_every_tensor_in_several_shards(lora_export):
    index = json.loads((lora_export / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    stored: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(lora_export / shard, framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 (a safetensors reader)
                stored[key] = shard
                tensor = reader.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    assert stored == index["weight_map"], "the index lists exactly the tensors of each shard"
    assert index["metadata"]["total_size"] == total
    assert not any(path.name == "model.safetensors" for path in lora_export.iterdir())
    assert "model.vision_embed_tokens.img_processor.vision_model.post_layernorm.weight" in stored  # official names


def test_generation_config_stops_at_end_and_endoftext(lora_export):
    processor = Phi3VProcessor.from_pretrained(lora_export)
    config = json.loads((lora_export / "generation_config.json").read_text())
    end = processor.tokenizer.convert_tokens_to_ids("<|end|>")
    endoftext = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert config["eos_token_id"] == [end, endoftext] and end != endoftext
    assert config["pad_token_id"] == processor.pad_token_id
    model = Phi3VForCausalLM.from_pretrained(lora_export)
    assert model.generation_config.eos_token_id == [end, endoftext]


def test_the_export_loads_for_inference_with_the_trained_prompt(lora_run, lora_export, tiny_model_dir):
    loaded = load_for_inference(str(lora_export), device="cpu")
    assert loaded.kind == "exported"
    assert loaded.base == str(Path(tiny_model_dir).resolve())
    run_config = yaml.safe_load((lora_run / "train_config.yaml").read_text())
    assert loaded.train_config == run_config
    info = json.loads((lora_export / "export_info.json").read_text())
    assert info["source_kind"] == "adapter" and info["mode"] == "lora" and info["dtype"] == "float32"
    train = datasets.load_from_disk(str(Path(run_config["data"]) / "dataset" / "train"))
    assert info["categories"] == sorted(set(train["category"]))
    assert info["title_max_chars"] == max(map(len, train["title"])) + 20
    names = {p.name for p in lora_export.iterdir()}
    assert {"config.json", "tokenizer.json", "processor_config.json", "training_summary.json", "README.md"} <= names
    assert "training_args.bin" not in names and "adapter_config.json" not in names
    assert not [p for p in lora_export.parent.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_the_model_card_reports_the_run_and_its_metrics(lora_run, lora_export):
    card = (lora_export / "README.md").read_text()
    metrics = json.loads((lora_run / "eval" / "metrics.json").read_text())
    summary = json.loads((lora_run / "training_summary.json").read_text())
    assert json.loads((lora_export / "eval_metrics.json").read_text()) == metrics
    parse_rate = f"| parse rate | {100 * metrics['metrics']['parse_rate']:.1f} % |"
    accuracy = f"| category accuracy | {100 * metrics['metrics']['category_accuracy']:.1f} % |"
    smape = f"| price SMAPE (0 to 200 %) | {100 * metrics['metrics']['price_smape']:.1f} % |"
    assert parse_rate in card and accuracy in card and smape in card
    assert "a row without a price is scored as a predicted price of 0" in card
    assert f"{metrics['counts']['scored']} of {metrics['counts']['rows']} rows scored" in card
    assert "majority_category" in card
    assert f"final training loss {summary['train_loss']:.4f}" in card and "`lora`" in card
    assert "<\\|image_1\\|>" in card, "pipes inside table cells are escaped"
    assert "No evaluation metrics were found" not in card


def test_the_model_card_shows_an_answer_as_the_model_was_trained_to_write_it():
    default = model_card({}, {"answer_template": DEFAULT_ANSWER_TEMPLATE}, None, None)
    assert "e.g. `Product: Check Cotton Shirt, Category: SHIRTS, Full Price: 590`" in default  # not 590.0
    cents = model_card({}, {"answer_template": "{title} | {price:.2f}"}, None, None)
    assert "e.g. `Check Cotton Shirt | 590.00`" in cents


def test_an_export_can_be_exported_again_as_one_bfloat16_shard(lora_export, tmp_path):
    out = tmp_path / "again"
    assert main(["export", "--model", str(lora_export), "--out", str(out), "--dtype", "bfloat16"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    with safe_open(out / "model-00001-of-00001.safetensors", framework="pt") as reader:
        assert reader.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    info = json.loads((out / "export_info.json").read_text())
    assert info["source_kind"] == "exported" and info["categories"]
    first = Phi3VForCausalLM.from_pretrained(lora_export, dtype=torch.float32).state_dict()
    second = Phi3VForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in first.items():
        assert torch.equal(second[name], tensor.to(torch.bfloat16)), name


# ------------------------------------------------------------------------------------------------ full runs
def test_a_full_run_and_its_checkpoint_export_unchanged(full_run, tmp_path, capsys):
    run_weights = Phi3VForCausalLM.from_pretrained(full_run, dtype=torch.float32).state_dict()
    out = tmp_path / "full-export"
    assert main(["export", "--model", str(full_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exported the full model (float32" in printed and "no evaluation metrics found" in printed
    exported = Phi3VForCausalLM.from_pretrained(out).state_dict()
    assert exported.keys() == run_weights.keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in run_weights.items())
    card = (out / "README.md").read_text()
    assert "No evaluation metrics were found" in card and "`full`" in card

    checkpoint = full_run / "checkpoint-1"
    assert main(["export", "--model", str(checkpoint), "--out", str(tmp_path / "from-checkpoint")]) == 0
    assert (tmp_path / "from-checkpoint" / "train_config.yaml").read_text() == (
        full_run / "train_config.yaml"
    ).read_text()
    assert load_for_inference(str(tmp_path / "from-checkpoint"), device="cpu").kind == "exported"


# ------------------------------------------------------------------------------------------------ refusals
def test_a_non_empty_out_is_refused_and_overwrite_replaces_only_an_export(full_run, tmp_path, capsys):
    def export(out, *flags):
        code = main(["export", "--model", str(full_run), "--out", str(out), *flags])
        return code, capsys.readouterr().err

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    code, err = export(taken)
    assert code == 1 and "is not empty" in err and "--overwrite" in err and str(taken) in err
    code, err = export(taken, "--overwrite")  # e.g. the base model's folder: never replaced
    assert code == 1 and "not a phi3v export" in err
    assert (taken / "notes.txt").read_text() == "keep me"

    out = tmp_path / "export"
    assert export(out)[0] == 0
    (out / "stale.txt").write_text("from an earlier export")
    assert export(out)[0] == 1
    assert export(out, "--overwrite")[0] == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors.index.json").is_file()
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    code, err = export(link, "--overwrite")
    assert code == 1 and "symbolic link" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "link", "taken"], "no temporary folder left"


def test_bad_model_folders_and_arguments_get_clear_errors(tiny_model_dir, full_run, tmp_path, capsys):
    def error(*args: str) -> str:
        assert main(["export", *args]) == 1
        return capsys.readouterr().err

    assert "does not exist" in error("--model", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "o"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a model folder" in error("--model", str(empty), "--out", str(tmp_path / "o"))
    assert "no train_config.yaml" in error("--model", str(tiny_model_dir), "--out", str(tmp_path / "o"))
    assert "holds the model folder" in error("--model", str(full_run), "--out", str(full_run.parent))
    missing = str(tmp_path / "metrics.json")
    assert f"--metrics {missing}: no such file" in error(
        "--model", str(full_run), "--out", str(tmp_path / "o"), "--metrics", missing
    )
    broken = tmp_path / "broken-metrics.json"
    broken.write_text('{"metrics": ')
    assert f"--metrics {broken}: not a readable JSON file" in error(
        "--model", str(full_run), "--out", str(tmp_path / "o"), "--metrics", str(broken)
    )
    assert "max_shard_size" in error("--model", str(full_run), "--out", str(tmp_path / "o"), "--max-shard-size", "5XB")
    assert not (tmp_path / "o").exists()


def test_a_write_that_fails_half_way_leaves_the_previous_export_intact(full_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--model", str(full_run), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    limit = (out / "model-00001-of-00001.safetensors").stat().st_size // 2
    capsys.readouterr()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # no file may grow past half a shard: "disk full"
    try:
        code = main(["export", "--model", str(full_run), "--out", str(out), "--overwrite"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    assert code == 1
    assert "phi3v export: writing the export failed" in err and "File too large" in err
    assert f"{out} was left as it was" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "the half-written folder was removed"


# ------------------------------------------------------------------------------------------------ the guide
def test_the_guide_commands_parse():
    guide = GUIDE.read_text()
    commands = [command for command in documented_commands(guide) if command[0] == "export"]
    assert len(commands) >= 3, "docs/export.md lost its commands"
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(command)
        assert args.command == "export" and args.model and args.out
    for option in ("--max-shard-size", "--dtype", "--metrics", "--base-model", "--device", "--overwrite"):
        assert f"`{option}" in guide, f"docs/export.md does not document {option}"
