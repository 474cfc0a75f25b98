"""`Phi3VForCausalLM`: Phi-3-Vision natively on transformers' `Phi3ForCausalLM` and `CLIPVisionModel`.

Reference: `Phi3VForCausalLM` / `Phi3VModel` in the hub's `modeling_phi3_v.py` (microsoft/Phi-3-vision-128k-instruct,
microsoft/Phi-3.5-vision-instruct); ../shared/docs/phi3v-reference.md §2, §3.5, §6.

The language model *is* transformers' `Phi3ForCausalLM` (same module and weight names as the official checkpoint, SDPA
or flash-attention, longrope with the 4096-token switch, KV cache, gradient checkpointing); this class adds the image
embedding under `model.vision_embed_tokens` (the official place) and one step before the decoder:

    input_ids [B, T] --embed_tokens--> [B, T, D]
    placeholder positions (input_ids == image_token_id) <-- masked_scatter -- image features [sum tokens, D]

Packed batches (training with ``packing: true``) pass ``cu_seq_lens`` and ``max_seq_len``: one row of samples back to
back, each with its own positions, longrope factor and attention (`packed.py`); the decoder layers are then called
directly with those, the rest is the same modules.

Placeholders are one real token id (`<|image|>`, 32044 officially) rather than the remote code's negative ids, which
break `generate`'s logits processors. Images enter at prefill only; decode steps embed the new token alone.
Loading and saving use the official safetensors layout (`checkpoint.py`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, Phi3ForCausalLM, Phi3Model
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel
from transformers.utils import is_flash_attn_2_available

from . import checkpoint, packed
from .configuration import Phi3VConfig
from .hub import resolve_model_folder
from .vision import ImageSeparators, Phi3VImageEmbedding

logger = logging.getLogger(__name__)


class Phi3VForCausalLM(Phi3ForCausalLM):
    """Phi-3 language model + CLIP image embedding, loading and saving the official checkpoints unchanged."""

    config_class = Phi3VConfig
    config: Phi3VConfig
    input_modalities = ("image", "text")
    main_input_name = "input_ids"

    def __init__(self, config: Phi3VConfig):
        Phi3PreTrainedModel.__init__(self, config)  # not Phi3ForCausalLM.__init__: the vision part joins before init
        self.model = Phi3Model(config)
        self.model.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # From the attributes: the official-form `to_dict` omits 3-V's absent keys (pad_token_id), which
        # `GenerationConfig.from_model_config` would then lose.
        self.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        # `load_state_dict` takes official-layout tensors too (Trainer's resume / best-model reload read the files
        # `save_pretrained` wrote).
        self.register_load_state_dict_pre_hook(checkpoint.official_state_dict_pre_hook)

    @property
    def vision(self) -> Phi3VImageEmbedding:
        return self.model.vision_embed_tokens

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ImageSeparators) and module.glb_GN.device.type != "meta":
            # The remote code creates both separators as zeros.
            with torch.no_grad():
                module.glb_GN.zero_()
                module.sub_GN.zero_()

    # -- forward ------------------------------------------------------------------------------------------------------
    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written over the image placeholders.

        Args:
            input_ids: ``[B, T]``, each image a run of `config.image_token_id` of its token count.
            pixel_values: ``[n, num_crops + 1, 3, 336, 336]`` for the n images, in placeholder order.
            image_sizes: ``[n, 2]`` padded HD (height, width).
            cache: the KV cache; placeholders without images are allowed only when continuing from one.

        Returns:
            ``[B, T, hidden_size]``.

        Raises:
            ValueError: when the number of placeholders differs from the number of image features.
        """
        embeds = self.model.embed_tokens(input_ids)  # [B, T, D]
        is_image = input_ids == self.config.image_token_id  # [B, T]
        placeholders = int(is_image.sum())
        if pixel_values is None:
            if placeholders and (cache is None or cache.get_seq_length() == 0):
                raise ValueError(
                    f"input_ids hold {placeholders} image placeholder tokens (id {self.config.image_token_id}) "
                    "but no pixel_values were given"
                )
            return embeds
        if image_sizes is None:
            raise ValueError("pixel_values were given without image_sizes")
        features = self.vision(pixel_values, image_sizes)  # [tokens, D]
        if features.shape[0] != placeholders:
            raise ValueError(
                f"input_ids hold {placeholders} image placeholder tokens (id {self.config.image_token_id}) but the "
                f"{pixel_values.shape[0]} image(s) give {features.shape[0]} features (image_sizes "
                f"{image_sizes.tolist()}); build inputs with Phi3VProcessor so each <|image_N|> expands to its "
                "image's token count"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))  # [B, T, D]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cu_seq_lens: torch.Tensor | None = None,
        max_seq_len: int | None = None,
        **kwargs,
    ):
        """Phi3ForCausalLM's forward with images. `labels` use -100 for ignored positions; Trainer's
        `num_items_in_batch` (in kwargs) reaches the loss so multi-process losses are normalised right.

        A packed row (`phi3v.data.packing.pack_batch`) adds ``cu_seq_lens`` ``[n + 1]`` (cumulative sample lengths)
        and ``max_seq_len``, with ``position_ids`` restarting per sample and no ``attention_mask``."""
        if "past_key_values" in kwargs:  # the pre-5.x name of `cache`
            cache = kwargs.pop("past_key_values")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_sizes, cache)
        elif pixel_values is not None:
            raise ValueError("pass images with input_ids, not with inputs_embeds")
        if cu_seq_lens is not None:
            if attention_mask is not None or cache is not None or use_cache or position_ids is None:
                raise ValueError(
                    "a packed row takes position_ids and cu_seq_lens, and no attention_mask or cache (training only)"
                )
            return self._forward_packed(
                inputs_embeds, position_ids, cu_seq_lens, max_seq_len, labels, logits_to_keep, **kwargs
            )
        return super().forward(
            input_ids=None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _forward_packed(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.LongTensor,
        cu_seq_lens: torch.Tensor,
        max_seq_len: int | None,
        labels: torch.LongTensor | None,
        logits_to_keep: int | torch.Tensor,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`Phi3Model.forward` for one packed row: the same layers, norm, head and loss, with per-sample rotary
        factors and an attention that never crosses samples (`packed.py`)."""
        if inputs_embeds.shape[0] != 1:
            raise ValueError(f"a packed batch is one row, got {inputs_embeds.shape[0]}")
        total = inputs_embeds.shape[1]
        lm = self.model
        position_embeddings = packed.packed_position_embeddings(
            lm.rotary_emb, inputs_embeds, position_ids, cu_seq_lens
        )  # ([1, N, hd], [1, N, hd])
        if max_seq_len is None:
            max_seq_len = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
        mask, attention_kwargs = packed.packed_attention_inputs(
            self.config._attn_implementation, cu_seq_lens, max_seq_len, total
        )
        hidden_states = inputs_embeds  # [1, N, D]
        for layer in lm.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **attention_kwargs,
            )
        hidden_states = lm.norm(hidden_states)
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))  # [1, N, V]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, pixel_values=None, image_sizes=None, is_first_iteration=False, **kwargs
    ):
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, is_first_iteration=is_first_iteration, **kwargs
        )
        # Images enter at prefill only. Without a cache (use_cache=False, or Phi3's cache reset when a sequence first
        # crosses original_max_position_embeddings) the whole prefix, images included, is recomputed.
        if is_first_iteration or model_inputs.get("cache") is None:
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_sizes"] = image_sizes
        else:
            model_inputs.pop("pixel_values", None)
            model_inputs.pop("image_sizes", None)
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Repeat each sample's own group of images with it (beam search, `num_return_sequences`).

        The base class repeats every tensor row by row, which for `pixel_values` mixes up the images of a sample
        that has several: [A, B] would become [A, A, B, B] where the expanded rows need [A, B, A, B].
        """
        pixel_values = model_kwargs.pop("pixel_values", None)
        image_sizes = model_kwargs.pop("image_sizes", None)
        if expand_size > 1 and pixel_values is not None and input_ids is not None:
            order = self._images_by_sample(input_ids, image_sizes)
            index = torch.tensor([i for images in order for _ in range(expand_size) for i in images])
            pixel_values = pixel_values[index.to(pixel_values.device)]
            image_sizes = image_sizes[index.to(image_sizes.device)]
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs.update(pixel_values=pixel_values, image_sizes=image_sizes)
        return input_ids, model_kwargs

    def _images_by_sample(self, input_ids: torch.Tensor, image_sizes: torch.Tensor) -> list[list[int]]:
        """Indices of each row's images: images fill placeholders in order, row after row."""
        tokens = self.vision.image_token_counts(image_sizes)
        placeholders = (input_ids == self.config.image_token_id).sum(dim=1).tolist()
        groups, image = [], 0
        for row, count in enumerate(placeholders):
            group = []
            while count > 0 and image < len(tokens):
                group.append(image)
                count -= tokens[image]
                image += 1
            if count != 0:
                raise ValueError(f"row {row}: its image placeholders do not match whole images (image_sizes)")
            groups.append(group)
        return groups

    # -- checkpoints --------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        config: Phi3VConfig | None = None,
        **kwargs,
    ) -> Phi3VForCausalLM:
        """Load an official (or phi3v-saved) checkpoint from a folder or a hub id.

        Weights stream shard by shard, tensor by tensor, straight into `dtype` on `device`: no full fp32 copy and no
        random initialisation of a 4B model on the way. Unknown, missing or mis-shaped keys fail with their names.

        Args:
            pretrained_model_name_or_path: a local folder or a hub id such as "microsoft/Phi-3.5-vision-instruct".
            dtype: "auto" (the checkpoint's `torch_dtype`), or a dtype such as torch.bfloat16 / torch.float32.
            device: where the weights go (default CPU). `device_map` is not supported. ``"meta"``: parameters stay
                on the meta device, nothing is read (headers are still checked); buffers are real. For ranks that
                receive the weights from rank 0.
            attn_implementation: "sdpa", "eager", "flash_attention_2" or "varlen" (SDPA, but packed training rows run
                torch's variable-length flash kernels: `packed.py`); default flash-attention when installed and
                the dtype is half precision on CUDA, else SDPA (the checkpoint's own "flash_attention_2" is ignored).
            revision, cache_dir, local_files_only, token: passed to the hub download.
            config: use this config instead of the folder's `config.json`.
        """
        if "torch_dtype" in kwargs:
            dtype = kwargs.pop("torch_dtype")
        if kwargs.pop("device_map", None) is not None:
            raise ValueError("device_map is not supported: pass device=... (the model loads tensor by tensor)")
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        folder = resolve_model_folder(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        if config is None:
            config = Phi3VConfig.from_pretrained(folder)
        if dtype == "auto":
            dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if attn_implementation in ("varlen", packed.VARLEN_ATTENTION):
            attn_implementation = packed.register_varlen_attention()
        config._attn_implementation = attn_implementation or _default_attn_implementation(dtype, device)

        model = checkpoint.build_on_meta(cls, config)
        if device.type == "meta":  # a rank that gets its weights from rank 0 (FSDP2's cpu_ram_efficient_loading)
            checkpoint.scan_official_checkpoint(model, folder)  # the same key and shape checks; no tensor is read
            for param in model.parameters():
                param.data = param.data.to(dtype)  # still meta: only the dtype the weights will arrive in
        else:
            checkpoint.load_official_checkpoint(model, folder, dtype=dtype, device=device)
            model.to(device)  # non-persistent buffers (rotary frequencies, CLIP position ids)
        model.config.dtype = dtype
        if (Path(folder) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        model.config.name_or_path = str(pretrained_model_name_or_path)
        model.eval()
        return model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: int | str = "5GB",
        is_main_process: bool = True,
        safe_serialization: bool = True,
        **kwargs,
    ) -> None:
        """Write the official layout: `config.json`, `generation_config.json` and safetensors shards with
        `model.safetensors.index.json` (names as in microsoft/Phi-3-vision-128k-instruct), loadable by phi3v and by
        the official remote code. `state_dict` (phi3v names, e.g. from Trainer) replaces the model's own tensors."""
        if not safe_serialization:
            raise ValueError("phi3v writes safetensors only")
        if not is_main_process:
            return
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.dtype = self.dtype
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(folder)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(folder)
        checkpoint.save_official_checkpoint(self, folder, state_dict=state_dict, max_shard_size=max_shard_size)


def _default_attn_implementation(dtype: torch.dtype, device: torch.device) -> str:
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"
