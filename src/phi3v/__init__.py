"""phi3v: fine-tune Phi-3-Vision / Phi-3.5-Vision to read product photos.

Public API (named like the Hugging Face ecosystem)::

    from phi3v import Phi3VConfig, Phi3VImageProcessor, Phi3VProcessor, Phi3VForCausalLM

The names are imported on first use, so `phi3v --help` does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "Phi3VConfig": "phi3v.model.configuration",
    "Phi3VForCausalLM": "phi3v.model.modeling",
    "Phi3VImageProcessor": "phi3v.model.image_processing",
    "Phi3VProcessor": "phi3v.model.processing",
}
__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VImageProcessor", "Phi3VProcessor"]

if TYPE_CHECKING:
    from .model.configuration import Phi3VConfig
    from .model.image_processing import Phi3VImageProcessor
    from .model.modeling import Phi3VForCausalLM
    from .model.processing import Phi3VProcessor


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'phi3v' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *__all__]
