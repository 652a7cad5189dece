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

Layout (what the measurements in benchmarks/ asked for). Projections stay in the linear layer's output layout,
time-major (B, T, h, D), and are passed around as (B, h, T, D) *views*. S complete segments of a time-major
tensor are then the view (B*S, h, N, D) that SDPA and flash-attn read without a copy, and the attention output,
time-major too, reshapes to (B, T, H*D) for the output projection without a copy. Only the memory path, which
batches over heads and segments, makes head-major copies (sigma(Q), sigma(K), [V | 1]). On CPU a copy is not
just a pass over memory: every new tensor above glibc's mmap threshold is fresh pages, so the number and size of
temporaries decides much of the step time.

Shape legend: B batch, T new tokens, L cached tokens, P = L + T, H query heads, Hkv key/value heads,
G = H / Hkv, S segments, N segment length, D head dim.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention.backends import causal_attention
from attention.memory import EPS, Memory, augment, memory_dtype, split_augmented, with_ones
from attention.rules import MemoryRule, build_rule


class Rope(Protocol):
    """What the layers need from RoPE (models.rope.RotaryEmbedding): rotate x (..., n, D) to positions
    start .. start + n - 1."""

    def rotate(self, x: Tensor, start: int = 0) -> Tensor: ...


class AttentionState(NamedTuple):
    """Streaming state of one attention layer. Held by the caller, never by the module."""

    keys: Tensor  # (B, Hkv, L, D) un-rotated keys of the unfinished segment (`full`: of the whole stream; `xl`:
    #               the previous complete segment's first, attention/xl.py)
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


def _as_segments(x: Tensor, count: int, N: int) -> Tensor:
    """(B, h, count*N, D) -> (B*count, h, N, D), segments folded into the batch. A view when x is time-major
    (the projections), a copy otherwise."""
    B, h, _, D = x.shape
    return x.transpose(1, 2).reshape(B * count, N, h, D).transpose(1, 2)


def _time_spans(T: int, L: int, segment_len: int | None) -> list[tuple[int, int, int]]:
    """The new tokens' pieces: (start, stop, segments) in new-token coordinates. The head completes the cached
    segment (segments 0: one causal call over cached + new keys), then whole segments batched (segments S > 0),
    then a last partial segment (segments 0, no cache)."""
    head, body = split_at_boundary(L, T, segment_len)
    spans = [(0, head, 0)] if head else []
    if body:
        S, rest = divmod(body, segment_len)
        if S:
            spans.append((head, head + S * segment_len, S))
        if rest:
            spans.append((T - rest, T, 0))
    return spans


def segmented_causal_attention(
    q: Tensor, keys: Tensor, values: Tensor, segment_len: int | None, rope: Rope, backend: str
) -> Tensor:
    """Causal softmax attention restricted to each query's own segment (the paper's A_dot).

    q: (B, H, T, D) un-rotated queries of the new tokens; keys, values: (B, Hkv, P, D) un-rotated, the cached
    tokens of the current segment first. Returns (B, H, T, D), time-major in memory (a transposed view of
    (B, T, H, D)).
    """
    B, H, T, D = q.shape
    L = keys.shape[2] - T
    outputs = []
    for start, stop, S in _time_spans(T, L, segment_len):
        if S:  # S whole segments as one batched call; positions restart in every segment
            N = segment_len
            k_seg = keys[:, :, L + start : L + stop]
            v_seg = values[:, :, L + start : L + stop]
            q_rot = rope.rotate(_as_segments(q[:, :, start:stop], S, N))  # (B*S, H, N, D)
            out = causal_attention(q_rot, rope.rotate(_as_segments(k_seg, S, N)), _as_segments(v_seg, S, N),
                                   backend)  # (B*S, H, N, D)
            outputs.append(out.transpose(1, 2).reshape(B, stop - start, H, D))
        else:  # one segment: the queries are the last positions of its keys (the cached ones first)
            first = 0 if start == 0 else L + start  # its segment's first key (cached tokens belong to the head)
            k_seg, v_seg = keys[:, :, first : L + stop], values[:, :, first : L + stop]
            q_rot = rope.rotate(q[:, :, start:stop], start=L + start - first)
            out = causal_attention(q_rot, rope.rotate(k_seg), v_seg, backend)  # (B, H, stop - start, D)
            outputs.append(out.transpose(1, 2))
    a = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # (B, T, H, D)
    return a.transpose(1, 2)


def segmented_memory_retrieval(
    q: Tensor, keys: Tensor, values: Tensor, memory: Memory, segment_len: int, rule: MemoryRule,
    strength: Tensor | None = None,
) -> tuple[Tensor, Tensor, Memory]:
    """Each query reads the memory as it stood before its segment (3); complete segments are written by the rule
    ((4), (5) or a variant).

    q: (B, H, T, D) un-rotated queries of the new tokens; keys: (B, Hkv, P, D) and values: (B, Hkv, P, Dv) of
    the cached + new tokens; all in the memory dtype; strength: per-token write strength (B, Hkv, P) or None.
    Returns the two terms of (3) for every new token, the numerator sigma(Q) M_{s-1}: (B, H, T, Dv) and the
    clamped denominator sigma(Q) z_{s-1}: (B, H, T, 1) (A_mem = numerator / denominator; the layer folds the
    division into the gate), and the memory after every complete segment.
    """
    B, H, T, _ = q.shape
    Hkv, P, Dv = values.shape[1], values.shape[2], values.shape[3]
    G, N, L = H // Hkv, segment_len, P - T
    # head-major copies: the matmuls batch over (B, Hkv, segments); a group's query heads read their KV head's memory
    sigma_q = rule.features(q)  # (B, H, T, Dk)
    Dk = sigma_q.shape[-1]
    sigma_q = sigma_q.view(B, Hkv, G, T, Dk)
    sigma_k = rule.features(keys)  # (B, Hkv, P, Dk)
    values_aug = with_ones(values)  # [V | 1]: (B, Hkv, P, Dv + 1)
    state = augment(memory)  # [M | z]: (B, Hkv, Dk, Dv + 1)
    written = False  # decoding mostly reads: the memory object then goes back unchanged, not re-split and copied
    reads = []  # [sigma(Q) M | sigma(Q) z] per span of new tokens: (B, H, n, Dv + 1)
    for start, stop, S in _time_spans(T, L, N):
        if S:  # whole segments: every M_{s-1} at once (parallel form) or by a scan, as the rule does it
            k_seg = sigma_k[:, :, L + start : L + stop].view(B, Hkv, S, N, Dk)
            v_seg = values_aug[:, :, L + start : L + stop].view(B, Hkv, S, N, Dv + 1)
            beta = None if strength is None else strength[:, :, L + start : L + stop].reshape(B, Hkv, S, N)
            prev, state = rule.prefix(state, k_seg, v_seg, beta)  # prev: (B, Hkv, S, Dk, Dv + 1)
            written = True
            q_seg = sigma_q[:, :, :, start:stop].reshape(B, Hkv, G, S, N, Dk)
            reads.append((q_seg @ prev.unsqueeze(2)).view(B, H, stop - start, Dv + 1))  # (B, Hkv, G, S, N, Dv+1)
        else:  # one (possibly partial) segment reads the current state; written once complete
            reads.append((sigma_q[:, :, :, start:stop] @ state.unsqueeze(2)).view(B, H, stop - start, Dv + 1))
            first = 0 if start == 0 else L + start
            if L + stop - first == N:  # the segment is complete: write it
                k_seg = sigma_k[:, :, first : L + stop].unsqueeze(2)  # (B, Hkv, 1, N, Dk)
                v_seg = values_aug[:, :, first : L + stop].unsqueeze(2)
                beta = None if strength is None else strength[:, :, first : L + stop].unsqueeze(2)
                _, state = rule.prefix(state, k_seg, v_seg, beta)
                written = True
    both = reads[0] if len(reads) == 1 else torch.cat(reads, dim=2)  # (B, H, T, Dv + 1)
    numerator, denominator = both.split([Dv, 1], dim=-1)  # split: its backward concatenates, no zero-filled slices
    return numerator, denominator.clamp_min(EPS), split_augmented(state) if written else memory


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
        """x: (B, T, dim) -> q (B, H, T, D), k and v (B, Hkv, T, D), un-rotated; views of the time-major
        projections (no copy).

        The three projections are one matmul with the weights stacked, [q | k | v] = x [Wq | Wk | Wv]^T (one input
        cast under autocast, one larger matmul), unless a projection is wrapped (LoRA adapters): then each module
        is called. On CPU under autocast the result comes back in float32 (x, a norm's output, is in autocast's
        dtype there): attention, RoPE and the memory then run in float32, where PyTorch's bf16 attention backward
        is slower than float32's (attention/backends.py); on GPU it stays in autocast's dtype for flash-attn."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        linears = (self.wq, self.wk, self.wv)
        if all(type(linear) is nn.Linear for linear in linears):
            qkv = F.linear(x, torch.cat([linear.weight for linear in linears]))  # (B, T, (H + 2 Hkv) D)
            if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
                qkv = qkv.to(torch.promote_types(qkv.dtype, torch.float32))
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        else:
            q, k, v = (linear(x) for linear in linears)
        return (q.view(B, T, H, D).transpose(1, 2), k.view(B, T, Hkv, D).transpose(1, 2),
                v.view(B, T, Hkv, D).transpose(1, 2))

    def _extend_cache(self, state: AttentionState | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if state is None or state.keys.shape[2] == 0:
            return k, v  # no cache (training): no cat, the projections' views go on
        return torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)  # (B, Hkv, P, D)

    def _unfinished(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """The cache carried to the next call: the tokens of the unfinished segment (`full`: all tokens)."""
        if self.segment_len is None:
            return keys, values
        keep = keys.shape[2] % self.segment_len
        # a contiguous copy: a view would pin the whole (B, Hkv, P, D) tensor of this call in memory
        start = keys.shape[2] - keep
        return (keys[:, :, start:].clone(memory_format=torch.contiguous_format),
                values[:, :, start:].clone(memory_format=torch.contiguous_format))

    def _output(self, a: Tensor) -> Tensor:
        B, H, T, D = a.shape
        return self.wo(a.transpose(1, 2).reshape(B, T, H * D))  # (B, H, T, D) -> (B, T, H*D) -> (B, T, dim)

    def forward(self, x: Tensor, state: AttentionState | None = None, write_scale: Tensor | None = None
                ) -> tuple[Tensor, AttentionState]:
        if write_scale is not None:
            raise ValueError("write_scale scales memory writes: this layer (attention=full/local) keeps no memory")
        q, k, v = self.project(x)
        keys, values = self._extend_cache(state, k, v)
        a_dot = segmented_causal_attention(q, keys, values, self.segment_len, self.rope, self.backend)
        return self._output(a_dot), AttentionState(*self._unfinished(keys, values), None)


class InfiniAttention(CausalSelfAttention):
    """Infini-attention: segment-local causal attention + a compressive memory carried across segments,
    mixed by a learned per-head gate (6):  A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot.

    The memory uses the same Q/K/V projections as the local path, *before* RoPE, and there is one memory per
    key/value head: with grouped-query attention the query heads of a group read their KV head's memory, each
    with its own sigma(Q) and its own gate. How the memory is written (eq. (4), (5) or a research variant, its
    feature map, an optional per-token write gate) is the layer's `rule` (attention/rules/).

    `write_scale` (B, T), an optional input of a call, multiplies each new token's write (M and z alike, on top of
    any write gate): 0 knocks a token's write out (evaluation/memory_probe.py), c > 1 writes it as c copies would
    under the linear rule (training augmentation, data.passkey_haystack_scale). It needs a call that starts on a
    segment boundary (no cached tokens), which training batches and the probe's segment-aligned chunks are.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        segment_len: int,
        rope: Rope,
        memory_update: str | MemoryRule = "linear",
        gate_init: float = 0.0,
        backend: str = "auto",
        feature_map: str = "elu",
        write_gate: bool = False,
        write_gate_init: float = 4.0,
    ):
        super().__init__(dim, n_heads, n_kv_heads, segment_len, rope, backend)
        if isinstance(memory_update, MemoryRule):
            self.rule = memory_update
        else:
            self.rule = build_rule(memory_update, n_kv_heads, self.head_dim, feature_map, write_gate,
                                   write_gate_init)
        self.gate_init = gate_init
        self.gate_logit = nn.Parameter(torch.full((n_heads,), float(gate_init)))  # beta in (6), one per head

    @property
    def memory_update(self) -> str:
        return self.rule.name

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> AttentionState:
        keys, values, _ = super().empty_state(batch, device, dtype)
        return AttentionState(keys, values, self.rule.empty(batch, device, dtype))

    def forward(self, x: Tensor, state: AttentionState | None = None, write_scale: Tensor | None = None
                ) -> tuple[Tensor, AttentionState]:
        if state is None:
            state = self.empty_state(x.shape[0], x.device, x.dtype)
        q, k, v = self.project(x)
        keys, values = self._extend_cache(state, k, v)
        a_dot = segmented_causal_attention(q, keys, values, self.segment_len, self.rope, self.backend)
        # the memory path runs in float32 even under autocast: M and z are sums over the whole stream
        dtype = memory_dtype(q.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            memory_keys, memory_values = keys.to(dtype), values.to(dtype)
            strength = self.rule.write_strength(memory_keys, memory_values)  # (B, Hkv, P) or None
            if write_scale is not None:
                if keys.shape[2] != x.shape[1] or tuple(write_scale.shape) != tuple(x.shape[:2]):
                    raise ValueError(f"write_scale {tuple(write_scale.shape)} must be (batch, tokens) = "
                                     f"{tuple(x.shape[:2])} of a call that starts on a segment boundary (this one "
                                     f"follows {keys.shape[2] - x.shape[1]} cached tokens of an unfinished segment)")
                scale = write_scale.to(dtype).unsqueeze(1).expand(-1, self.n_kv_heads, -1)  # (B, Hkv, P)
                strength = scale if strength is None else strength * scale
            numerator, denominator, memory = segmented_memory_retrieval(
                q.to(dtype), memory_keys, memory_values, state.memory, self.segment_len, self.rule, strength,
            )
            gate = torch.sigmoid(self.gate_logit).view(-1, 1, 1)  # (H, 1, 1)
            # (6) with A_mem = numerator / denominator (3) folded in, so A_mem is never materialised (nor saved):
            #   A = (1 - gate) * A_dot + numerator * (gate / denominator), time-major like A_dot
            a = (a_dot * (1.0 - gate)).addcmul_(numerator, gate / denominator)
        return self._output(a.to(a_dot.dtype)), AttentionState(*self._unfinished(keys, values), memory)
