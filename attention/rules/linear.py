"""The paper's linear update, eq. (4):  M_s = M_{s-1} + sigma(K)^T V,  z_s = z_{s-1} + sum_t sigma(K_t)."""

from __future__ import annotations

import torch
from torch import Tensor

from attention.rules import MemoryRule, register_rule


@register_rule
class Linear(MemoryRule):
    """Eq. (4). The increments sigma(K_s)^T [V_s | 1] of different segments are independent, so one batched matmul
    computes all of them and a prefix sum over segments gives every M_{s-1} at once (the parallel form)."""

    name = "linear"

    def prefix(self, state: Tensor, sigma_k: Tensor, values_aug: Tensor, strength: Tensor | None
               ) -> tuple[Tensor, Tensor]:
        if strength is not None:
            sigma_k = sigma_k * strength.unsqueeze(-1)  # beta_t sigma(k_t): a weaker write, in M and z alike
        increments = sigma_k.transpose(-1, -2) @ values_aug  # (B, Hkv, S, Dk, Dv + 1)
        B, Hkv, S, N = sigma_k.shape[:4]
        if S + 1 <= N:
            # the prefix sums as one matmul with a (S + 1, S) 0/1 matrix: row s < S sums the segments before s
            # (strictly lower triangle), row S all of them. Costs (S + 1) / N of the retrieval's FLOPs, and beats
            # cumsum + the slicing/concatenation of inclusive and exclusive sums (cumsum's backward flips twice)
            sums = torch.ones(S + 1, S, device=increments.device, dtype=increments.dtype).tril_(-1)
            states = state.unsqueeze(2) + (sums @ increments.flatten(3)).view(B, Hkv, S + 1, *increments.shape[3:])
            prev, final = states.split([S, 1], dim=2)  # split: its backward concatenates, no zero-filled slices
            return prev, final.squeeze(2)
        after = state.unsqueeze(2) + increments.cumsum(2)  # state after each segment
        prev = torch.cat([state.unsqueeze(2), after[:, :, :-1]], dim=2)
        return prev, after[:, :, -1]

    def reference_write(self, M, z, M_prev, z_prev, sigma_k, value, strength):
        return M + strength * torch.outer(sigma_k, value), z + strength * sigma_k
