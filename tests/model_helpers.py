"""Tiny Phi-3-V models and inputs for the model tests (random weights, CPU, deterministic per seed)."""

from __future__ import annotations

import torch

from phi3v.model.configuration import Phi3VConfig
from phi3v.model.modeling import Phi3VForCausalLM

CROP = 336
IMAGE_ID = Phi3VConfig.from_name("tiny").image_token_id
BOS = 1


def image_tokens(h: int, w: int) -> int:
    """Reference §4.6: tokens of an image whose padded HD size is h x w crops."""
    return (h * w + 1) * 144 + 1 + (h + 1) * 12


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> Phi3VForCausalLM:
    """A tiny random model; separators are random (the remote code zero-inits them) so their placement matters."""
    torch.manual_seed(seed)
    config = Phi3VConfig.from_name("tiny", **overrides)
    config._attn_implementation = attn_implementation
    model = Phi3VForCausalLM(config)
    with torch.no_grad():
        model.vision.glb_GN.normal_()
        model.vision.sub_GN.normal_()
    return model.eval()


def image_batch(grids: list[tuple[int, int]], num_crops: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values [n, num_crops + 1, 3, 336, 336] (real crops random, padding zero) and image_sizes [n, 2]."""
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(len(grids), num_crops + 1, 3, CROP, CROP)
    for i, (h, w) in enumerate(grids):
        pixel_values[i, : 1 + h * w] = torch.randn(1 + h * w, 3, CROP, CROP, generator=gen)
    image_sizes = torch.tensor([[h * CROP, w * CROP] for h, w in grids])
    return pixel_values, image_sizes


def prompt_ids(grids: list[tuple[int, int]], text: list[list[int]]) -> torch.Tensor:
    """Reference tokenisation shape: text chunk, image run, BOS-led chunk, ... -> [T] (len(text) == len(grids) + 1)."""
    assert len(text) == len(grids) + 1
    assert all(IMAGE_ID not in chunk for chunk in text), "text chunks must not hold the image id"
    ids = list(text[0])
    for (h, w), chunk in zip(grids, text[1:], strict=True):
        ids += [IMAGE_ID] * image_tokens(h, w) + [BOS, *chunk]
    return torch.tensor(ids)
