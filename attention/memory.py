"""Compressive memory of Infini-attention (Munkhdalai et al., 2024, arXiv 2404.07143).

Equation numbers follow v1 of the paper (v2 renumbers them (7)-(10)):
    sigma(x) = ELU(x) + 1
    (3) retrieval:     A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})
    (4) linear update: M_s = M_{s-1} + sigma(K)^T V,  z_s = z_{s-1} + sum_t sigma(K_t)
    (5) delta update:  M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1})),  z_s as in (4)

Shape legend: B batch, Hkv key/value heads, S segments, N segment length, n tokens, Dk key dim, Dv value dim.

This module holds the state and its batched forms; the write rules the layers use (the paper's (4) and (5) and
research variants), with their feature maps and per-token references, live in attention/rules/; the equations
one function each, as written (for tests and benchmarks), in attention/reference.py.

Choices the paper leaves open, and ours:
  * M_0 = 0, z_0 = 0: an empty memory holds nothing, so the first segment reads nothing from it.
  * The denominator is clamped from below at EPS, not shifted by it: with z_0 = 0 the numerator is exactly 0 too,
    so retrieval from an empty memory returns exactly 0 (never 0/0 = NaN). Once anything has been written the
    denominator is a sum of positive terms (sigma > 0) over Dk dimensions and every written token, orders of
    magnitude above EPS for any realistic activations, so the clamp does not bias a real retrieval.
  * The state is float32 (or float64) whatever the compute dtype: M and z are running sums over up to millions
    of tokens, which bf16 would round away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from attention.rules import MemoryRule

EPS = 1e-6  # lower clamp of the retrieval denominator sigma(Q) z


class Memory(NamedTuple):
    """Compressive memory of one layer: one (M, z) pair per key/value head."""

    matrix: Tensor  # M: (B, Hkv, Dk, Dv), float32 (float64 for a float64 model)
    norm: Tensor  # z: (B, Hkv, Dk)

    @staticmethod
    def empty(batch: int, n_kv_heads: int, key_dim: int, value_dim: int, device=None, dtype=None) -> Memory:
        """M_0 = 0, z_0 = 0, in memory_dtype(dtype)."""
        dtype = memory_dtype(dtype or torch.float32)
        return Memory(
            torch.zeros(batch, n_kv_heads, key_dim, value_dim, device=device, dtype=dtype),
            torch.zeros(batch, n_kv_heads, key_dim, device=device, dtype=dtype),
        )


def memory_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The memory is kept in at least float32: bf16/fp16 models get float32, float64 models float64."""
    return torch.promote_types(compute_dtype, torch.float32)


# The layers keep numerator and denominator of (3) together: the augmented state [M | z] is (..., Dk, Dv + 1), and
# the augmented values [V | 1] make one matmul sigma(K)^T [V | 1] = [sigma(K)^T V | sum_t sigma(K_t)] give both
# increments of (4), and one matmul sigma(Q) [M | z] = [sigma(Q) M | sigma(Q) z] both terms of (3). That halves the
# matmul calls and avoids the (n x Dk) @ (Dk x 1) products, whose backward is slow on CPU.


def augment(memory: Memory) -> Tensor:
    """Memory -> [M | z]: (B, Hkv, Dk, Dv + 1)."""
    return torch.cat([memory.matrix, memory.norm.unsqueeze(-1)], dim=-1)


def split_augmented(augmented: Tensor) -> Memory:
    """[M | z] -> Memory(M, z), contiguous (the state outlives the call; checkpoints want contiguous tensors)."""
    return Memory(augmented[..., :-1].contiguous(), augmented[..., -1].contiguous())


def with_ones(values: Tensor) -> Tensor:
    """V (..., n, Dv) -> [V | 1] (..., n, Dv + 1), contiguous."""
    return torch.cat([values, values.new_ones(*values.shape[:-1], 1)], dim=-1)


def segment_memories(
    memory: Memory, sigma_k: Tensor, values: Tensor, n_complete: int, update: str | MemoryRule,
    strength: Tensor | None = None,
) -> tuple[Tensor, Tensor, Memory]:
    """Memory state seen by every segment of a segment-aligned block, and the state after it.

    sigma_k: (B, Hkv, S, N, Dk), values: (B, Hkv, S, N, Dv), float32, segment s covering tokens [sN, (s+1)N).
    Segments 0..n_complete-1 are complete and are written to memory; a last incomplete segment (if
    n_complete == S - 1) is read from but not written (its tokens wait in the streaming cache until the segment
    is complete).

    Returns M_prev (B, Hkv, S, Dk, Dv) and z_prev (B, Hkv, S, Dk), where [:, :, s] is the state *before*
    segment s (retrieval precedes the update), and the memory after the n_complete complete segments.
    update: a rule name (attention/rules) or a MemoryRule; strength: per-token write strength (B, Hkv, S, N) or
    None. The un-augmented interface to `MemoryRule.prefix` (the layers call `prefix` itself, on [M | z]).
    """
    from attention.rules import MemoryRule, rule_names

    if not isinstance(update, MemoryRule):
        if update not in rule_names():
            raise ValueError(f"unknown memory update {update!r}; expected one of {rule_names()}")
        from attention.rules import build_rule

        update = build_rule(update, sigma_k.shape[1], values.shape[-1])
    S = sigma_k.shape[2]
    if not 0 <= n_complete <= S or n_complete < S - 1:
        raise ValueError(f"n_complete={n_complete} must be S or S - 1 for S={S} segments")
    augmented = augment(memory)
    if n_complete:
        values_aug = with_ones(values[:, :, :n_complete])
        beta = None if strength is None else strength[:, :, :n_complete]
        prev, final = update.prefix(augmented, sigma_k[:, :, :n_complete], values_aug, beta)
    else:
        prev, final = augmented.unsqueeze(2)[:, :, :0], augmented
    if n_complete < S:  # the incomplete segment reads the state after the complete ones
        prev = torch.cat([prev, final.unsqueeze(2)], dim=2)
    return prev[..., :-1], prev[..., -1], split_augmented(final) if n_complete else memory
