"""phi3v: fine-tune Phi-3-Vision / Phi-3.5-Vision to read product photos.

Public API (named like the Hugging Face ecosystem)::

    from phi3v import Phi3VConfig, Phi3VImageProcessor, Phi3VProcessor, Phi3VForCausalLM
"""

from .model.configuration import Phi3VConfig
from .model.image_processing import Phi3VImageProcessor
from .model.modeling import Phi3VForCausalLM
from .model.processing import Phi3VProcessor

__version__ = "0.1.0"
__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VImageProcessor", "Phi3VProcessor"]
