"""The delta rule with a corrected normaliser (as in the associative recurrent memory transformer, Rodkin et al.
2024, arXiv 2407.04841): a research variant, not the paper's rule.

    M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))          as (5)
    z_s = z_{s-1} + sum_t gamma_t sigma(k_t),   gamma_t = clip(1 - sigma(k_t) . z_{s-1} / ||sigma(k_t)||^2, 0, 1)

Why: with (5), re-writing a stored association adds nothing to M but still adds sigma(k) to z, so the denominator
of (3) grows with every repeated token while the numerator does not, and reads shrink with length. gamma is the
share of the key's direction that z does not yet hold (0 when a key of the same direction, and at least its
size, was written before), so repeated content stops growing z as it stopped growing M.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attention.memory import EPS
from attention.rules import register_rule
from attention.rules.delta import Delta


@register_rule
class DeltaCorrected(Delta):
    name = "delta_corrected"

    def norm_increment(self, sigma_k: Tensor, keyed_norm: Tensor) -> Tensor:
        squared = (sigma_k * sigma_k).sum(-1, keepdim=True).clamp_min(EPS)  # ||sigma(k_t)||^2: (..., N, 1)
        return (1.0 - keyed_norm / squared).clamp(0.0, 1.0)

    def reference_write(self, M, z, M_prev, z_prev, sigma_k, value, strength):
        stored = (sigma_k @ M_prev) / (sigma_k @ z_prev).clamp_min(EPS)
        gamma = (1.0 - (sigma_k @ z_prev) / (sigma_k @ sigma_k).clamp_min(EPS)).clamp(0.0, 1.0)
        return M + strength * torch.outer(sigma_k, value - stored), z + strength * gamma * sigma_k
