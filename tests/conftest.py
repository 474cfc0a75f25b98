"""Shared pytest fixtures: offline hub, tiny tokenizer and processor, deterministic test images.

Everything here runs on CPU without network access. Session-scoped fixtures are shared by all test files: treat
them as read-only (build a fresh object in the test if it needs to change one).
"""

import os

# Before anything imports huggingface_hub/transformers: never try the network, fail at once instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Deterministic RGB test image of the given size: smooth colour blobs (upsampled noise), not flat.

    Args:
        width (`int`): Width in pixels.
        height (`int`): Height in pixels.
        seed (`int`, *optional*, defaults to 0): Seed; the same arguments always give the same pixels.

    Returns:
        `PIL.Image.Image`: An RGB image.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    return Image.fromarray(coarse, mode="RGB").resize((width, height), Image.Resampling.BILINEAR)


@pytest.fixture(scope="session", name="make_image")
def make_image_fixture() -> Callable[..., Image.Image]:
    """The `make_image(width, height, seed=0)` helper, as a fixture."""
    return make_image


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE tokenizer with Phi-3's special tokens (ids 0..8), trained once on `default_corpus()`."""
    from phi3v.model.tokenizer import default_corpus, train_tokenizer

    return train_tokenizer(default_corpus(), vocab_size=1024)


@pytest.fixture(scope="session")
def tiny_processor(tiny_tokenizer):
    """`Phi3VProcessor` with `Phi3VImageProcessor(num_crops=4)` and the tiny tokenizer (``<|image|>`` = id 8)."""
    from phi3v.model.image_processing import Phi3VImageProcessor
    from phi3v.model.processing import Phi3VProcessor

    return Phi3VProcessor(Phi3VImageProcessor(num_crops=4), tiny_tokenizer)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when no CUDA device is present (CI and the dev machines have none)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Phi-3-V model folder (`phi3v init-model`, seed 0). Read-only."""
    from train_helpers import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory):
    """A prepared 48-product synth catalog with square, wide and tall photos. Read-only."""
    from train_helpers import build_prepared_catalog

    return build_prepared_catalog(tmp_path_factory.mktemp("tiny-data"))
