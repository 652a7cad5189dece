"""The paper's linear + delta update, eq. (5):
    M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1})),  z_s as in (4).
Only the part of V that the memory cannot already retrieve for the key is written."""

from __future__ import annotations

import torch
from torch import Tensor

from attention.memory import EPS
from attention.rules import MemoryRule, register_rule


@register_rule
class Delta(MemoryRule):
    """Eq. (5). The increment of segment s depends on M_{s-1}, so a scan over segments (two small matmuls per
    step). Subclasses change what is added to z (`norm_increment`)."""

    name = "delta"

    def norm_increment(self, sigma_k: Tensor, keyed_norm: Tensor) -> Tensor:
        """Per-token weight of sigma(k_t) in the z update: 1 in (4)/(5). keyed_norm = sigma(k_t) . z_{s-1}:
        (..., N, 1); returns (..., N, 1)."""
        return torch.ones_like(keyed_norm)

    def prefix(self, state: Tensor, sigma_k: Tensor, values_aug: Tensor, strength: Tensor | None
               ) -> tuple[Tensor, Tensor]:
        Dv = values_aug.shape[-1] - 1
        states = []
        strengths = strength.unbind(2) if strength is not None else [None] * sigma_k.shape[2]
        # unbind, not x[:, :, s]: the backward of an index zero-fills a whole-size gradient per segment (quadratic)
        for k_s, v_s, beta in zip(sigma_k.unbind(2), values_aug.unbind(2), strengths):
            states.append(state)
            numerator, keyed_norm = (k_s @ state).split([Dv, 1], dim=-1)  # (B, Hkv, N, Dv), (B, Hkv, N, 1)
            stored = numerator * keyed_norm.clamp_min(EPS).reciprocal()  # what M_{s-1} returns for these keys
            write = torch.cat([v_s[..., :Dv] - stored, self.norm_increment(k_s, keyed_norm)], dim=-1)
            k_write = k_s if beta is None else k_s * beta.unsqueeze(-1)
            state = state + k_write.transpose(-1, -2) @ write  # (B, Hkv, Dk, Dv + 1)
        return torch.stack(states, dim=2), state

    def reference_write(self, M, z, M_prev, z_prev, sigma_k, value, strength):
        stored = (sigma_k @ M_prev) / (sigma_k @ z_prev).clamp_min(EPS)
        return M + strength * torch.outer(sigma_k, value - stored), z + strength * sigma_k
