"""Rotary position embedding (Su et al., 2021), in the Hugging Face Llama layout (rotate_half, not interleaved),
so Llama checkpoints load without permuting q/k weights.

Infini-attention applies RoPE only on the local dot-product path; the compressive memory reads and writes
un-rotated Q/K (paper, Sec. 3.1). cos and sin are cached per device and dtype (see RotaryEmbedding), never
registered as buffers: nothing to move between devices or re-initialise after meta-device construction.

Context extension. Researchers compare Infini-attention against stretching RoPE itself, so the usual static
variants are here, all as a change of the inverse frequencies inv_freq[i] = theta^(-2i/D), i < D/2
(s = `factor`, L = the context length the RoPE was trained at, wavelength_i = 2 pi / inv_freq[i]):

  none    inv_freq unchanged.
  linear  position interpolation (Chen et al., 2023): inv_freq / s, i.e. position p acts as p / s.
  ntk     "NTK-aware" scaling (bloc97, 2023): theta -> theta * s^(D/(D-2)); the fastest dimension is
          unchanged, the slowest is interpolated by exactly s, the ones between by a geometric blend.
  yarn    YaRN (Peng et al., 2023, "NTK-by-parts"): dimensions that turn more than beta_fast times within L
          keep their frequency, those that turn fewer than beta_slow times are interpolated by s, with a
          linear ramp over the dimension index between; cos and sin are multiplied by an attention factor
          (default 0.1 ln s + 1) to temper the softmax. Dimension bounds are rounded outwards (floor / ceil).
  llama3  Llama 3.1: wavelengths shorter than L / high_freq_factor are kept, longer than L / low_freq_factor
          divided by s, a blend linear in L / wavelength between. Same numbers as transformers' "llama3".

Positions restart at 0 in every segment (see attention/infini.py), so on the `infini` and `local` paths the
largest angle is (segment_len - 1) * inv_freq: these knobs matter when segment_len exceeds L, and for the
`full` baseline when the stream does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.config import ROPE_SCALINGS, ModelConfig


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The defining formula, x * cos + rotate_half(x) * sin, with cos and sin (..., D) as `cos_sin` returns them."""
    return x * cos + rotate_half(x) * sin


class _Rotate(torch.autograd.Function):
    """The rotation of every pair (x1_i, x2_i) of the two halves by angle a_i, written per half:
        y1 = x1 c - x2 s,   y2 = x2 c + x1 s          (c, s: the cos and sin of the first half's angles, (..., D/2))
    Two passes over x and no temporary, where the formula (rotate_reference) builds rotate_half(x) first. The map is
    linear with the transposed matrix [[c, s], [-s, c]], the same rotation with -s, so the backward is this function
    again with s negated (and differentiable again). Both halves are strided views of y; x may be any view (the
    layers pass transposed views of the projections) and y gets x's layout (empty_like)."""

    @staticmethod
    def forward(ctx, x: Tensor, c: Tensor, s: Tensor) -> Tensor:
        ctx.save_for_backward(c, s)
        half = x.shape[-1] // 2
        y = torch.empty_like(x)
        x1, x2, y1, y2 = x[..., :half], x[..., half:], y[..., :half], y[..., half:]
        torch.mul(x1, c, out=y1).addcmul_(x2, s, value=-1)
        torch.mul(x2, c, out=y2).addcmul_(x1, s)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        c, s = ctx.saved_tensors
        return _Rotate.apply(grad, c, -s), None, None


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE context-extension rule; the fields mirror ModelConfig.rope_* (documented there)."""

    kind: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"unknown RoPE scaling {self.kind!r}; expected one of {ROPE_SCALINGS}")
        if self.kind in ("yarn", "llama3") and self.original_max_position_embeddings is None:
            raise ValueError(f"RoPE scaling {self.kind!r} needs original_max_position_embeddings")

    @classmethod
    def from_config(cls, config: ModelConfig) -> RopeScaling:
        return cls(
            kind=config.rope_scaling,
            factor=config.rope_scaling_factor,
            original_max_position_embeddings=config.rope_original_max_position_embeddings,
            low_freq_factor=config.rope_low_freq_factor,
            high_freq_factor=config.rope_high_freq_factor,
            beta_fast=config.rope_yarn_beta_fast,
            beta_slow=config.rope_yarn_beta_slow,
            attention_factor=config.rope_attention_factor,
        )

    def cos_sin_multiplier(self) -> float:
        """Factor applied to cos and sin (1.0 except for yarn)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0

    def scale(self, inv_freq: Tensor, theta: float, head_dim: int) -> Tensor:
        """inv_freq: (D/2,) float64 unscaled frequencies theta^(-2i/D) -> (D/2,) float64 scaled."""
        s = float(self.factor)
        if self.kind == "none":
            return inv_freq
        if self.kind == "linear":
            return inv_freq / s
        if self.kind == "ntk":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=inv_freq.device) / head_dim
            return 1.0 / (theta * s ** (head_dim / (head_dim - 2))) ** exponents
        original = float(self.original_max_position_embeddings)  # validated in __post_init__
        if self.kind == "llama3":
            wavelength = 2 * math.pi / inv_freq
            # blend weight 1 keeps a frequency, 0 divides it by s; linear in original / wavelength
            keep = (original / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            keep = torch.where(wavelength < original / self.high_freq_factor, 1.0, keep)
            keep = torch.where(wavelength > original / self.low_freq_factor, 0.0, keep)
            return keep * inv_freq + (1 - keep) * inv_freq / s
        # yarn: the dimension index i at which a frequency turns `rotations` times within the original context
        def dimension_of(rotations: float) -> float:
            return head_dim * math.log(original / (2 * math.pi * rotations)) / (2 * math.log(theta))

        low = max(math.floor(dimension_of(self.beta_fast)), 0)
        high = min(math.ceil(dimension_of(self.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001  # a step instead of a ramp, without dividing by zero
        index = torch.arange(head_dim // 2, dtype=torch.float64, device=inv_freq.device)
        interpolate = ((index - low) / (high - low)).clamp(0.0, 1.0)  # 0: keep the frequency, 1: divide by s
        return (1 - interpolate) * inv_freq + interpolate * inv_freq / s


class RotaryEmbedding(nn.Module):
    """x -> (x * cos(pos * freq) + rotate_half(x) * sin(pos * freq)) * m; freq and m (1 except for yarn) follow the
    context-extension rule `scaling`.

    cos and sin come from tables cached per (device, dtype) for positions 0 .. capacity - 1 (grown by doubling),
    not recomputed per call. Every caller, the fast `rotate` and the general `forward`, reads the same table, so a
    position rotates to the same numbers whatever the call. The table holds float32 angles (position * inv_freq,
    as `cos_sin` computes them) whose cos and sin are taken in float64 and rounded to float32: the rounding makes
    every entry independent of the table size and of how the elementwise kernel was split into vector lanes and
    threads; `cos_sin` (the direct float32 formula) agrees to one float32 ulp. The tables are a cache, not
    buffers: nothing to move between devices or re-initialise after meta-device construction.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling or RopeScaling()
        # (device, dtype, theta, scaling) -> (cos (capacity, D), sin with the sign of rotate_half (capacity, D))
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_config(cls, config: ModelConfig) -> RotaryEmbedding:
        return cls(config.head_dim, config.rope_theta, RopeScaling.from_config(config))

    def inv_freq(self, device: torch.device | None = None) -> Tensor:
        """(D/2,) float32 inverse frequencies: theta^(-2i/D), then the scaling rule, computed in float64."""
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim
        return self.scaling.scale(1.0 / self.theta**exponents, self.theta, self.head_dim).float()

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: (T,) integer -> cos, sin: (T, D) float32, by the direct formula (the tables' reference)."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq(positions.device)  # (T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, D)
        multiplier = self.scaling.cos_sin_multiplier()
        if multiplier != 1.0:
            return angles.cos() * multiplier, angles.sin() * multiplier
        return angles.cos(), angles.sin()

    def tables(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and signed sin for positions 0 .. at least length - 1: (capacity, D) in `dtype`, cached.

        signed sin = [-sin, sin] over the two halves, so that rotate_half(x) * sin == swap_halves(x) * signed sin
        (no negation pass)."""
        key = (device, dtype, self.theta, self.scaling)
        cached = self._tables.get(key)
        if cached is not None and cached[0].shape[0] >= length:
            return cached
        capacity = max(64, 1 << (max(length, 1) - 1).bit_length())
        # a table first built under inference_mode must still be usable by autograd later (evaluation inside a
        # training run), so it is never an inference tensor
        with torch.inference_mode(False), torch.no_grad():
            positions = torch.arange(capacity, device=device, dtype=torch.float32)
            angles = (positions.unsqueeze(-1) * self.inv_freq(device)).double()  # float32 angles, (capacity, D/2)
            cos, sin = angles.cos().float(), angles.sin().float()  # rounded once from float64
            multiplier = self.scaling.cos_sin_multiplier()
            if multiplier != 1.0:
                cos, sin = cos * multiplier, sin * multiplier
            table = (torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype))
        if not torch.compiler.is_compiling():
            self._tables = {k: v for k, v in self._tables.items() if k[0] != device or k[1] != dtype}
            self._tables[key] = table
        return table

    def _rotate_with(self, x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        """x * cos + swap_halves(x) * signed_sin, in cos's dtype (float32 for bf16 inputs), per half (_Rotate)."""
        half = self.head_dim // 2
        return _Rotate.apply(x.to(cos.dtype), cos[..., :half], signed_sin[..., half:]).to(x.dtype)

    def rotate(self, x: Tensor, start: int = 0) -> Tensor:
        """x: (..., n, D) at positions start .. start + n - 1 -> rotated, in x's dtype (bf16 rotates in float32).
        The fast path of the layers: a slice of the cached tables, no position tensor."""
        n = x.shape[-2]
        cos, sin = self.tables(start + n, x.device, torch.promote_types(x.dtype, torch.float32))
        return self._rotate_with(x, cos[start : start + n], sin[start : start + n])

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (..., T, D); positions: (T,) any non-negative integers. Returns x rotated, in x's dtype."""
        length = int(positions.max()) + 1 if positions.numel() else 0
        cos, sin = self.tables(length, x.device, torch.promote_types(x.dtype, torch.float32))
        return self._rotate_with(x, cos[positions], sin[positions])

    def extra_repr(self) -> str:
        scaling = "" if self.scaling.kind == "none" else f", scaling={self.scaling}"
        return f"head_dim={self.head_dim}, theta={self.theta}{scaling}"
