"""Rotary position embedding (Su et al., 2021), in the Hugging Face Llama layout (rotate_half, not interleaved),
so Llama checkpoints load without permuting q/k weights.

Infini-attention applies RoPE only on the local dot-product path; the compressive memory reads and writes
un-rotated Q/K (paper, Sec. 3.1). The angles are computed on the fly from integer positions: there is no
buffer to move between devices or re-initialise after meta-device construction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """x -> x * cos(pos * freq) + rotate_half(x) * sin(pos * freq), computed in float32."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def inv_freq(self, device: torch.device | None = None) -> Tensor:
        """(D/2,) float32 inverse frequencies theta^(-2i/D)."""
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim
        return (1.0 / self.theta**exponents).float()

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: (T,) integer -> cos, sin: (T, D) float32."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq(positions.device)  # (T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, D)
        return angles.cos(), angles.sin()

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (..., T, D); positions: (T,). Returns x rotated, in x's dtype."""
        cos, sin = self.cos_sin(positions)
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
