"""quantkit: quantize Mixture-of-Experts LLMs (ERNIE-4.5-MoE first) to 4 and 2 bits, and run them."""

__version__ = "0.1.0"

from quantkit.api import load, load_tokenizer  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402

__all__ = ["QuantkitError", "__version__", "load", "load_tokenizer"]
