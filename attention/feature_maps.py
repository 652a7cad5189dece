"""Feature maps sigma of the compressive memory: what keys and queries become before (3)-(5) use them.

The paper's map is sigma(x) = ELU(x) + 1 (`elu`). A feature map is a module with `out_dim` (the memory's key
dimension Dk for head dimension D), a fast `forward` that returns a new contiguous tensor, and `reference`, the
naive formula the tests compare it with. The memory ops never ask which map they got (the flash-linear-attention
shape: a new map is one class here plus its name in FEATURE_MAPS).

Shape legend: D head dim, Dk = out_dim feature dim.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class FeatureMap(nn.Module):
    """sigma: (..., D) -> (..., out_dim), non-negative, so the denominator of (3) is a sum of non-negative terms."""

    name: ClassVar[str]

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """The fast path: sigma(x) as a new contiguous tensor."""
        raise NotImplementedError

    def reference(self, x: Tensor) -> Tensor:
        """The same map written as plainly as possible (tests only)."""
        raise NotImplementedError


class _EluPlusOneCopy(torch.autograd.Function):
    """ELU(x) + 1 written into a new contiguous tensor, saving only that output for backward:
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


def elu_plus_one(x: Tensor) -> Tensor:
    """sigma(x) = ELU(x) + 1 (autograd's version; the layers use EluPlusOne's copy with a leaner backward)."""
    return F.elu(x) + 1.0


class EluPlusOne(FeatureMap):
    """The paper's sigma(x) = ELU(x) + 1: positive everywhere, Dk = D. Every key has weight > 0 for every query,
    so a normalised read is a weighted average over everything written (README: dilution)."""

    name = "elu"

    @property
    def out_dim(self) -> int:
        return self.head_dim

    def forward(self, x: Tensor) -> Tensor:
        return _EluPlusOneCopy.apply(x)

    def reference(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, x + 1.0, torch.exp(x))


class DPFP(FeatureMap):
    """Deterministic parameter-free projection (Schlag, Irie, Schmidhuber 2021, "Linear Transformers Are Secretly
    Fast Weight Programmers"), nu = 3, L2-normalised per token as the associative recurrent memory transformer
    (Rodkin et al. 2024) uses it:

        r = [ReLU(x), ReLU(-x)]                       (2D,)
        phi_(j, i) = r_i * r_{(i - j) mod 2D}         j = 1..nu, i = 0..2D-1   -> (2D nu,)
        sigma(x) = phi / ||phi||_2

    Products of rectified coordinates are zero unless both are active, so two different keys share few non-zero
    features: reads are sharper than with ELU + 1 (whose features are all positive), at a memory of 2 nu D x D per
    head instead of D x D. The normalisation gives every token's write the same size (and makes the corrected
    normaliser's "already stored" test a plain dot product).
    """

    name = "dpfp"
    nu: ClassVar[int] = 3
    eps: ClassVar[float] = 1e-6  # lower clamp of ||phi||: an all-zero x gives sigma = 0, not NaN

    @property
    def out_dim(self) -> int:
        return 2 * self.nu * self.head_dim

    def forward(self, x: Tensor) -> Tensor:
        r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)  # (..., 2D)
        phi = torch.cat([r * r.roll(j, dims=-1) for j in range(1, self.nu + 1)], dim=-1)  # (..., 2D nu)
        return phi / phi.norm(dim=-1, keepdim=True).clamp_min(self.eps)

    def reference(self, x: Tensor) -> Tensor:
        D2 = 2 * self.head_dim
        r = torch.cat([x.clamp_min(0), (-x).clamp_min(0)], dim=-1)
        columns = [r[..., i] * r[..., (i - j) % D2] for j in range(1, self.nu + 1) for i in range(D2)]
        phi = torch.stack(columns, dim=-1)
        return phi / torch.sqrt((phi * phi).sum(-1, keepdim=True)).clamp_min(self.eps)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {cls.name: cls for cls in (EluPlusOne, DPFP)}


def build_feature_map(name: str, head_dim: int) -> FeatureMap:
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown memory feature map {name!r}; expected one of {tuple(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](head_dim)
