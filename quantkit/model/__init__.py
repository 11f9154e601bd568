"""The MoE model: config (``MoeConfig``, per-family ``arch`` specs), model, streaming checkpoint loader."""

from quantkit.model.causal_lm import ErnieMoeForCausalLM, MoeForCausalLM
from quantkit.model.config import ErnieMoeConfig, MoeConfig
from quantkit.model.layers import KVCache
from quantkit.model.loader import Checkpoint, load_model, stream_layers

__all__ = ["Checkpoint", "ErnieMoeConfig", "ErnieMoeForCausalLM", "KVCache", "MoeConfig", "MoeForCausalLM", "load_model",
           "stream_layers"]
