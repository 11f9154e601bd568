"""ERNIE-4.5-MoE: config, model, streaming checkpoint loader."""

from quantkit.model.config import ErnieMoeConfig
from quantkit.model.ernie import ErnieMoeForCausalLM
from quantkit.model.layers import KVCache
from quantkit.model.loader import Checkpoint, load_model, stream_layers

__all__ = ["Checkpoint", "ErnieMoeConfig", "ErnieMoeForCausalLM", "KVCache", "load_model", "stream_layers"]
