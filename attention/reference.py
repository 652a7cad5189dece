"""Naive reference of Infini-attention (a loop over segments and heads, written straight from the paper) and of
the Transformer-XL-like `xl` attention (a loop over tokens and heads).

Slow and obviously correct; shares no code with the fast path except the RoPE callable it is given and, for the
memory, the rule's own naive pieces (its feature map's `reference`, its write gate's `reference` and its
per-token `reference_write`). Tests run it in float64 against the batched layer (outputs, memory states,
gradients).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attention.feature_maps import elu_plus_one
from attention.memory import EPS
from attention.rules import MemoryRule, build_rule
from attention.xl import TransformerXLAttention

# ---------------------------------------------------- the paper's equations, one function each (eqs. (3)-(5))


def feature_map(x: Tensor) -> Tensor:
    """sigma(x) = ELU(x) + 1, the paper's feature map (the rules' maps live in attention/feature_maps.py)."""
    return elu_plus_one(x)


def retrieve(sigma_q: Tensor, matrix: Tensor, norm: Tensor) -> Tensor:
    """Eq. (3): sigma(Q) M / (sigma(Q) z).

    sigma_q: (..., n, Dk); matrix: (..., Dk, Dv); norm: (..., Dk); leading dims broadcast. Returns (..., n, Dv).
    """
    numerator = sigma_q @ matrix  # (..., n, Dv)
    denominator = (sigma_q @ norm.unsqueeze(-1)).clamp_min(EPS)  # (..., n, 1)
    return numerator / denominator


def linear_update(matrix: Tensor, norm: Tensor, sigma_k: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. (4): M + sigma(K)^T V, z + sum_t sigma(K_t).  sigma_k: (..., n, Dk); values: (..., n, Dv)."""
    return matrix + sigma_k.transpose(-1, -2) @ values, norm + sigma_k.sum(-2)


def delta_update(matrix: Tensor, norm: Tensor, sigma_k: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. (5): M + sigma(K)^T (V - sigma(K) M / (sigma(K) z)); z as in (4).

    Only the part of V that the memory cannot already retrieve is written. With an empty memory the
    retrieved term is exactly 0 and (5) reduces to (4).
    """
    already_stored = retrieve(sigma_k, matrix, norm)  # (..., n, Dv)
    return matrix + sigma_k.transpose(-1, -2) @ (values - already_stored), norm + sigma_k.sum(-2)


# ------------------------------------------------------------------------------------ the layer, segment by segment


def reference_infini_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_len: int | None,
    rope,
    gate_logit: Tensor | None = None,
    memory_update: str | MemoryRule = "linear",
    write_scale: Tensor | None = None,
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """q: (B, H, T, D), k and v: (B, Hkv, T, D), un-rotated. segment_len None: one segment (full attention).
    gate_logit None: no memory (local attention); else (H,) and the memory is used, written by `memory_update`
    (a rule name or the layer's MemoryRule, whose write-gate parameters are then used). write_scale: (B, T)
    multiplier of each token's write (knock-outs, augmentation), or None.

    Returns the attention output (B, H, T, D) before the output projection, and the memory (M, z) after each
    segment, the last (possibly shorter) segment included: [(M_1, z_1), (M_2, z_2), ...],
    M: (B, Hkv, Dk, D), z: (B, Hkv, Dk).
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    N = T if segment_len is None else segment_len
    rule = memory_update if isinstance(memory_update, MemoryRule) else build_rule(memory_update, Hkv, D)
    sigma = rule.feature_map.reference
    Dk = rule.key_dim
    M = torch.zeros(B, Hkv, Dk, D, dtype=q.dtype, device=q.device)
    z = torch.zeros(B, Hkv, Dk, dtype=q.dtype, device=q.device)
    out = torch.zeros_like(q)
    memories = []
    for start in range(0, T, N):
        stop = min(start + N, T)
        n = stop - start
        positions = torch.arange(n, device=q.device)  # positions restart in every segment
        for h in range(H):
            kv = h // group
            qs, ks, vs = q[:, h, start:stop], k[:, kv, start:stop], v[:, kv, start:stop]  # (B, n, D)
            # local causal softmax attention inside the segment
            scores = rope(qs, positions) @ rope(ks, positions).transpose(1, 2) / math.sqrt(D)  # (B, n, n)
            future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=q.device), diagonal=1)
            a_dot = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ vs
            if gate_logit is None:
                out[:, h, start:stop] = a_dot
                continue
            # (3) retrieval from the memory of the previous segments
            sq = sigma(qs)
            a_mem = torch.zeros_like(a_dot)
            for b in range(B):
                for t in range(n):  # an empty memory (z = 0, M = 0) gives 0 / EPS = 0
                    a_mem[b, t] = (sq[b, t] @ M[b, kv]) / (sq[b, t] @ z[b, kv]).clamp_min(EPS)
            # (6) gate
            g = torch.sigmoid(gate_logit[h])
            out[:, h, start:stop] = g * a_mem + (1 - g) * a_dot
        if gate_logit is None:
            continue
        # (4) / (5) / a variant: write the segment, token by token, after every head has read the memory
        M_new, z_new = M.clone(), z.clone()
        for kv in range(Hkv):
            ks, vs = k[:, kv, start:stop], v[:, kv, start:stop]  # (B, n, D)
            sk = sigma(ks)  # (B, n, Dk)
            for b in range(B):
                for t in range(n):
                    strength = torch.ones((), dtype=q.dtype, device=q.device)
                    if rule.write_gate is not None:
                        strength = rule.write_gate.reference(ks[b, t], vs[b, t], kv)
                    if write_scale is not None:
                        strength = strength * write_scale[b, start + t]
                    M_new[b, kv], z_new[b, kv] = rule.reference_write(M_new[b, kv], z_new[b, kv], M[b, kv], z[b, kv],
                                                                      sk[b, t], vs[b, t], strength)
        M, z = M_new, z_new
        memories.append((M, z))
    return out, memories


def reference_xl_attention(q: Tensor, k: Tensor, v: Tensor, segment_len: int, rope) -> Tensor:
    """`xl` attention token by token: query t of segment s = t // N attends to the keys j with
    max(0, (s - 1) N) <= j <= t (its own segment up to itself and the whole previous segment), by an explicit
    softmax. The previous segment's keys and values are detached: Transformer-XL's stop-gradient SG(h_{s-1}).
    RoPE positions count from the first key a query sees (relative, so any common offset gives the same scores).

    q: (B, H, T, D), k and v: (B, Hkv, T, D), un-rotated. Returns (B, H, T, D) before the output projection.
    """
    B, H, T, D = q.shape
    group = H // k.shape[1]
    N = segment_len
    out = torch.zeros_like(q)
    for t in range(T):
        own = (t // N) * N  # first token of t's segment
        lo = max(0, own - N)  # first token of the previous segment (none for the first segment)
        positions = torch.arange(t + 1 - lo, device=q.device)  # keys lo .. t at positions 0 .. t - lo
        for h in range(H):
            kv = h // group
            ks = torch.cat([k[:, kv, lo:own].detach(), k[:, kv, own : t + 1]], dim=1)  # (B, t + 1 - lo, D)
            vs = torch.cat([v[:, kv, lo:own].detach(), v[:, kv, own : t + 1]], dim=1)
            qt = rope(q[:, h, t : t + 1], positions[-1:])  # (B, 1, D) at position t - lo
            scores = (qt @ rope(ks, positions).transpose(1, 2))[:, 0] / math.sqrt(D)  # (B, t + 1 - lo)
            out[:, h, t] = (torch.softmax(scores, dim=-1).unsqueeze(1) @ vs)[:, 0]
    return out


def reference_layer(layer, x: Tensor, write_scale: Tensor | None = None) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Run a CausalSelfAttention / InfiniAttention / TransformerXLAttention layer's weights through the reference on
    a whole sequence (write_scale: (B, T) multiplier of each token's write, or None). `xl` returns no memories."""
    B, T, _ = x.shape
    H, Hkv, D = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = (x @ layer.wq.weight.T).view(B, T, H, D).transpose(1, 2)
    k = (x @ layer.wk.weight.T).view(B, T, Hkv, D).transpose(1, 2)
    v = (x @ layer.wv.weight.T).view(B, T, Hkv, D).transpose(1, 2)
    if isinstance(layer, TransformerXLAttention):
        a = reference_xl_attention(q, k, v, layer.segment_len, layer.rope)
        return a.transpose(1, 2).reshape(B, T, H * D) @ layer.wo.weight.T, []
    gate_logit = getattr(layer, "gate_logit", None)
    rule = getattr(layer, "rule", "linear")
    a, memories = reference_infini_attention(q, k, v, layer.segment_len, layer.rope, gate_logit, rule, write_scale)
    return a.transpose(1, 2).reshape(B, T, H * D) @ layer.wo.weight.T, memories
