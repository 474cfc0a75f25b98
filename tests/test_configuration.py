"""Phi3VConfig: the official config.json files in and out, named tiny configs, validation."""

from __future__ import annotations

import json
import math
from importlib import resources

import pytest
from transformers import CLIPVisionConfig

from phi3v import Phi3VConfig
from phi3v.model.configuration import OFFICIAL_CONFIG_FILES, TINY_CONFIGS


def official(name: str) -> dict:
    return json.loads(resources.files("phi3v.model.official_configs").joinpath(OFFICIAL_CONFIG_FILES[name]).read_text())


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIG_FILES))
def test_official_config_json_round_trips_in_the_same_form(name, tmp_path):
    source = official(name)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "config.json").write_text(json.dumps(source))
    config = Phi3VConfig.from_pretrained(tmp_path / "in")
    config.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written.pop("transformers_version") != source.pop("transformers_version")  # ours, not 4.38.1
    assert written == source  # same keys (3-V lacks embd_pdrop/resid_pdrop/pad_token_id), same values, "su" form
    again = Phi3VConfig.from_pretrained(tmp_path / "out")
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIG_FILES))
def test_official_config_reads_su_rope_as_longrope(name):
    config = Phi3VConfig.from_name(name)
    rope = config.rope_parameters
    assert rope["rope_type"] == "longrope"
    assert rope["original_max_position_embeddings"] == 4096
    assert rope["long_factor"] == official(name)["rope_scaling"]["long_factor"]
    assert len(rope["short_factor"]) == 48
    assert rope["rope_theta"] == 10000.0
    # the attention scaling of reference §6.2: sqrt(1 + ln(131072/4096) / ln(4096)) = sqrt(17/12)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    assert attention_factor == pytest.approx(math.sqrt(17 / 12))
    assert config.eos_token_id == 2 and config.bos_token_id == 1 and config.pad_token_id == 32000
    assert config.image_token_id == 32044 and config.num_img_tokens == 144


def test_official_vision_config_is_clip_vit_large_336():
    vision = Phi3VConfig.from_name("phi-3-vision-128k-instruct").vision_config
    assert isinstance(vision, CLIPVisionConfig)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.image_size, vision.patch_size, vision.intermediate_size) == (336, 14, 4096)
    assert vision.hidden_act == "quick_gelu"


def test_the_files_attn_preference_is_not_applied_but_written_back(tmp_path):
    config = Phi3VConfig.from_name("phi-3.5-vision-instruct")
    assert config._attn_implementation != "flash_attention_2"  # flash-attn is not required to load
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_attn_implementation"] == "flash_attention_2"


def test_tiny_config_is_the_real_architecture_small():
    config = Phi3VConfig.from_name("tiny")
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    assert config.vision_config.hidden_size == 32 == config.image_dim_out
    assert config.rope_parameters["rope_type"] == "longrope"
    assert set(TINY_CONFIGS) == {"tiny"}
    written = config.to_dict()
    assert written["rope_scaling"]["type"] == "su" and written["image_token_id"] == 8
    assert Phi3VConfig.from_dict(written).to_dict() == written


def test_a_config_built_in_code_writes_the_full_official_key_set():
    written = Phi3VConfig().to_dict()
    assert set(official("phi-3.5-vision-instruct")) - set(written) <= {
        "auto_map",
        "_attn_implementation",
        "torch_dtype",
    }
    assert written["model_type"] == "phi3_v" and written["architectures"] == ["Phi3VForCausalLM"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embd_layer": {"hd_transform_order": "glb_sub"}}, "hd_transform_order"),
        ({"embd_layer": {"projection_cls": "linear"}}, "projection_cls"),
        ({"rope_scaling": {"type": "yarn", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}}, "yarn"),
        ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 8}}, "long_factor"),
        ({"image_token_id": 5000}, "outside the vocabulary"),
        ({"img_processor": {"image_dim_out": 64, "num_img_tokens": 144, "clip_config": {"hidden_size": 32}}}, "CLIP"),
        ({"img_processor": {"num_img_tokens": 100}}, "num_img_tokens"),
        ({"img_processor": {"name": "siglip"}}, "clip_vision_model"),
    ],
)
def test_unsupported_or_inconsistent_configs_fail_clearly(overrides, message):
    with pytest.raises(Exception, match=message):
        Phi3VConfig.from_name("tiny", **overrides)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        Phi3VConfig.from_name("phi-4-vision")


def test_optional_keys_keep_the_3v_form_but_never_lose_a_changed_value(tmp_path):
    config = Phi3VConfig.from_name("phi-3-vision-128k-instruct", resid_pdrop=0.1)
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["resid_pdrop"] == 0.1  # changed: written although 3-V's file has no such key
    assert "embd_pdrop" not in written and "pad_token_id" not in written  # unchanged defaults: 3-V form kept
    assert Phi3VConfig.from_pretrained(tmp_path).resid_pdrop == 0.1


def test_tied_embeddings_are_rejected():
    with pytest.raises(Exception, match="tie_word_embeddings"):
        Phi3VConfig.from_name("tiny", tie_word_embeddings=True)
