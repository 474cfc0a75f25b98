"""The shipped configs load: every training recipe under configs/ validates (keys, types, TrainingArguments checks),
the launch configs parse and name classes that exist, and the overrides shown in docs/train.md are accepted."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from phi3v.config import ConfigError
from phi3v.train import FORCED_TRAINING, load_train_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
LAUNCH = CONFIGS / "launch"
TRAIN_DOC = ROOT / "docs" / "train.md"
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml"))
BF16_GPU = torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _cpu_overrides(path: Path) -> list[str]:
    """`--bf16 false` where the recipe asks for bf16 and this machine has no bf16 GPU (TrainingArguments refuses)."""
    training = (yaml.safe_load(path.read_text()) or {}).get("training", {})
    return ["--bf16", "false"] if training.get("bf16") and not BF16_GPU else []


def test_configs_folder_holds_the_documented_recipes():
    names = {p.name for p in RECIPES}
    assert {"tiny.yaml", "burberry-lora.yaml", "burberry-full.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    config = load_train_config(path, _cpu_overrides(path))
    args = config.training_arguments()
    assert args.output_dir == config.output_dir
    for key, value in FORCED_TRAINING.items():
        assert getattr(args, key) == value
    if args.load_best_model_at_end:
        assert args.metric_for_best_model, "load_best_model_at_end needs a metric"
        if args.metric_for_best_model.startswith("eval_gen_"):
            assert config.eval_samples > 0, "an eval_gen_* metric needs the generation check"
        assert args.greater_is_better is False, "loss and price error: lower is better"


@pytest.mark.parametrize("name", ["burberry-lora.yaml", "burberry-full.yaml"])
def test_burberry_recipes(name):
    path = CONFIGS / name
    raw = yaml.safe_load(path.read_text())
    assert "save_total_limit" not in raw["training"], "save_total_limit belongs at the top level"
    assert raw["training"]["bf16"] is True, "the recipes are for bf16 GPUs; CPU checks override it"
    config = load_train_config(path, _cpu_overrides(path))
    args = config.training_arguments()
    assert config.model == "microsoft/Phi-3.5-vision-instruct" and config.num_crops == 4
    assert config.data == "data/burberry"
    assert config.save_total_limit is not None and config.eval_samples > 0
    assert set(args.report_to) == {"wandb", "tensorboard"}
    assert args.activation_checkpointing and args.gradient_checkpointing
    assert args.load_best_model_at_end and args.save_steps % args.eval_steps == 0
    if config.mode == "full":
        assert config.vision_lr is not None and config.projector_lr is not None
    else:
        assert config.mode == "lora" and config.lora.vision and config.lora.projector


def test_bf16_on_a_cpu_fails_as_a_config_error_naming_the_cause():
    if BF16_GPU:
        pytest.skip("this machine supports bf16")
    with pytest.raises(ConfigError, match="bf16"):
        load_train_config(CONFIGS / "burberry-lora.yaml")


def test_tiny_config_paths_match_the_documented_commands():
    """docs/train.md's quick start writes the folders configs/tiny.yaml reads."""
    config = load_train_config(CONFIGS / "tiny.yaml")
    doc = TRAIN_DOC.read_text()
    assert f"phi3v init-model {config.model}" in doc
    assert f"--out {config.data}" in doc
    assert "phi3v train --config configs/tiny.yaml" in doc


# ------------------------------------------------------------------------------------------------------- launch
def _layer_classes() -> dict[str, type]:
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

    return {"Phi3DecoderLayer": Phi3DecoderLayer, "CLIPEncoderLayer": CLIPEncoderLayer}


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    launch_options = {action.dest for action in launch_command_parser()._actions}
    files = sorted(LAUNCH.glob("*.yaml"))
    assert {p.name for p in files} >= {"ddp.yaml", "fsdp2.yaml"}
    for path in files:
        config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown top-level keys
        assert config.num_processes >= 1 and config.mixed_precision == "bf16"
        for key in config.fsdp_config:
            assert key in launch_options, f"{path.name}: accelerate launch has no option {key}"


def test_fsdp2_config_wraps_layer_classes_that_exist_in_the_model():
    from accelerate.commands.config.config_args import ClusterConfig

    from phi3v.model.configuration import Phi3VConfig
    from phi3v.model.modeling import Phi3VForCausalLM

    fsdp = ClusterConfig.from_yaml_file(str(LAUNCH / "fsdp2.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    names = fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
    classes = _layer_classes()
    assert set(names) == set(classes)
    model = Phi3VForCausalLM(Phi3VConfig.from_name("tiny"))
    found = {type(module).__name__ for module in model.modules()}
    for name in names:
        assert name in found, f"{name} is not a module class of Phi3VForCausalLM"
        assert any(isinstance(module, classes[name]) for module in model.modules())


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs(stage):
    config = json.loads((LAUNCH / f"zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    auto_keys = ["train_batch_size", "train_micro_batch_size_per_gpu"]
    auto_keys += ["gradient_accumulation_steps", "gradient_clipping"]
    for key in auto_keys:
        assert config[key] == "auto", f"{key}: the Trainer fills it from the config"
    assert config["bf16"]["enabled"] == "auto"
    # no optimizer / scheduler: the Trainer then builds phi3v's per-component optimizer and the config's schedule
    assert "optimizer" not in config and "scheduler" not in config
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_json_is_accepted_as_an_override_value():
    """`--deepspeed configs/launch/zero2.json` lands under training: (TrainingArguments then needs deepspeed)."""
    from phi3v.config import load_config
    from phi3v.train import TrainConfig

    config = load_config(TrainConfig, CONFIGS / "tiny.yaml", ["--deepspeed", "configs/launch/zero2.json"])
    assert config.training["deepspeed"] == "configs/launch/zero2.json"


# ------------------------------------------------------------------------------------------------------- the guide
def _doc_train_overrides() -> list[list[str]]:
    """The `--key value` tails of the `phi3v train --config configs/...` commands in docs/train.md's code blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", TRAIN_DOC.read_text(), flags=re.DOTALL):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            match = re.search(r"(?:phi3v|-m phi3v\.cli|--module phi3v\.cli) train (--config \S+.*)", line)
            if match:
                commands.append(shlex.split(match.group(1)))
    return commands


def test_doc_train_commands_overrides_are_accepted():
    commands = _doc_train_overrides()
    assert len(commands) >= 8, "docs/train.md lost its train commands"
    from phi3v.cli import build_parser

    for argv in commands:
        assert argv[0] == "--config"
        args, overrides = build_parser().parse_known_args(["train", *argv])  # --resume, --quiet, --threads: the CLI's
        path = args.config
        assert (ROOT / path).is_file(), path
        if "--deepspeed" in overrides:  # TrainingArguments needs the deepspeed package for it
            i = overrides.index("--deepspeed")
            assert (ROOT / overrides[i + 1]).is_file()
            del overrides[i : i + 2]
        load_train_config(ROOT / path, [*overrides, *_cpu_overrides(ROOT / path)])
