"""Transformer-XL-like attention (`xl`): segment-local causal attention that also reads the previous segment.

Each query of segment s attends causally to the earlier tokens of its own segment AND to all N keys/values of
segment s - 1: Transformer-XL's cached "memory" with mem_len = segment_len (Dai et al. 2019, section 3.2), whose
gradient is stopped: h_{s-1} enters as SG(h_{s-1}), so the forward pass depends on the previous segment but no
gradient flows into it. There is no compressive memory and no gate; the first segment of a stream has no previous
segment. Segments are fixed by absolute position in the stream, as for the other kinds (attention/infini.py), and
the layer has the same interface and the same chunking invariance: layer(x, state) -> (y, state).

RoPE is relative, so each segment's attention uses positions 0 .. 2N - 1 for [previous segment | own segment] and
its queries sit at N .. 2N - 1 (0 .. N - 1 when there is no previous segment): the angles stay below 2N however
long the stream grows. (Transformer-XL's own relative encoding is replaced by the RoPE of the other kinds.)

State: keys/values hold [the previous complete segment (0 or N tokens) | the unfinished segment (0 .. N - 1
tokens)], un-rotated, at most 2N - 1 tokens per layer; a cache of L < N tokens has no previous segment.
A row whose cached previous segment is all zeros (models.state.reset_rows: a row that starts a new document in
training with trainer.carry_state) has none either: its queries see only their own segment.

Shape legend as in attention/infini.py: B batch, T new tokens, P cached + new tokens, H query heads, Hkv key/value
heads, S segments, N segment length, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attention.backends import causal_attention
from attention.infini import AttentionState, CausalSelfAttention, Rope, _as_segments, _time_spans


def _pieces(T: int, previous: int, cached: int, N: int) -> list[tuple[int, int, int, int]]:
    """The new tokens' spans as (start, stop, segments, first): `first` is the key index of the span's first
    segment's first key (cached tokens first). A batched span whose first segment has no previous segment (the
    stream's first segment) is split: that segment runs alone, the rest batched."""
    pieces = []
    for start, stop, S in _time_spans(T, cached, N):
        first = previous + (0 if start == 0 else cached + start)
        if S > 1 and first < N:
            pieces.append((start, start + N, 1, first))
            start, S, first = start + N, S - 1, first + N
        pieces.append((start, stop, S, first))
    return pieces


def xl_causal_attention(q: Tensor, keys: Tensor, values: Tensor, previous: int, segment_len: int, rope: Rope,
                        backend: str) -> Tensor:
    """Causal attention inside each query's segment plus over the whole previous segment, stop-gradient on the
    previous segment's keys/values.

    q: (B, H, T, D) un-rotated queries of the new tokens; keys, values: (B, Hkv, P, D) un-rotated: `previous` (0 or
    N) tokens of the segment before the unfinished one, then the cached tokens of the unfinished segment, then the
    new tokens. Returns (B, H, T, D), time-major in memory (a transposed view of (B, T, H, D)).
    """
    B, H, T, D = q.shape
    N = segment_len
    cached = keys.shape[2] - T - previous  # tokens of the unfinished segment in the cache: 0 .. N - 1
    outputs = []
    for start, stop, S, first in _pieces(T, previous, cached, N):
        end = previous + cached + stop  # one past the piece's last key
        has_previous = first >= N  # keys[first - N : first] is the previous segment
        if S:  # S whole segments as one batched call, each with its own previous segment
            q_seg = _as_segments(q[:, :, start:stop], S, N)  # (B*S, H, N, D)
            k_seg = _as_segments(keys[:, :, first:end], S, N)  # (B*S, Hkv, N, D)
            v_seg = _as_segments(values[:, :, first:end], S, N)
            if has_previous:  # SG: the previous segments' keys/values are detached
                k_prev = _as_segments(keys[:, :, first - N : end - N], S, N).detach()  # (B*S, Hkv, N, D)
                v_prev = _as_segments(values[:, :, first - N : end - N], S, N).detach()
                k_seg = torch.cat([k_prev, k_seg], dim=2)  # (B*S, Hkv, 2N, D), positions 0 .. 2N - 1
                v_seg = torch.cat([v_prev, v_seg], dim=2)
            q_rot = rope.rotate(q_seg, start=N if has_previous else 0)  # queries: the last N key positions
            out = causal_attention(q_rot, rope.rotate(k_seg), v_seg, backend)  # (B*S, H, N, D)
            outputs.append(out.transpose(1, 2).reshape(B, stop - start, H, D))
        else:  # one (possibly partial) segment: the queries are the last positions of its keys
            k_seg, v_seg = keys[:, :, first:end], values[:, :, first:end]  # (B, Hkv, n, D), cached tokens first
            if has_previous:
                k_seg = torch.cat([keys[:, :, first - N : first].detach(), k_seg], dim=2)  # (B, Hkv, N + n, D)
                v_seg = torch.cat([values[:, :, first - N : first].detach(), v_seg], dim=2)
            q_rot = rope.rotate(q[:, :, start:stop], start=k_seg.shape[2] - (stop - start))
            out = causal_attention(q_rot, rope.rotate(k_seg), v_seg, backend)  # (B, H, stop - start, D)
            outputs.append(out.transpose(1, 2))
    a = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # (B, T, H, D)
    return a.transpose(1, 2)


class TransformerXLAttention(CausalSelfAttention):
    """`xl`: grouped-query causal attention inside segments of N tokens plus over the whole previous segment
    (stop-gradient), no memory, no gate (the Transformer-XL-like baseline of the paper's Table 1/2)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, segment_len: int, rope: Rope,
                 backend: str = "auto"):
        if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len <= 0:
            raise ValueError(f"attention=xl needs a positive integer segment_len, got {segment_len!r}")
        super().__init__(dim, n_heads, n_kv_heads, segment_len, rope, backend)

    def _carried(self, keys: Tensor, values: Tensor, previous: int) -> tuple[Tensor, Tensor]:
        """The cache for the next call: [last complete segment (0 or N) | unfinished segment (0 .. N - 1)]."""
        N, P = self.segment_len, keys.shape[2]
        unfinished = (P - previous) % N  # keys[previous:] starts on a segment boundary
        start = max(0, P - unfinished - N)
        # contiguous copies: a view would pin the whole (B, Hkv, P, D) tensor of this call in memory
        return (keys[:, :, start:].clone(memory_format=torch.contiguous_format),
                values[:, :, start:].clone(memory_format=torch.contiguous_format))

    def forward(self, x: Tensor, state: AttentionState | None = None, write_scale: Tensor | None = None
                ) -> tuple[Tensor, AttentionState]:
        if write_scale is not None:
            raise ValueError("write_scale scales memory writes: this layer (attention=xl) keeps no memory")
        N = self.segment_len
        q, k, v = self.project(x)
        keys, values = self._extend_cache(state, k, v)  # (B, Hkv, P, D)
        previous = N if keys.shape[2] - x.shape[1] >= N else 0
        a = xl_causal_attention(q, keys, values, previous, N, self.rope, self.backend)  # (B, H, T, D)
        if previous:
            # rows whose previous segment was reset (all zeros: models.state.reset_rows) have none
            absent = ~(keys[:, :, :N].flatten(1).any(1) | values[:, :, :N].flatten(1).any(1))  # (B,)
            if bool(absent.any()):
                fresh = xl_causal_attention(q, keys[:, :, N:], values[:, :, N:], 0, N, self.rope, self.backend)
                a = torch.where(absent.view(-1, 1, 1, 1), fresh, a)
        return self._output(a), AttentionState(*self._carried(keys, values, previous), None)
