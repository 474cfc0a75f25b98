"""Randomly initialised Phi-3-V model folders: the offline stand-in for a hub checkpoint.

`write_random_checkpoint` writes what ``microsoft/Phi-3.5-vision-instruct`` holds (config, generation config,
safetensors in the official layout, tokenizer, processor config) with random weights, so every stage — training,
evaluation, serving — runs end to end on a machine without the hub. The ``tiny`` config gets a tokenizer phi3v
trains itself (`phi3v.model.tokenizer`); a full-size config (for GPU benchmarks) takes a real tokenizer folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from phi3v.model.configuration import TINY_CONFIGS, Phi3VConfig
from phi3v.model.image_processing import Phi3VImageProcessor
from phi3v.model.modeling import Phi3VForCausalLM
from phi3v.model.processing import Phi3VProcessor, load_tokenizer
from phi3v.model.tokenizer import default_corpus, train_tokenizer

logger = logging.getLogger(__name__)


def write_random_checkpoint(
    out: str | Path,
    config_name: str = "tiny",
    seed: int = 0,
    num_crops: int = 4,
    tokenizer_folder: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random-weight Phi-3-V model folder loadable by `Phi3VForCausalLM` and `Phi3VProcessor`.

    Args:
        out: Folder to write (created; existing files with the same names are replaced).
        config_name: A `Phi3VConfig.from_name` name (``tiny``, ``phi-3.5-vision-instruct``, ...).
        seed: Seed of the weights (and nothing else: the tiny tokenizer is deterministic).
        num_crops: The processor's default crop budget.
        tokenizer_folder: Tokenizer to copy in; required unless ``config_name`` is a tiny config.
        dtype: Weights' dtype.

    Returns:
        `Path`: ``out``.

    Raises:
        ValueError: A full-size config without ``tokenizer_folder``, or a tokenizer whose vocabulary does not fit.
    """
    out = Path(out)
    config = Phi3VConfig.from_name(config_name)
    if tokenizer_folder is None:
        if config_name not in TINY_CONFIGS:
            raise ValueError(f"{config_name}: pass tokenizer_folder (phi3v trains tokenizers for tiny configs only)")
        tokenizer = train_tokenizer(default_corpus(), vocab_size=config.vocab_size)
    else:
        tokenizer = load_tokenizer(tokenizer_folder)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {config.vocab_size}")
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=num_crops), tokenizer)
    # a trained tokenizer on a full-size config has its <|image|> elsewhere than 32044: model and processor must agree
    config.image_token_id = processor.image_token_id
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(config).to(dtype)
    with torch.no_grad():  # the remote code zero-inits the separators; random ones make their placement matter
        model.vision.glb_GN.normal_(std=0.02)
        model.vision.sub_GN.normal_(std=0.02)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("wrote a random %s model to %s", config_name, out)
    return out
