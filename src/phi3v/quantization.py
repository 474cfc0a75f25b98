"""4-bit NF4 weights for ``mode: qlora`` (bitsandbytes), shared by training and by loading a QLoRA adapter.

Training (`phi3v.train`) replaces each linear layer of the LM decoder (``model.layers.*``: ``qkv_proj``,
``o_proj``, ``gate_up_proj``, ``down_proj``) by a `bitsandbytes.nn.Linear4bit` whose weight is quantized to NF4
(blocks of 64, double-quantized absmax) from the checkpoint's weights, on the GPU or, without one, on the CPU
(bitsandbytes >= 0.50 runs NF4 forward and backward on CPU). The LoRA adapter then learns a correction to those
NF4 weights.

`nf4_round_trip` computes the same NF4 codes again from the same checkpoint and dequantizes them: the weights the
adapter was trained against, in full precision, which `phi3v.inference` merges a QLoRA adapter into by default
(``--qlora-base nf4``; docs/train.md, "QLoRA", has the reasons and the measured difference to the original weights).

bitsandbytes is optional: ``pip install 'phi3v[qlora]'``. `import_bitsandbytes` raises an ImportError that says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'phi3v[qlora]'"
CPU_BITSANDBYTES = "0.50.2"  # the release whose CPU NF4 forward and backward phi3v's tests ran (the extra's floor)
QUANT_TYPE = "nf4"
BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights: one absmax per 64 weights
COMPRESS_STATISTICS = True  # the absmax values themselves quantized to 8 bits (QLoRA's "double quantization")


def import_bitsandbytes(purpose: str) -> Any:
    """The ``bitsandbytes`` module.

    Raises:
        ImportError: bitsandbytes is not installed (or cannot load); the message names ``purpose`` and the install
            command.
    """
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"{purpose} needs bitsandbytes, which cannot be imported ({err}): {INSTALL_HINT}") from err
    return bitsandbytes


def lm_linear_layers(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, name, linear)`` for every plain `nn.Linear` of the LM decoder layers (``model.model.layers``),
    in module order: the layers QLoRA quantizes. The vision tower, projector, embeddings and ``lm_head`` are not
    among them."""
    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    yield parent, name, child


def nf4_weight(weight: torch.Tensor, device: torch.device | str) -> Any:
    """``weight`` (out, in) quantized to a bitsandbytes ``Params4bit`` on ``device`` (moving it there quantizes).

    The result's data is the packed uint8 codes, (out * in / 2, 1); its ``quant_state`` holds the absmax values,
    the NF4 code book, the original shape and dtype (``weight``'s).
    """
    bnb = import_bitsandbytes("NF4 quantization")
    params = bnb.nn.Params4bit(
        weight.detach().contiguous(),  # (out, in); quantized on ``device`` by the move below
        requires_grad=False,
        blocksize=BLOCKSIZE,
        compress_statistics=COMPRESS_STATISTICS,
        quant_type=QUANT_TYPE,
    )
    return params.to(device)


def nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """A frozen `bitsandbytes.nn.Linear4bit` with ``linear``'s weight in NF4 (and its bias, if any, as it is).

    bitsandbytes' CPU inference shortcut is switched off. On a CPU with AVX512-BF16 a forward in eval mode without
    gradients repacks the weight in place for a bf16 kernel whose outputs differ from the dequantized weights' (by
    6e-3 to 8e-3 on a 64x192 layer, bitsandbytes 0.50.2), and so do the training forwards after it, whose backward
    then gives the input no gradient (the adapters of the layers below would get none) or, with a bias, fails.
    Training alternates evaluation and training steps, so every forward here dequantizes.
    """
    bnb = import_bitsandbytes("mode qlora")
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=COMPRESS_STATISTICS,
        quant_type=QUANT_TYPE,
        device="meta",  # the weight is replaced below: no random init
    )
    quantized.weight = nf4_weight(linear.weight.data, device)
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    quantized.support_avx512bf16_for_cpu = False
    return quantized


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) quantized to NF4 exactly as `nf4_linear` does, then dequantized: (out, in), in
    ``weight``'s dtype, on its device. A `Linear4bit` forward computes ``x @ nf4_round_trip(w).T``."""
    bnb = import_bitsandbytes("NF4 dequantization")
    params = nf4_weight(weight, weight.device)
    return bnb.functional.dequantize_4bit(params.data, params.quant_state).to(weight.dtype)  # (out, in)


def round_trip_lm_weights(model: nn.Module) -> int:
    """Replace, in place, the weight of every LM decoder linear layer (`lm_linear_layers`) by its NF4 round trip:
    the weights a QLoRA run trained its adapter against. Returns the number of layers changed."""
    count = 0
    with torch.no_grad():
        for _, _, linear in lm_linear_layers(model):
            linear.weight.copy_(nf4_round_trip(linear.weight))  # (out, in)
            count += 1
    return count


def checkpoint_dtype(model: str) -> torch.dtype:
    """The dtype a checkpoint stores its weights in (its config's ``torch_dtype``; float32 when it names none)."""
    from phi3v.model.configuration import Phi3VConfig
    from phi3v.model.hub import resolve_model_folder

    config = Phi3VConfig.from_pretrained(resolve_model_folder(model, allow_patterns=["*.json"]))
    return config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
