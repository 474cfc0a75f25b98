"""Padding-free (packed) sequences for `Phi3VForCausalLM`: several samples in one row, kept apart exactly.

A packed batch is one row of ``N = sum(lengths)`` tokens holding the samples back to back, with
``cu_seq_lens = [0, l_0, l_0 + l_1, ..., N]`` (int32) and ``position_ids`` restarting at 0 for every sample
(`phi3v.data.packing.pack_batch` makes it). Three things must then be per sample, as if each sample ran alone:

1. **Positions** — ``position_ids`` restart at 0 (the collator's job).
2. **Longrope's factor** (reference §6: ``short_factor`` up to ``original_max_position_embeddings`` = 4096 tokens,
   ``long_factor`` past it). transformers' `Phi3RotaryEmbedding` picks one factor for the whole tensor from
   ``max(position_ids) + 1``; `packed_position_embeddings` picks it per sample from that sample's own length (what
   the sample gets alone, at batch size 1) and builds cos/sin per token from the same inverse frequencies and
   attention scaling transformers computes (``ROPE_INIT_FUNCTIONS["longrope"]``).
3. **Attention that never crosses samples** — by implementation:
   - ``sdpa`` (any device; exact, for tests and CPUs): a block-diagonal causal boolean mask ``[1, 1, N, N]``
     (`block_causal_mask`), passed to transformers' SDPA attention;
   - ``phi3v_varlen`` (``attn_implementation: varlen``; what a packed run uses): on CUDA in bf16/fp16 PyTorch's own
     variable-length flash kernels, `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10; no flash-attn package);
     elsewhere SDPA sample by sample (causal, no mask: the attention work is sum(l_i^2), not N^2). Registered with
     transformers' `AttentionInterface` by `register_varlen_attention`. Unpacked calls of that implementation
     (generation, evaluation) run transformers' SDPA attention unchanged;
   - ``flash_attention_2`` (flash-attn installed): transformers' own varlen path, from the ``cu_seq_lens_q/k`` and
     ``max_length_q/k`` keyword arguments.
   ``eager`` has no packed path (its additive float mask is built by transformers from a padding mask, which a
   packed row does not have): `check_packable` refuses it.

Why written here: transformers detects packed ``position_ids`` for its masks, but its rotary embedding picks the
longrope factor per tensor and it has no binding for torch's varlen kernels; neither peft, accelerate nor trl adds
either for a model whose images are written into the embeddings.
"""

from __future__ import annotations

import inspect
import itertools
import logging

import torch

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = "phi3v_varlen"  # the name `register_varlen_attention` registers with transformers
PACKABLE_ATTENTION = ("sdpa", VARLEN_ATTENTION, "flash_attention_2")


def check_packable(attn_implementation: str) -> None:
    """Raise ValueError when an attention implementation cannot keep packed samples apart."""
    if attn_implementation not in PACKABLE_ATTENTION:
        raise ValueError(
            f"packing needs an attention implementation that keeps the packed samples apart: sdpa (a block-diagonal "
            f"causal mask; any device), varlen (torch's variable-length flash kernels; CUDA, bf16) or "
            f"flash_attention_2 (flash-attn installed); {attn_implementation!r} has no packed path"
        )


def sample_index(cu_seq_lens: torch.Tensor, total: int) -> torch.Tensor:
    """Which sample each packed token belongs to: ``[N]`` int64 (no host synchronisation)."""
    lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()  # [n]
    samples = torch.arange(lengths.numel(), device=cu_seq_lens.device)  # [n]
    return torch.repeat_interleave(samples, lengths, output_size=total)  # [N]


def block_causal_mask(cu_seq_lens: torch.Tensor, total: int) -> torch.Tensor:
    """``[1, 1, N, N]`` bool, True where query i may attend to key j: same sample and j <= i."""
    sample = sample_index(cu_seq_lens, total)  # [N]
    same = sample[:, None] == sample[None, :]  # [N, N]
    causal = torch.ones(total, total, dtype=torch.bool, device=cu_seq_lens.device).tril_()  # [N, N]
    return (same & causal)[None, None]  # [1, 1, N, N]


def packed_position_embeddings(
    rotary: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor, cu_seq_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin ``[1, N, head_dim]`` with longrope's factor chosen per sample by its own length.

    Args:
        rotary: the decoder's `Phi3RotaryEmbedding` (``model.model.rotary_emb``).
        x: ``[1, N, D]`` hidden states (dtype and device of the result).
        position_ids: ``[1, N]``, restarting at 0 for each sample.
        cu_seq_lens: ``[n + 1]`` cumulative sample lengths.
    """
    if rotary.rope_type != "longrope":
        return rotary(x, position_ids)  # the factor does not depend on the length
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = rotary.config.rope_parameters["original_max_position_embeddings"]
    long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](rotary.config, x.device, seq_len=original + 1)  # [hd/2]
    short_inv_freq = rotary.original_inv_freq.to(device=x.device, dtype=torch.float)  # [hd/2]
    lengths = cu_seq_lens[1:] - cu_seq_lens[:-1]  # [n]
    is_long = (lengths > original)[sample_index(cu_seq_lens, position_ids.shape[-1])]  # [N]
    inv_freq = torch.where(is_long[:, None], long_inv_freq.float()[None], short_inv_freq[None])  # [N, hd/2]
    freqs = position_ids[0, :, None].float() * inv_freq  # [N, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [N, hd]
    cos = emb.cos() * rotary.attention_scaling  # [N, hd]
    sin = emb.sin() * rotary.attention_scaling
    return cos[None].to(x.dtype), sin[None].to(x.dtype)  # [1, N, hd]


def packed_attention_inputs(
    attn_implementation: str, cu_seq_lens: torch.Tensor, max_seq_len: int, total: int
) -> tuple[torch.Tensor | None, dict[str, object]]:
    """The attention mask and keyword arguments the decoder layers need for one packed row."""
    check_packable(attn_implementation)
    if attn_implementation == "sdpa":
        return block_causal_mask(cu_seq_lens, total), {}
    cu = cu_seq_lens.to(torch.int32)
    return None, {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_seq_len, "max_length_k": max_seq_len}


# --------------------------------------------------------------------------------------------- varlen kernels
def varlen_available() -> bool:
    """True where torch has `torch.nn.attention.varlen.varlen_attn` and a CUDA device (else `varlen_attention_forward`
    runs SDPA sample by sample)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: packed rows through `varlen_attn` (CUDA, half precision) or SDPA per sample,
    everything else through transformers' SDPA.

    Args:
        query: ``[1, H, N, hd]``; key / value ``[1, H_kv, N, hd]`` (transformers' layout).
        cu_seq_lens_q / cu_seq_lens_k: ``[n + 1]`` int32; None for an unpacked call.

    Returns:
        ``([1, N, H, hd], None)`` as transformers' attention functions do.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:  # generation, evaluation, unpacked training: SDPA exactly
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError("packed attention has no dropout; set attention_dropout to 0")
    if query.is_cuda and query.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        half = torch.get_autocast_dtype("cuda")  # fp32 master weights under bf16 autocast: the kernels take half
        query, key, value = query.to(half), key.to(half), value.to(half)
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and varlen_available()):
        return _attention_per_sample(query, key, value, cu_seq_lens_q, scaling), None
    from torch.nn.attention.varlen import varlen_attn

    q = query[0].transpose(0, 1)  # [N, H, hd]
    k = key[0].transpose(0, 1)  # [N, H_kv, hd]
    v = value[0].transpose(0, 1)
    options: dict[str, object] = {"scale": scaling}
    parameters = inspect.signature(varlen_attn).parameters
    if "is_causal" in parameters:  # torch 2.10 / 2.11
        options["is_causal"] = True
    else:  # later: causal = a window of (-1, 0)
        options["window_size"] = (-1, 0)
    if k.shape[1] != q.shape[1]:
        options["enable_gqa"] = True
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **options)  # [N, H, hd]
    return out[None], None  # [1, N, H, hd]


def _attention_per_sample(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Causal SDPA over each sample's slice (exact; one host read of ``cu_seq_lens``). Returns ``[1, N, H, hd]``."""
    bounds = cu_seq_lens.tolist()
    gqa = key.shape[1] != query.shape[1]
    parts = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, enable_gqa=gqa
        )  # [1, H, l_i, hd]
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()  # [1, N, H, hd]


def register_varlen_attention() -> str:
    """Register `varlen_attention_forward` (and SDPA's mask builder for its unpacked calls) with transformers under
    `VARLEN_ATTENTION`; idempotent. Returns the name to use as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    return VARLEN_ATTENTION
