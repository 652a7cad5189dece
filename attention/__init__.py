"""Attention kinds behind one interface, layer(x, state) -> (y, state): Infini-attention, full, local, xl."""

from attention.backends import causal_attention
from attention.infini import AttentionState, CausalSelfAttention, InfiniAttention
from attention.memory import Memory, segment_memories
from attention.xl import TransformerXLAttention

__all__ = [
    "AttentionState",
    "CausalSelfAttention",
    "InfiniAttention",
    "Memory",
    "TransformerXLAttention",
    "causal_attention",
    "segment_memories",
]
