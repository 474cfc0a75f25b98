"""The typed YAML config of `phi3v train`: unknown keys, wrong types, overrides, TrainingArguments passthrough."""

from __future__ import annotations

import pytest

from phi3v.config import ConfigError, parse_overrides
from phi3v.metrics import DEFAULT_PROMPT
from phi3v.train import TrainConfig, load_train_config

REQUIRED = ["--model", "m", "--data", "d", "--output_dir", "o"]


def _write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_values_overrides_and_passthrough(tmp_path):
    path = _write(
        tmp_path,
        "model: m\ndata: d\noutput_dir: o\nlora: {r: 4}\n"
        "training:\n  learning_rate: 2e-4\n  eval_strategy: no\n  report_to: [wandb, tensorboard]\n",
    )
    config = load_train_config(path, ["--lora.alpha", "8", "--per_device_train_batch_size=3", "--bf16", "false"])
    assert isinstance(config, TrainConfig)
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (4, 8, 0.05)
    assert config.training["learning_rate"] == 2e-4  # YAML 1.1 reads "2e-4" as text: converted
    assert config.training["eval_strategy"] == "no"  # YAML reads `no` as False: given back
    assert config.training["per_device_train_batch_size"] == 3
    args = config.training_arguments()
    assert args.learning_rate == 2e-4 and args.per_device_train_batch_size == 3
    assert args.report_to == ["wandb", "tensorboard"]
    assert args.remove_unused_columns is False and args.label_names == ["labels"]  # forced by phi3v
    assert args.num_train_epochs == 1 and args.lr_scheduler_type == "cosine"  # phi3v defaults
    assert config.prompt == DEFAULT_PROMPT and config.mode == "lora"


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("model: m\ndata: d\noutput_dir: o\nmodde: full\n", [], r"unknown key 'modde' \(did you mean 'mode'\?\)"),
        ("model: m\ndata: d\noutput_dir: o\nlora: {rank: 4}\n", [], r"unknown key 'rank'"),
        ("model: m\ndata: d\noutput_dir: o\ntraining: {learning_rte: 1}\n", [], r"did you mean 'learning_rate'"),
        ("model: m\ndata: d\noutput_dir: o\nnum_crops: four\n", [], r"num_crops: expected an integer, got 'four'"),
        ("model: m\ndata: d\noutput_dir: o\nmode: half\n", [], r"mode: 'half' is not one of"),
        ("model: m\ndata: d\noutput_dir: o\ntraining: {learning_rate: fast}\n", [], r"learning_rate: expected a"),
        ("model: m\ndata: d\n", [], r"missing required key\(s\): output_dir"),
        ("- a\n- b\n", [], r"must hold a mapping"),
        ("model: [unclosed\n", [], r"not valid YAML"),
        ("model: m\ndata: d\noutput_dir: o\n", ["--lora.r", "0"], r"lora.r and lora.alpha must be >= 1"),
        ("model: m\ndata: d\noutput_dir: o\n", ["--prompt", "Describe the product"], r"exactly one <\|image_1\|>"),
        ("model: m\ndata: d\noutput_dir: o\n", ["--prompt", "<|image_1|>Is it {title}?"], r"names a catalog field"),
        ("model: m\ndata: d\noutput_dir: o\n", ["--answer_template", "{title} {sku}"], r"unknown field \{sku\}"),
        (  # a price spec that cannot write a price: refused when the config loads, the spec named
            "model: m\ndata: d\noutput_dir: o\nanswer_template: 'Full Price: {price:d}'\n",
            [],
            r"answer template .Full Price: \{price:d\}.: \{price:d\} cannot format a price such as 590.0",
        ),
        ("model: m\ndata: d\noutput_dir: o\n", ["--remove_unused_columns", "true"], r"set by phi3v"),
        ("model: m\ndata: d\noutput_dir: o\n", ["--save_total_limit_x", "1"], r"unknown override"),
        (
            "model: m\ndata: d\noutput_dir: o\ntraining: {save_total_limit: 2}\n",
            [],
            r"set save_total_limit at the top level",
        ),
        (  # TrainingArguments' own cross-checks run at load time
            "model: m\ndata: d\noutput_dir: o\ntraining: {load_best_model_at_end: true, save_strategy: epoch}\n",
            [],
            r"training: .*(save|eval)",
        ),
    ],
)
def test_bad_configs_are_named(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(_write(tmp_path, text), overrides)


def test_missing_file_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_train_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected --key value"):
        load_train_config(None, [*REQUIRED, "learning_rate", "1"])
    assert parse_overrides(["--a.b", "1", "--flag", "--c=x y", "--d", "[1, 2]"]) == {
        "a.b": 1,
        "flag": True,
        "c": "x y",
        "d": [1, 2],
    }


def test_yaml_bool_and_text_traps(tmp_path):
    path = _write(tmp_path, "model: m\ndata: d\noutput_dir: o\nwandb_log_model: false\n")
    assert load_train_config(path).wandb_log_model == "false"  # YAML's False meant the choice "false"
    config = load_train_config(
        None, [*REQUIRED, "--prompt", "<|image_1|>What is #1 here?", "--answer_template", "Item: {title}"]
    )
    assert config.prompt == "<|image_1|>What is #1 here?"  # not cut at " #" as a YAML comment
    assert load_train_config(None, [*REQUIRED, "--prompt", "<|image_1|>Describe: the item"]).prompt.endswith(
        "Describe: the item"
    )  # not read as a mapping
    assert load_train_config(None, [*REQUIRED, "--fsdp", "true"]).training["fsdp"] is True  # wider than annotated
    assert load_train_config(None, [*REQUIRED, "--fsdp", "[full_shard, auto_wrap]"]).training["fsdp"] == [
        "full_shard",
        "auto_wrap",
    ]
