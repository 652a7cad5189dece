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
from torch.autograd.function import once_differentiable

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


class _FeatureMapCopy(torch.autograd.Function):
    """sigma(x) = ELU(x) + 1 written into a new contiguous tensor, saving only that output for backward:
    sigma'(x) = 1 for x > 0 and exp(x) = sigma(x) for x <= 0, so sigma'(x) = min(sigma(x), 1). Autograd's
    F.elu(x) + 1 keeps x as well (a second activation-sized tensor per Q and K)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        F.elu(out, inplace=True).add_(1.0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return out.clamp(max=1.0).mul_(grad)


def feature_map_contiguous(x: Tensor) -> Tensor:
    """feature_map(x) as a new contiguous tensor (the layers' fast path; same values as feature_map)."""
    return _FeatureMapCopy.apply(x)


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


def retrieve_augmented(sigma_q: Tensor, augmented: Tensor) -> Tensor:
    """Eq. (3) from [M | z]: sigma_q (..., n, Dk), augmented (..., Dk, Dv + 1) -> (..., n, Dv); same clamp as
    `retrieve`."""
    Dv = augmented.shape[-1] - 1
    numerator, denominator = (sigma_q @ augmented).split([Dv, 1], dim=-1)  # (..., n, Dv), (..., n, 1)
    # split, not two slices: the backward of a slice zero-fills a tensor of the whole shape, split's concatenates;
    # and one reciprocal of the (n, 1) denominators instead of an elementwise division of the (n, Dv) numerator
    return numerator * denominator.clamp_min(EPS).reciprocal()


def prefix_memories(augmented: Tensor, sigma_k: Tensor, values_aug: Tensor, update: str) -> tuple[Tensor, Tensor]:
    """State before each of S complete segments, and after the last, in the augmented form.

    augmented: (B, Hkv, Dk, Dv + 1) [M | z] before the first segment; sigma_k: (B, Hkv, S, N, Dk);
    values_aug: (B, Hkv, S, N, Dv + 1) = [V | 1]. Returns prev (B, Hkv, S, Dk, Dv + 1) with prev[:, :, s] the state
    *before* segment s (retrieval precedes the update), and the state after segment S - 1.

    linear: parallel form. The increments sigma(K_s)^T [V_s | 1] are independent: one batched matmul computes all
            of them and a prefix sum over segments gives every state at once (a matmul with a triangular 0/1
            matrix while S < N, else cumsum).
    delta:  the increment of segment s depends on M_{s-1}, so a scan over segments (two small matmuls per step).
    """
    if update == "linear":
        increments = sigma_k.transpose(-1, -2) @ values_aug  # (B, Hkv, S, Dk, Dv + 1)
        B, Hkv, S, N = sigma_k.shape[:4]
        if S + 1 <= N:
            # the prefix sums as one matmul with a (S + 1, S) 0/1 matrix: row s < S sums the segments before s
            # (strictly lower triangle), row S all of them. Costs (S + 1) / N of the retrieval's FLOPs, and beats
            # cumsum + the slicing/concatenation of inclusive and exclusive sums (cumsum's backward flips twice)
            sums = torch.ones(S + 1, S, device=increments.device, dtype=increments.dtype).tril_(-1)
            states = augmented.unsqueeze(2) + (sums @ increments.flatten(3)).view(B, Hkv, S + 1, *increments.shape[3:])
            prev, final = states.split([S, 1], dim=2)  # split: its backward concatenates, no zero-filled slices
            return prev, final.squeeze(2)
        after = augmented.unsqueeze(2) + increments.cumsum(2)  # state after each segment
        prev = torch.cat([augmented.unsqueeze(2), after[:, :, :-1]], dim=2)
        return prev, after[:, :, -1]
    if update == "delta":
        states = []
        # unbind, not x[:, :, s]: the backward of an index zero-fills a whole-size gradient per segment (quadratic)
        for k_s, v_s in zip(sigma_k.unbind(2), values_aug.unbind(2)):
            states.append(augmented)
            stored = retrieve_augmented(k_s, augmented)  # (B, Hkv, N, Dv): what M_{s-1} returns for these keys
            write = v_s - F.pad(stored, (0, 1))  # [V - stored | 1]
            augmented = augmented + k_s.transpose(-1, -2) @ write
        return torch.stack(states, dim=2), augmented
    raise ValueError(f"unknown memory update {update!r}; expected 'linear' or 'delta'")


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
    The un-augmented interface to `prefix_memories` (the layers call `prefix_memories` itself, on [M | z]).
    """
    S = sigma_k.shape[2]
    if not 0 <= n_complete <= S or n_complete < S - 1:
        raise ValueError(f"n_complete={n_complete} must be S or S - 1 for S={S} segments")
    if update not in ("linear", "delta"):
        raise ValueError(f"unknown memory update {update!r}; expected 'linear' or 'delta'")
    augmented = augment(memory)
    if n_complete:
        values_aug = with_ones(values[:, :, :n_complete])
        prev, final = prefix_memories(augmented, sigma_k[:, :, :n_complete], values_aug, update)
    else:
        prev, final = augmented.unsqueeze(2)[:, :, :0], augmented
    if n_complete < S:  # the incomplete segment reads the state after the complete ones
        prev = torch.cat([prev, final.unsqueeze(2)], dim=2)
    return prev[..., :-1], prev[..., -1], split_augmented(final) if n_complete else memory
