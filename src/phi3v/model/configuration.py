"""`Phi3VConfig`: the configuration of Phi-3-Vision / Phi-3.5-Vision.

Reference: the hub's `configuration_phi3_v.py` and the two official `config.json` files
(microsoft/Phi-3-vision-128k-instruct, microsoft/Phi-3.5-vision-instruct); ../shared/docs/phi3v-reference.md §1.

The official files are flat Phi-3 language-model fields plus two dicts, `embd_layer` (how image features enter the
sequence) and `img_processor` (which vision tower). `Phi3VConfig` extends transformers' `Phi3Config`, so the language
model is transformers' own `Phi3ForCausalLM`, and adds:

- reading of the legacy `rope_scaling = {"type": "su", short_factor, long_factor}` form. transformers 5 renames "su" to
  "longrope" but standardises the dict before the rename, so `original_max_position_embeddings` never enters it and
  validation fails; we normalise it ourselves;
- `to_dict()` that writes the official form back (`rope_scaling` with type "su", `rope_theta`, `torch_dtype`, the same
  key set the file was read with), so a saved config also loads with the official remote code;
- the vision tower's `CLIPVisionConfig` (CLIP ViT-L/14-336 unless `img_processor["clip_config"]` overrides fields, which
  the tiny test configs do) and the image placeholder id (`image_token_id`, 32044 in the official vocabulary).
"""

from __future__ import annotations

import copy
import json
import logging
from importlib import resources
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, Phi3Config

logger = logging.getLogger(__name__)

IMAGE_TOKEN_ID = 32044  # `<|image|>` in the official vocabulary (reference §5.3).

# CLIP ViT-L/14 at 336 px, hard-coded by the remote code (`CLIP_VIT_LARGE_PATCH14_336_CONFIG`, reference §2.1).
CLIP_VIT_LARGE_PATCH14_336: dict[str, Any] = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 336,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-5,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
}

DEFAULT_EMBD_LAYER: dict[str, Any] = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}

DEFAULT_IMG_PROCESSOR: dict[str, Any] = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}

# Key order of the official files (3.5-V has every key; 3-V lacks embd_pdrop, resid_pdrop and pad_token_id).
OFFICIAL_KEYS: tuple[str, ...] = (
    "_name_or_path",
    "architectures",
    "attention_dropout",
    "auto_map",
    "bos_token_id",
    "embd_layer",
    "embd_pdrop",
    "eos_token_id",
    "hidden_act",
    "hidden_size",
    "img_processor",
    "initializer_range",
    "intermediate_size",
    "max_position_embeddings",
    "model_type",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "original_max_position_embeddings",
    "pad_token_id",
    "resid_pdrop",
    "rms_norm_eps",
    "rope_scaling",
    "rope_theta",
    "sliding_window",
    "tie_word_embeddings",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "vocab_size",
    "_attn_implementation",
)
# Official keys that 3-V's file lacks: written back only when the source had them or the value is not the default.
OPTIONAL_DEFAULTS: dict[str, Any] = {"embd_pdrop": 0.0, "resid_pdrop": 0.0, "pad_token_id": 32000}
# Keys phi3v adds, written only when they differ from the official defaults.
PHI3V_KEYS: tuple[str, ...] = ("image_token_id",)

# Tiny configurations for tests and the demo: the real architecture (336-px crops, 14-px patches, 144 tokens a crop,
# 2x2 merge, longrope) at a size that trains in seconds on a CPU. Ids match `phi3v.model.tokenizer`'s fixed specials.
_TINY_TEXT: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "sliding_window": 131072,
    "bos_token_id": 1,
    "eos_token_id": 3,
    "pad_token_id": 3,
    "image_token_id": 8,
    "tie_word_embeddings": False,
}
# CLIP: 2 layers (features of the first, as the official model takes the penultimate one), 2 heads of 16: attention
# over 577 patches is most of a CPU step, and 4 heads of 8 or a third layer cost 2.3x the time for no gain in learning.
_TINY_CLIP: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # head_dim 16 -> 8 rope factors; short factors != 1 so the longrope path is exercised, long ones for > 4096 tokens.
    "tiny": {
        **_TINY_TEXT,
        "rope_scaling": {
            "type": "su",
            "short_factor": [1.0, 1.05, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0],
            "long_factor": [1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
        },
        "img_processor": {**DEFAULT_IMG_PROCESSOR, "image_dim_out": 32, "clip_config": _TINY_CLIP},
    },
}
OFFICIAL_CONFIG_FILES: dict[str, str] = {
    "phi-3-vision-128k-instruct": "phi-3-vision-128k-instruct.json",
    "phi-3.5-vision-instruct": "phi-3.5-vision-instruct.json",
}


@strict
class Phi3VConfig(Phi3Config):
    r"""Configuration of [`Phi3VForCausalLM`]: Phi-3 language-model fields plus the image-embedding settings.

    embd_layer (`dict`, *optional*):
        How image features enter the sequence. Only the official layout is supported: `use_hd_transform=True`,
        `hd_transform_order="sub_glb"`, `projection_cls="mlp"`, `with_learnable_separator=True`.
    img_processor (`dict`, *optional*):
        The vision tower: `image_dim_out` (CLIP width), `num_img_tokens` (144 tokens per 336-px crop),
        `layer_idx` (CLIP hidden state used, default -2), `type_feature` ("patch": drop CLS), and
        `clip_config` (phi3v extension: CLIPVisionConfig fields overriding CLIP ViT-L/14-336, for tiny models).
    image_token_id (`int`, *optional*, defaults to 32044):
        Token id of the image placeholders that the processor writes and the model fills with image features.
    """

    model_type = "phi3_v"
    # Keys of the file this config was read from (`None` for a config built in code): `to_dict` writes the same set.
    _source_keys: ClassVar[None] = None

    embd_layer: dict | str | None = None
    img_processor: dict | None = None
    image_token_id: int = IMAGE_TOKEN_ID
    eos_token_id: int | list[int] | None = 32000

    def __post_init__(self, **kwargs):
        if self.embd_layer is None or self.embd_layer == "default":
            self.embd_layer = dict(DEFAULT_EMBD_LAYER)
        if self.img_processor is None:
            self.img_processor = dict(DEFAULT_IMG_PROCESSOR)
        super().__post_init__(**kwargs)

    # -- legacy rope_scaling ------------------------------------------------------------------------------------------
    def convert_rope_params_to_dict(self, default_theta: float = 10_000.0, ignore_keys: set | None = None, **kwargs):
        """Normalise `rope_scaling` ("su" / "longrope" / none) into transformers 5's `rope_parameters`."""
        rope_scaling = kwargs.pop("rope_scaling", None)
        params = dict(rope_scaling or self.rope_parameters or {})
        theta = kwargs.pop("rope_theta", params.pop("rope_theta", default_theta))
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        if rope_type in ("su", "longrope"):
            if not {"short_factor", "long_factor"} <= params.keys():
                raise ValueError(f"rope_scaling of type {rope_type!r} needs short_factor and long_factor, got {params}")
            params = {
                "rope_type": "longrope",
                "short_factor": list(params["short_factor"]),
                "long_factor": list(params["long_factor"]),
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "factor": self.max_position_embeddings / self.original_max_position_embeddings,
            }
        elif rope_type == "default":
            params = {"rope_type": "default"}
        else:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported by Phi-3-V (use 'su'/'longrope')")
        params["rope_theta"] = float(theta)
        params.setdefault("partial_rotary_factor", 1.0)
        self.rope_parameters = params
        return kwargs

    # -- validation ---------------------------------------------------------------------------------------------------
    def validate_phi3v(self):
        """Reject image-embedding layouts that the official checkpoints do not use (and phi3v does not implement)."""
        layer = self.embd_layer
        if not isinstance(layer, dict):
            raise ValueError(f"embd_layer must be a dict, got {layer!r}")
        expected = {"use_hd_transform": True, "hd_transform_order": "sub_glb", "projection_cls": "mlp"}
        for key, value in expected.items():
            if layer.get(key, DEFAULT_EMBD_LAYER[key]) != value:
                raise ValueError(f"embd_layer[{key!r}]={layer.get(key)!r} is not supported; phi3v implements {value!r}")
        if not layer.get("with_learnable_separator", True):
            raise ValueError("embd_layer['with_learnable_separator']=False is not supported")
        proc = self.img_processor
        if not isinstance(proc, dict):
            raise ValueError(f"img_processor must be a dict, got {proc!r}")
        if proc.get("name", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"img_processor['name']={proc.get('name')!r} is not supported (only clip_vision_model)")
        if proc.get("type_feature", "patch") != "patch":
            raise ValueError("img_processor['type_feature'] must be 'patch'")
        vision = self.vision_config
        if proc.get("image_dim_out", vision.hidden_size) != vision.hidden_size:
            raise ValueError(
                f"img_processor['image_dim_out']={proc['image_dim_out']} differs from the CLIP width "
                f"{vision.hidden_size}"
            )
        side = vision.image_size // vision.patch_size
        if side % 2 or (side // 2) ** 2 != self.num_img_tokens:
            raise ValueError(
                f"num_img_tokens={self.num_img_tokens} does not match CLIP's {side}x{side} patches after the 2x2 merge"
            )
        if not -vision.num_hidden_layers <= self.vision_layer_idx < 0:
            raise ValueError(f"img_processor['layer_idx']={self.vision_layer_idx} must be negative and within CLIP")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not supported: Phi-3-V's lm_head is a separate matrix")
        if not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(f"image_token_id={self.image_token_id} is outside the vocabulary (size {self.vocab_size})")

    # -- derived settings ---------------------------------------------------------------------------------------------
    @property
    def vision_config(self) -> CLIPVisionConfig:
        """The CLIP vision tower's configuration (ViT-L/14-336 unless `img_processor['clip_config']` overrides it)."""
        fields = {**CLIP_VIT_LARGE_PATCH14_336, **(self.img_processor or {}).get("clip_config", {})}
        return CLIPVisionConfig(**fields)

    @property
    def vision_layer_idx(self) -> int:
        """Index into CLIP's `hidden_states` of the features used (-2: the penultimate layer's output)."""
        return int((self.img_processor or {}).get("layer_idx", -2))

    @property
    def num_img_tokens(self) -> int:
        """Tokens per 336-px crop after the 2x2 merge (144)."""
        return int((self.img_processor or {}).get("num_img_tokens", 144))

    @property
    def image_dim_out(self) -> int:
        return self.vision_config.hidden_size

    # -- official serialisation ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        source_keys = frozenset(config_dict)
        config_dict = dict(config_dict)
        # The file's `_attn_implementation` ("flash_attention_2" in both official files) is a preference of the remote
        # code; phi3v chooses the backend at load time (flash-attention only when installed), so it is not applied.
        attn = config_dict.pop("_attn_implementation", None)
        name = config_dict.pop("_name_or_path", None)
        config = super().from_dict(config_dict, **kwargs)
        (config[0] if isinstance(config, tuple) else config)._remember_source(source_keys, attn, name)
        return config

    def _remember_source(self, keys: frozenset[str], attn_implementation: str | None, name: str | None) -> None:
        # Plain instance attributes (not dataclass fields): `to_dict` removes them again.
        object.__setattr__(self, "_source_keys", keys)
        object.__setattr__(self, "_source_attn_implementation", attn_implementation)
        object.__setattr__(self, "_source_name_or_path", name)

    def to_dict(self) -> dict[str, Any]:
        """Serialise in the official `config.json` form (readable by the remote code and by phi3v)."""
        full = super().to_dict()
        full.pop("_source_keys", None)
        source_attn = full.pop("_source_attn_implementation", None)
        source_name = full.pop("_source_name_or_path", None)
        rope = full.pop("rope_parameters", None) or {}
        out: dict[str, Any] = {
            key: full[key] for key in OFFICIAL_KEYS if key in full and key not in ("rope_scaling", "rope_theta")
        }
        out["model_type"] = self.model_type
        out["architectures"] = full.get("architectures") or ["Phi3VForCausalLM"]
        out["_name_or_path"] = source_name if source_name is not None else self._name_or_path
        out["rope_theta"] = rope.get("rope_theta", 10000.0)
        if rope.get("rope_type") == "longrope":
            out["rope_scaling"] = {
                "long_factor": list(rope["long_factor"]),
                "short_factor": list(rope["short_factor"]),
                "type": "su",
            }
        else:
            out["rope_scaling"] = None
        dtype = full.get("dtype")
        if dtype is not None:
            out["torch_dtype"] = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        if source_attn is not None:
            out["_attn_implementation"] = source_attn
        if self.image_token_id != IMAGE_TOKEN_ID:
            out["image_token_id"] = self.image_token_id
        # Keys from the source file that are not part of the official form (e.g. a re-save's extra fields).
        known = set(OFFICIAL_KEYS) | set(PHI3V_KEYS)
        source = self._source_keys
        if source is not None:
            for key in source - known:
                if key in full:
                    out[key] = full[key]
            # 3-V's file lacks embd_pdrop, resid_pdrop and pad_token_id: keep that form unless a value changed.
            out = {
                k: v for k, v in out.items() if k in source or k not in OPTIONAL_DEFAULTS or v != OPTIONAL_DEFAULTS[k]
            }
        else:
            out.pop("auto_map", None)
        out["transformers_version"] = full["transformers_version"]
        return {k: copy.deepcopy(out[k]) for k in sorted(out)}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    # -- named configurations -----------------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Phi3VConfig:
        """A named configuration: `"tiny"` (tests, demo) or an official one (`"phi-3-vision-128k-instruct"`,
        `"phi-3.5-vision-instruct"`, read from the packaged copies of the hub's `config.json`)."""
        if name in TINY_CONFIGS:
            return cls.from_dict({**copy.deepcopy(TINY_CONFIGS[name]), **overrides})
        if name in OFFICIAL_CONFIG_FILES:
            text = resources.files("phi3v.model.official_configs").joinpath(OFFICIAL_CONFIG_FILES[name]).read_text()
            return cls.from_dict({**json.loads(text), **overrides})
        known = sorted([*TINY_CONFIGS, *OFFICIAL_CONFIG_FILES])
        raise ValueError(f"unknown Phi-3-V config name {name!r}; known: {', '.join(known)}")


# Validation runs at construction (huggingface_hub's @strict collects `validate_*` methods).
__all__ = ["IMAGE_TOKEN_ID", "TINY_CONFIGS", "Phi3VConfig"]
