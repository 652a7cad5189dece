"""Attention layers with explicit streaming state: `full` (the baseline), `local` (the ablation) and `infini`.

Every layer has one interface:  layer(x, state) -> (y, state)  with x: (B, T, dim), state None for a fresh
stream. Feeding a stream in any chunking (whole, per segment, token by token) gives the same outputs.

Segments are fixed by absolute position in the stream: segment s covers tokens [sN, (s+1)N). A call may start
in the middle of a segment (its earlier tokens are in the state's key/value cache) and end in the middle of
one (its tokens stay in the cache until the segment is complete and written to memory). Inside a call the
queries split into a *head* that completes the cached segment and a *body* that starts on a segment boundary;
the body's segments run as one batched attention call and one batched memory computation.

RoPE positions restart at 0 in every segment. RoPE is relative, so this equals absolute positions for the
segment-local attention, and it keeps the rotation angles below N however long the stream grows.

Shape legend: B batch, T new tokens, L cached tokens, P = L + T, H query heads, Hkv key/value heads,
G = H / Hkv, S segments, N segment length, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention.backends import causal_attention
from attention.memory import (
    Memory,
    delta_update,
    feature_map,
    linear_update,
    memory_dtype,
    retrieve,
    segment_memories,
)

Rope = Callable[[Tensor, Tensor], Tensor]  # (x (..., T, D), positions (T,)) -> rotated x
MEMORY_UPDATES = ("linear", "delta")


class AttentionState(NamedTuple):
    """Streaming state of one attention layer. Held by the caller, never by the module."""

    keys: Tensor  # (B, Hkv, L, D) un-rotated keys of the unfinished segment (`full`: of the whole stream)
    values: Tensor  # (B, Hkv, L, D)
    memory: Memory | None  # compressive memory (`infini` only)


def split_at_boundary(cached: int, new: int, segment_len: int | None) -> tuple[int, int]:
    """Split `new` queries into (head, body): head completes the cached partial segment, body starts on a
    segment boundary. segment_len None means one unbounded segment (full attention)."""
    if segment_len is None:
        return new, 0
    if cached == 0:
        return 0, new
    head = min(new, segment_len - cached)
    return head, new - head


def _pad_time(x: Tensor, length: int) -> Tensor:
    """Zero-pad dim -2 (time) of x up to `length`."""
    return F.pad(x, (0, 0, 0, length - x.shape[-2]))


def segmented_causal_attention(
    q: Tensor, keys: Tensor, values: Tensor, segment_len: int | None, rope: Rope, backend: str
) -> Tensor:
    """Causal softmax attention restricted to each query's own segment (the paper's A_dot).

    q: (B, H, T, D) un-rotated queries of the new tokens; keys, values: (B, Hkv, P, D) un-rotated, the cached
    tokens of the current segment first. Returns (B, H, T, D).
    """
    B, H, T, D = q.shape
    P = keys.shape[2]
    L = P - T
    head, body = split_at_boundary(L, T, segment_len)
    outputs = []
    if head:
        n = L + head
        positions = torch.arange(n, device=q.device)
        q_head = rope(q[:, :, :head], positions[L:])
        k_head = rope(keys[:, :, :n], positions)
        outputs.append(causal_attention(q_head, k_head, values[:, :, :n], backend))  # (B, H, head, D)
    if body:
        N = segment_len
        S = math.ceil(body / N)
        Hkv = keys.shape[1]
        # (B, h, S*N, D) -> (B, h, S, N, D) -> (B, S, h, N, D): segments become a batch dimension; zero padding
        # sits after every real query of the last segment, so the causal mask hides it.
        q_body = _pad_time(q[:, :, head:], S * N).view(B, H, S, N, D).transpose(1, 2)
        k_body = _pad_time(keys[:, :, L + head :], S * N).view(B, Hkv, S, N, D).transpose(1, 2)
        v_body = _pad_time(values[:, :, L + head :], S * N).view(B, Hkv, S, N, D).transpose(1, 2)
        positions = torch.arange(N, device=q.device)
        out = causal_attention(rope(q_body, positions), rope(k_body, positions), v_body, backend)  # (B,S,H,N,D)
        outputs.append(out.transpose(1, 2).reshape(B, H, S * N, D)[:, :, :body])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def segmented_memory_retrieval(
    sigma_q: Tensor, sigma_k: Tensor, values: Tensor, memory: Memory, segment_len: int, update: str
) -> tuple[Tensor, Memory]:
    """Each query reads the memory as it stood before its segment (3); complete segments are written (4)/(5).

    sigma_q: (B, H, T, Dk) of the new tokens; sigma_k: (B, Hkv, P, Dk) and values: (B, Hkv, P, Dv) of the
    cached + new tokens; all float32. Returns A_mem (B, H, T, Dv) and the memory after every complete segment.
    """
    B, H, T, Dk = sigma_q.shape
    Hkv, P, Dv = values.shape[1], values.shape[2], values.shape[3]
    G = H // Hkv
    N = segment_len
    L = P - T
    head, body = split_at_boundary(L, T, N)
    write = linear_update if update == "linear" else delta_update
    outputs = []
    if head:
        q_head = sigma_q[:, :, :head].reshape(B, Hkv, G, head, Dk)
        a_head = retrieve(q_head, memory.matrix.unsqueeze(2), memory.norm.unsqueeze(2))  # (B, Hkv, G, head, Dv)
        outputs.append(a_head.reshape(B, H, head, Dv))
        if L + head == N:  # the cached segment is now complete: write it
            memory = Memory(*write(memory.matrix, memory.norm, sigma_k[:, :, :N], values[:, :, :N]))
    if body:
        S = math.ceil(body / N)
        k_body = _pad_time(sigma_k[:, :, L + head :], S * N).view(B, Hkv, S, N, Dk)
        v_body = _pad_time(values[:, :, L + head :], S * N).view(B, Hkv, S, N, Dv)
        matrix_prev, norm_prev, memory = segment_memories(memory, k_body, v_body, body // N, update)
        q_body = _pad_time(sigma_q[:, :, head:], S * N).view(B, Hkv, G, S, N, Dk)
        a_body = retrieve(q_body, matrix_prev.unsqueeze(2), norm_prev.unsqueeze(2))  # (B, Hkv, G, S, N, Dv)
        outputs.append(a_body.reshape(B, H, S * N, Dv)[:, :, :body])
    a_mem = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return a_mem, memory


class CausalSelfAttention(nn.Module):
    """Grouped-query causal self-attention, no biases. segment_len None: `full` attention over the whole stream
    (the baseline); segment_len N: `local` attention inside segments of N tokens, no memory (the ablation)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        segment_len: int | None,
        rope: Rope,
        backend: str = "auto",
    ):
        super().__init__()
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"need dim % n_heads == 0 and n_heads % n_kv_heads == 0, got {dim}, {n_heads}, "
                             f"{n_kv_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.segment_len = segment_len
        self.rope = rope
        self.backend = backend
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> AttentionState:
        empty = torch.zeros(batch, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return AttentionState(empty, empty, None)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, dim) -> q (B, H, T, D), k and v (B, Hkv, T, D), un-rotated."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _extend_cache(self, state: AttentionState | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if state is None or state.keys.shape[2] == 0:
            return k, v
        return torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)  # (B, Hkv, P, D)

    def _unfinished(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """The cache carried to the next call: the tokens of the unfinished segment (`full`: all tokens)."""
        if self.segment_len is None:
            return keys, values
        keep = keys.shape[2] % self.segment_len
        # clone: a view would pin the whole (B, Hkv, P, D) tensor of this call in memory
        return keys[:, :, keys.shape[2] - keep :].clone(), values[:, :, values.shape[2] - keep :].clone()

    def _output(self, a: Tensor) -> Tensor:
        B, H, T, D = a.shape
        return self.wo(a.transpose(1, 2).reshape(B, T, H * D))  # (B, H, T, D) -> (B, T, H*D) -> (B, T, dim)

    def forward(self, x: Tensor, state: AttentionState | None = None) -> tuple[Tensor, AttentionState]:
        q, k, v = self.project(x)
        keys, values = self._extend_cache(state, k, v)
        a_dot = segmented_causal_attention(q, keys, values, self.segment_len, self.rope, self.backend)
        return self._output(a_dot), AttentionState(*self._unfinished(keys, values), None)


class InfiniAttention(CausalSelfAttention):
    """Infini-attention: segment-local causal attention + a compressive memory carried across segments,
    mixed by a learned per-head gate (6):  A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot.

    The memory uses the same Q/K/V projections as the local path, *before* RoPE, and there is one memory per
    key/value head: with grouped-query attention the query heads of a group read their KV head's memory, each
    with its own sigma(Q) and its own gate.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        segment_len: int,
        rope: Rope,
        memory_update: str = "linear",
        gate_init: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__(dim, n_heads, n_kv_heads, segment_len, rope, backend)
        if memory_update not in MEMORY_UPDATES:
            raise ValueError(f"unknown memory_update {memory_update!r}; expected one of {MEMORY_UPDATES}")
        self.memory_update = memory_update
        self.gate_init = gate_init
        self.gate_logit = nn.Parameter(torch.full((n_heads,), float(gate_init)))  # beta in (6), one per head

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> AttentionState:
        keys, values, _ = super().empty_state(batch, device, dtype)
        memory = Memory.empty(batch, self.n_kv_heads, self.head_dim, self.head_dim, device, dtype)
        return AttentionState(keys, values, memory)

    def forward(self, x: Tensor, state: AttentionState | None = None) -> tuple[Tensor, AttentionState]:
        if state is None:
            state = self.empty_state(x.shape[0], x.device, x.dtype)
        q, k, v = self.project(x)
        keys, values = self._extend_cache(state, k, v)
        a_dot = segmented_causal_attention(q, keys, values, self.segment_len, self.rope, self.backend)
        # the memory path runs in float32 even under autocast: M and z are sums over the whole stream
        dtype = memory_dtype(q.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            a_mem, memory = segmented_memory_retrieval(
                feature_map(q.to(dtype)), feature_map(keys.to(dtype)), values.to(dtype), state.memory,
                self.segment_len, self.memory_update,
            )
        gate = torch.sigmoid(self.gate_logit).view(1, -1, 1, 1)  # (1, H, 1, 1)
        a = gate * a_mem.to(a_dot.dtype) + (1.0 - gate) * a_dot  # (6)
        return self._output(a.to(a_dot.dtype)), AttentionState(*self._unfinished(keys, values), memory)
