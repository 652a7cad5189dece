"""Llama-style decoder LM with Infini-attention, full, segment-local or Transformer-XL-like attention."""

from models.config import ModelConfig
from models.layers import DecoderBlock, RMSNorm, SwiGLU
from models.rope import RotaryEmbedding
from models.transformer import ModelState, Transformer, TransformerOutput, detach_state, map_state

__all__ = [
    "DecoderBlock",
    "ModelConfig",
    "ModelState",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "Transformer",
    "TransformerOutput",
    "detach_state",
    "map_state",
]
