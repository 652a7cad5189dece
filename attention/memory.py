"""Compressive memory of Infini-attention (Munkhdalai et al., 2024, arXiv 2404.07143).

Equation numbers follow v1 of the paper (v2 renumbers them (7)-(10)):
    sigma(x) = ELU(x) + 1
    (3) retrieval:     A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})
    (4) linear update: M_s = M_{s-1} + sigma(K)^T V,  z_s = z_{s-1} + sum_t sigma(K_t)
    (5) delta update:  M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1})),  z_s as in (4)

Shape legend: B batch, Hkv key/value heads, S segments, N segment length, n tokens, Dk key dim, Dv value dim.

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

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

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


def feature_map(x: Tensor) -> Tensor:
    """sigma(x) = ELU(x) + 1: positive, so the denominator of (3) is a sum of positive terms."""
    return F.elu(x) + 1.0


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


def segment_memories(
    memory: Memory, sigma_k: Tensor, values: Tensor, n_complete: int, update: str
) -> tuple[Tensor, Tensor, Memory]:
    """Memory state seen by every segment of a segment-aligned block, and the state after it.

    sigma_k: (B, Hkv, S, N, Dk), values: (B, Hkv, S, N, Dv), float32, segment s covering tokens [sN, (s+1)N).
    Segments 0..n_complete-1 are complete and are written to memory; a last incomplete segment (if
    n_complete == S - 1) is read from but not written (its tokens wait in the streaming cache until the segment
    is complete).

    Returns M_prev (B, Hkv, S, Dk, Dv) and z_prev (B, Hkv, S, Dk), where [:, :, s] is the state *before*
    segment s (retrieval precedes the update), and the memory after the n_complete complete segments.

    linear: parallel form. The per-segment increments sigma(K_s)^T V_s are independent, so one batched matmul
            computes them all and an exclusive prefix sum over segments gives every M_{s-1} at once.
    delta:  the increment of segment s depends on M_{s-1}, so this is a scan over segments.
    """
    S = sigma_k.shape[2]
    if not 0 <= n_complete <= S or n_complete < S - 1:
        raise ValueError(f"n_complete={n_complete} must be S or S - 1 for S={S} segments")
    if update == "linear":
        increments = sigma_k[:, :, :n_complete].transpose(-1, -2) @ values[:, :, :n_complete]  # (B,Hkv,Sc,Dk,Dv)
        norm_increments = sigma_k[:, :, :n_complete].sum(-2)  # (B, Hkv, Sc, Dk)
        # inclusive prefix sums; state before segment s = initial + sum of increments of segments < s
        matrix_after = memory.matrix.unsqueeze(2) + increments.cumsum(2)  # (B, Hkv, Sc, Dk, Dv)
        norm_after = memory.norm.unsqueeze(2) + norm_increments.cumsum(2)  # (B, Hkv, Sc, Dk)
        matrix_prev = torch.cat([memory.matrix.unsqueeze(2), matrix_after], dim=2)[:, :, :S]
        norm_prev = torch.cat([memory.norm.unsqueeze(2), norm_after], dim=2)[:, :, :S]
        final = Memory(matrix_after[:, :, -1], norm_after[:, :, -1]) if n_complete > 0 else memory
        return matrix_prev, norm_prev, final
    if update == "delta":
        matrix, norm = memory
        matrices, norms = [], []
        for s in range(S):
            matrices.append(matrix)
            norms.append(norm)
            if s < n_complete:
                matrix, norm = delta_update(matrix, norm, sigma_k[:, :, s], values[:, :, s])
        return torch.stack(matrices, 2), torch.stack(norms, 2), Memory(matrix, norm)
    raise ValueError(f"unknown memory update {update!r}; expected 'linear' or 'delta'")
